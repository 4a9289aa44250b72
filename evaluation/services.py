"""Answer generation (gpu queue) and RAGAS scoring (cpu queue) of a pipeline run."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path
from typing import Any

from datasets_app.models import Dataset
from datasets_app.validation import read_rows
from runs import tracking
from runs.config import judge_api_key
from runs.execution import RunLog, check_not_cancelled, tolerate_db_errors
from runs.models import PipelineRun, RunKind, SampleResult, Variant
from runs.orchestration import run_enqueue_next
from runs.reproducibility import reproducibility_record
from runs.services import (
    run_record_results,
    run_record_samples,
    run_set_reproducibility,
    run_transition,
    run_update_progress,
)

from .scoring import Sample, score_samples


def start_tracking(run: PipelineRun, run_log: RunLog) -> str:
    """Reproducibility record + MLflow run, once per pipeline run (whichever job comes first)."""
    if run.mlflow_run_id:
        return run.mlflow_run_id
    record = reproducibility_record(run)
    run_set_reproducibility(run_id=run.pk, record=record)
    mlflow_run_id = tracking.mlflow_start(run, tags={f"repro.{k}": v for k, v in tracking.flatten("", record).items()})
    run_log(f"MLflow run {mlflow_run_id}")
    return mlflow_run_id


def eval_rows(dataset: Dataset, max_samples: int | None) -> list[dict[str, Any]]:
    return read_rows(dataset.file.path, limit=max_samples)


def _progress_span(run: PipelineRun) -> tuple[int, int, int]:
    """(generation start, scoring start, end) percentages for this kind of run."""
    return (72, 88, 99) if run.kind == RunKind.FINETUNE else (2, 50, 99)


def run_generate(run: PipelineRun, run_log: RunLog) -> None:
    from training.finetune import load_base_model, load_tokenizer, pick_device
    from training.services import build_progress, ensure_adapter
    from training.tiny_model import resolve_model_path

    from .generation import adapter_disabled, encode_eval_prompts, generate_answers

    evaluation = run.config["evaluation"]
    start, end, _ = _progress_span(run)
    start_tracking(run, run_log)
    run_update_progress(run_id=run.pk, progress=start, stage="loading model for generation")
    base_path = resolve_model_path(run.base_model, progress=build_progress(run.pk, run.base_model))
    device, dtype = pick_device((run.config.get("training") or {}).get("precision", "auto"))
    tokenizer = load_tokenizer(base_path)
    model = load_base_model(base_path, device=device, dtype=dtype)
    variants = [Variant.BASE]
    if run.kind == RunKind.FINETUNE:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(ensure_adapter(run)))
        variants = [Variant.FINETUNED] + ([Variant.BASE] if evaluation["compare_base"] else [])
    max_seq = (run.config.get("training") or {}).get("max_seq_length", 512)
    max_prompt = max(16, min(max_seq, getattr(model.config, "max_position_embeddings", max_seq)) - evaluation["max_new_tokens"])

    datasets = list(run.eval_datasets.order_by("name"))
    jobs = [(d, v) for d in datasets for v in variants]
    for number, (dataset, variant) in enumerate(jobs):
        check_not_cancelled(run.pk)
        rows = eval_rows(dataset, evaluation["max_samples"])
        prompts = encode_eval_prompts(tokenizer, rows, max_prompt_tokens=max_prompt)

        def on_batch(done: int, total: int, number: int = number, dataset: Dataset = dataset, variant: str = variant) -> None:
            share = (number + done / max(total, 1)) / len(jobs)
            # Progress and the cancel check can wait for the next batch if the database connection dropped.
            with tolerate_db_errors(f"run {run.pk}: generation progress"):
                run_update_progress(run_id=run.pk, progress=start + int((end - start) * share), stage=f"generating {variant} answers for {dataset.name}: {done}/{total}")
                check_not_cancelled(run.pk)

        if variant == Variant.BASE and run.kind == RunKind.FINETUNE:
            with adapter_disabled(model):
                answers = generate_answers(model, tokenizer, prompts, batch_size=evaluation["batch_size"], max_new_tokens=evaluation["max_new_tokens"], on_batch=on_batch)
        else:
            answers = generate_answers(model, tokenizer, prompts, batch_size=evaluation["batch_size"], max_new_tokens=evaluation["max_new_tokens"], on_batch=on_batch)
        run_record_samples(run_id=run.pk, samples=[
            {"dataset_id": dataset.pk, "variant": variant, "index": i, "question": r["question"], "contexts": r["contexts"],
             "ground_truth": r["ground_truth"], "answer": answer, "scores": {}, "reasons": {}}
            for i, (r, answer) in enumerate(zip(rows, answers, strict=True))
        ])
        run_log(f"generated {len(answers)} {variant} answers for {dataset.name}")
    check_not_cancelled(run.pk)
    run_enqueue_next(run_id=run.pk, after="generate")
    run_update_progress(run_id=run.pk, progress=end, stage="queued for scoring")


def _dataset_answer_samples(run: PipelineRun, dataset: Dataset) -> list[SampleResult]:
    rows = eval_rows(dataset, run.config["evaluation"]["max_samples"])
    return [
        SampleResult(run=run, dataset=dataset, variant=Variant.DATASET, index=i, question=r["question"], contexts=r["contexts"],
                     ground_truth=r["ground_truth"], answer=r["answer"], scores={}, reasons={})
        for i, r in enumerate(rows)
    ]


def run_score(run: PipelineRun, run_log: RunLog) -> None:
    evaluation = run.config["evaluation"]
    _, start, end = _progress_span(run)
    mlflow_run_id = start_tracking(run, run_log)
    judge = evaluation.get("judge")
    api_key = judge_api_key(judge) if judge else ""
    if judge and not api_key:
        run_log(f"note: environment variable {judge['api_key_env']} is not set; calling the judge without an API key")
    datasets = list(run.eval_datasets.order_by("name"))
    groups: list[tuple[Dataset, str, list[SampleResult]]] = []
    for dataset in datasets:
        if evaluation["answers"] == "dataset":
            groups.append((dataset, Variant.DATASET, _dataset_answer_samples(run, dataset)))
            continue
        stored = list(SampleResult.objects.filter(run=run, dataset=dataset).order_by("variant", "index"))
        for variant in sorted({s.variant for s in stored}, key=lambda v: v != Variant.FINETUNED):
            groups.append((dataset, variant, [s for s in stored if s.variant == variant]))
    if not groups:
        raise RuntimeError("nothing to score: no samples were generated")

    reference_contexts = {d.pk: [r.get("reference_contexts") for r in eval_rows(d, evaluation["max_samples"])] for d in datasets}
    for number, (dataset, variant, samples) in enumerate(groups):
        check_not_cancelled(run.pk)
        run_update_progress(run_id=run.pk, progress=start + int((end - start) * number / len(groups)), stage=f"scoring {variant} answers for {dataset.name} ({len(samples)} samples)")
        inputs = [
            Sample(question=s.question, contexts=s.contexts, ground_truth=s.ground_truth, answer=s.answer,
                   reference_contexts=reference_contexts[dataset.pk][s.index])
            for s in samples
        ]
        scored = score_samples(inputs, evaluation["metrics"], judge=judge, judge_api_key=api_key)
        for sample, scores, reasons in zip(samples, scored.scores, scored.reasons, strict=True):
            sample.scores, sample.reasons = scores, reasons
        check_not_cancelled(run.pk)
        run_record_samples(run_id=run.pk, samples=[
            {"dataset_id": s.dataset_id, "variant": s.variant, "index": s.index, "question": s.question, "contexts": s.contexts,
             "ground_truth": s.ground_truth, "answer": s.answer, "scores": s.scores, "reasons": s.reasons}
            for s in samples
        ])
        aggregates = scored.aggregate()
        run_record_results(run_id=run.pk, results=[{"dataset_id": dataset.pk, "variant": variant, "metric": m, **agg} for m, agg in aggregates.items()])
        tracking.log_metrics(mlflow_run_id, {f"{dataset.name}/{variant}/{m}": a["value"] for m, a in aggregates.items()})
        _log_samples_artifact(mlflow_run_id, dataset.name, variant, samples, evaluation["metrics"])
        summary = ", ".join(
            f"{m}={a['value']:.4f}" if a["value"] is not None else f"{m}=not measured" for m, a in aggregates.items()
        )
        failed = {m: a["failure_reasons"] for m, a in aggregates.items() if a["n_failed"]}
        run_log(f"scored {variant} on {dataset.name}: {summary}" + (f"; not measured: {failed}" if failed else ""))
    _log_differences(run, mlflow_run_id)
    check_not_cancelled(run.pk)
    # MLflow first: whoever sees the run `completed` also finds its MLflow run finished.
    tracking.mlflow_finish(mlflow_run_id, "FINISHED")
    if run_transition(run_id=run.pk, to="completed", expected="evaluating", message="scoring finished"):
        PipelineRun.objects.filter(pk=run.pk).update(current_job="score:done")
    else:  # cancelled in the last instant
        tracking.mlflow_finish(mlflow_run_id, "KILLED")


def _log_samples_artifact(mlflow_run_id: str, dataset: str, variant: str, samples: list[SampleResult], metrics: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{dataset}__{variant}.csv"
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["index", "question", "ground_truth", "answer", *metrics, *(f"{m}_reason" for m in metrics)])
            for s in samples:
                writer.writerow([s.index, s.question, s.ground_truth, s.answer, *(s.scores.get(m) for m in metrics), *(s.reasons.get(m, "") for m in metrics)])
        tracking.log_artifact(mlflow_run_id, path, "samples")


def _log_differences(run: PipelineRun, mlflow_run_id: str) -> None:
    """finetuned - base per dataset and metric, where both were measured."""
    results = {(r.dataset.name, r.variant, r.metric): r.value for r in run.results.select_related("dataset") if r.dataset}
    deltas = {
        f"{ds}/delta/{metric}": value - results[(ds, Variant.BASE, metric)]
        for (ds, variant, metric), value in results.items()
        if variant == Variant.FINETUNED and value is not None and results.get((ds, Variant.BASE, metric)) is not None
    }
    if deltas:
        tracking.log_metrics(mlflow_run_id, deltas)
