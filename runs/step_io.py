"""The boundary between the application and the engines: what a step body gets, and where its output goes.

A body (training/steps.py, evaluation/steps.py) receives a `StepContext`: the
validated config, its rows, and callbacks (progress, log, check_cancelled,
record_step, add_job) implemented here through runs' services, for one job of
the run's graph. It returns plain data. Then, for each step of a kind's graph
(runs/kinds/):

- `publish_*` writes the work product to the run's MLflow run (artifacts,
  metrics, tags), after the body and outside any database transaction;
- `store_*` puts it in the database (through services), inside the transaction
  that finishes the job; it makes no MLflow call. Registrations and aliases are
  follow-up jobs of their own (runs/promotion.py).

The engine (runs/pipeline.py) calls them in that order.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings

from datasets_app.selectors import dataset_rows
from evaluation.samples import Sample
from evaluation.steps import CheckpointScores, EvalSet, Generated, ScoredSet, Selection, ToScore
from training.finetune import StepInfo
from training.local_models import describe_progress
from training.steps import TrainedAdapter

from . import tracking
from .execution import JobAbandoned, RunLog, tolerate_db_errors
from .exports import write_scored_samples_csv
from .models import Job, PipelineRun, Variant, ordered_variants
from .reproducibility import reproducibility_record
from .selectors import (
    job_still_held,
    last_training_throughput,
    run_adapter_reference,
    run_generated_samples,
    run_sample_scores,
    run_selection_points,
    run_step_fractions,
    run_sweep_winner,
)
from .services import (
    job_set_checkpoint,
    job_set_figures,
    job_set_progress,
    run_note,
    run_record_comparisons,
    run_record_promotion,
    run_record_results,
    run_record_samples,
    run_set_data_check,
    run_set_mlflow_ids,
    run_set_registered_model,
    run_set_reproducibility,
    run_set_train_history,
    run_update_progress,
    run_update_reproducibility,
)

if TYPE_CHECKING:
    from .kinds.base import Graph, Step
    from .promotion import Compared, Registered

log = logging.getLogger(__name__)

# Live updates (progress, loss curve, cancel checks) at most this often.
LIVE_UPDATE_SECONDS = 1.0
LOG_EVERY_SECONDS = 15.0  # a training line in the run's log at least this often (first and last steps, validations too)


def runs_dir() -> Path:
    """Where runs write their working copies (the adapter before MLflow has it).

    settings.RUNS_DIR when a deployment sets it, else MLOPS_VAR_DIR/runs.
    """
    configured = getattr(settings, "RUNS_DIR", None)
    return Path(configured) if configured else Path(settings.VAR_DIR) / "runs"


def run_dir(run_id: int) -> Path:
    return runs_dir() / str(run_id)


def run_adapter_dir(run: PipelineRun) -> Path:
    """The run's adapter on this machine: the one its selection chose (`selection/step-N`), else the fine-tune's
    (`adapter`); local, or downloaded from its MLflow run (another gpu worker trained it)."""
    winner = run_sweep_winner(run.pk)
    if winner is not None:  # a sweep's adapter is its winning trial's
        return run_adapter_dir(PipelineRun.objects.get(pk=winner))
    reference = run_adapter_reference(run.pk)
    local = run_dir(run.pk) / reference
    if (local / "adapter_config.json").exists():
        return local
    tracking.download_artifacts(run.mlflow_run_id, reference, run_dir(run.pk))
    return local


class StepContext:
    """What a step body may know and do about its run, for one job of the run's graph (the engines' Protocols list it)."""

    def __init__(self, run: PipelineRun, job: Job, step: Step, graph: Graph) -> None:
        self.run = run
        self.run_id = run.pk
        self.job = job
        self.job_id = job.pk
        self.key: str = job.key
        self.payload: dict[str, Any] = job.payload or {}
        self.config: dict[str, Any] = run.config
        self.base_model: str = run.base_model
        self.work_dir: Path = run_dir(run.pk)
        self.step = step
        self.graph = graph
        self.variants: list[str] = run.spec.generated_variants(run.config)
        # The claim this worker holds: 1, or more when an earlier attempt's worker was lost.
        self.attempt: int = job.attempts
        self.output: dict[str, Any] = {}  # what the job produced, by reference (stored with the job when it finishes)
        self._log = RunLog(run.pk)
        self._last_live = 0.0
        self._last_check = 0.0
        self._last_log = 0.0
        # A resumed fine-tune continues the loss curve of its earlier attempts (cut back to its checkpoint by record_step).
        self._history: list[dict[str, Any]] = list(run.train_history or []) if step.name == "finetune" and self.attempt > 1 else []
        self._metrics = tracking.MetricBuffer(run.mlflow_run_id) if run.mlflow_run_id else None
        self._total_recorded = False

    # --- inputs
    def train_rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for dataset in self.run.train_datasets.order_by("name"):
            rows += dataset_rows(dataset)
        return rows

    def eval_sets(self) -> list[EvalSet]:
        limit = self.config["evaluation"]["max_samples"]
        return [EvalSet(name=d.name, rows=dataset_rows(d, limit=limit)) for d in self.run.eval_datasets.order_by("name")]

    def validation_rows(self) -> list[dict[str, Any]] | None:
        """The rows of training.validation_dataset; None when the config validates on a split of the train rows."""
        name = (self.config.get("training") or {}).get("validation_dataset")
        if not name:
            return None
        from datasets_app.selectors import datasets_by_names

        return dataset_rows(datasets_by_names([name])[name])

    def selection_rows(self) -> list[dict[str, Any]] | None:
        """The rows of the dataset selection.rows names; None for a share of the train rows, or no selection."""
        name = (self.config.get("selection") or {}).get("rows")
        if not isinstance(name, str):
            return None
        from datasets_app.selectors import datasets_by_names

        return dataset_rows(datasets_by_names([name])[name])

    def eval_questions(self) -> list[str]:
        return [r["question"] for s in self.eval_sets() for r in s.rows]

    def difference_spreads(self) -> dict[str, dict[str, dict[str, Any]]]:
        from .selectors import latest_difference_spreads

        return latest_difference_spreads(self.config["datasets"]["eval"], self.config["evaluation"]["metrics"])

    def throughput(self, device: str | None) -> dict[str, Any] | None:
        return last_training_throughput(base_model=self.base_model, device=device, before_run=self.run_id)

    def record_data_check(self, report: dict[str, Any]) -> None:
        """The fine-tune's data check, stored with the run (and to MLflow)."""
        run_set_data_check(run_id=self.run_id, report=report)
        if self.run.mlflow_run_id:
            overlap, truncated = report["overlap"], report["tokens"]["truncated"]
            tracking.log_metrics(self.run.mlflow_run_id, {
                "data_check/truncated_rows": truncated["rows"], "data_check/overlap_train_rows": overlap["train_rows"],
                "data_check/duplicate_questions": report["train_set"]["duplicate_questions"],
            }, step=0)
            tracking.log_text(self.run.mlflow_run_id, json.dumps(report, indent=2), "data_check.json")
        truncated = report["tokens"]["truncated"]
        self.log(
            f"data check: {report['tokens']['rows']} train rows, {truncated['rows']} cut by max_seq_length "
            f"({truncated['context_cut']} context, {truncated['answer_cut']} answer); {report['overlap']['train_rows']} overlap "
            f"the eval sets; {report['train_set']['duplicate_questions']} duplicate questions; {report['estimate']['steps']} steps"
            + ("; refused" if report["problems"] else "")
        )

    def checkpoint_dir(self) -> Path:
        """This run's checkpoints on this machine; in served mode fetched from MLflow when another worker wrote them."""
        local = self.work_dir / "checkpoints"
        if self.attempt > 1 and not (local / "last").exists() and _mlflow_served() and self.run.mlflow_run_id:
            try:
                tracking.download_artifacts(self.run.mlflow_run_id, "checkpoints", self.work_dir)
            except Exception:  # No checkpoint in MLflow: the attempt starts from the beginning.
                log.warning("run %s: no checkpoints in MLflow to resume from", self.run_id, exc_info=True)
        return local

    def store_checkpoint(self, kind: str, directory: Path, step: int) -> None:
        """A checkpoint written: to MLflow in served mode (another gpu worker can resume), recorded on the run."""
        if _mlflow_served() and self.run.mlflow_run_id:
            tracking.log_artifacts(self.run.mlflow_run_id, directory, f"checkpoints/{kind}")
        if kind == "last":
            with tolerate_db_errors(f"run {self.run_id}: checkpoint"):
                run_set_train_history(run_id=self.run_id, train_history=self._history)
                job_set_checkpoint(job_id=self.job_id, attempt=self.attempt, step=step)

    def adapter_dir(self) -> Path:
        """The run's adapter on this machine: local, or downloaded from MLflow (another gpu worker trained it)."""
        return run_adapter_dir(self.run)

    def paired_scores(self) -> dict[str, dict[str, tuple[list[float | None], list[float | None]]]]:
        """{eval dataset: {metric: (base scores, fine-tuned scores)}}, paired by row, where both variants were scored."""
        from evaluation.significance import pair_by_index

        out: dict[str, dict[str, tuple[list[float | None], list[float | None]]]] = {}
        for dataset in self.config["datasets"]["eval"]:
            base = run_sample_scores(self.run, dataset_name=dataset, variant=Variant.BASE)
            tuned = run_sample_scores(self.run, dataset_name=dataset, variant=Variant.FINETUNED)
            metrics = [m for m in self.config["evaluation"]["metrics"] if m in base and m in tuned]
            if metrics:
                out[dataset] = {m: pair_by_index(base[m], tuned[m]) for m in metrics}
        return out

    def to_score(self) -> list[ToScore]:
        """Each (eval set, variant) to score, the main variant first: stored answers, or the generated ones."""
        groups: list[ToScore] = []
        for eval_set in self.eval_sets():
            references = [r.get("reference_contexts") for r in eval_set.rows]
            if self.config["evaluation"]["answers"] == "dataset":
                samples = [_sample(r, r["answer"], references[i]) for i, r in enumerate(eval_set.rows)]
                groups.append(ToScore(dataset=eval_set.name, variant=Variant.DATASET, indices=list(range(len(samples))), samples=samples))
                continue
            stored = run_generated_samples(self.run, dataset_name=eval_set.name)
            for variant in ordered_variants(s.variant for s in stored):
                mine = [s for s in stored if s.variant == variant]
                groups.append(ToScore(
                    dataset=eval_set.name, variant=variant, indices=[s.index for s in mine],
                    samples=[Sample(question=s.question, contexts=s.contexts, ground_truth=s.ground_truth, answer=s.answer,
                                    reference_contexts=references[s.index]) for s in mine],
                    cut_off=[s.cut_off for s in mine],
                ))
        return groups

    # --- callbacks
    def progress(self, fraction: float | None, stage: str) -> None:
        """Progress within this job (0-1) and the stage text; the run's bar moves by the graph's step weights."""
        # A lost database connection must not stop the work: the next update carries it.
        with tolerate_db_errors(f"run {self.run_id}: progress"):
            job_set_progress(job_id=self.job_id, attempt=self.attempt, fraction=fraction, stage=stage)
            run_update_progress(run_id=self.run_id, progress=self._run_progress(fraction), stage=stage)

    def _run_progress(self, fraction: float | None) -> int | None:
        if fraction is None:
            return None
        fractions = run_step_fractions(self.run_id)  # every job's progress as stored; this job's newest value below
        if not self.key:
            fractions[self.step.name] = fraction
        return self.graph.progress(fractions)

    def record_figures(self, figures: dict[str, Any]) -> None:
        """Figures this job measured (device, dtype, speed, peak memory, seconds): data the pages show, never a log line."""
        with tolerate_db_errors(f"run {self.run_id}: figures"):
            job_set_figures(job_id=self.job_id, figures={k: v for k, v in figures.items() if v is not None})

    def add_job(self, step: str, key: str, payload: dict[str, Any] | None = None) -> bool:
        """Fan-out: a keyed job of `step` (declared `spawned_by` this job's step), sent at once; False if it exists.

        In the embedded default there is no other worker to take it: it runs here and now, in-process (a
        checkpoint's scoring), so the job that added it decides on its outcome as a served one would later.
        """
        from . import pipeline

        job_id = pipeline.add_job(run_id=self.run_id, graph=self.graph, step=step, key=key, payload=payload)
        if job_id is not None and settings.JOBS_INLINE:
            try:
                pipeline.run_job(job_id)
            except Exception:  # recorded on the job (and the run, unless its step tolerates failures)
                log.warning("run %s: the %s job %s failed in-process", self.run_id, step, key, exc_info=True)
            self.check_cancelled(now=True)
        return job_id is not None

    def store_selection_adapter(self, directory: Path, step: int) -> None:
        """A selection point's adapter: to MLflow in served mode (the job that chooses, and generation, may run elsewhere)."""
        if _mlflow_served() and self.run.mlflow_run_id:
            tracking.log_artifacts(self.run.mlflow_run_id, directory, f"selection/step-{step}")

    def selection_points(self) -> list[dict[str, Any]]:
        """The checkpoints scored so far: the selection metric's mean, interval and rows measured, by step."""
        return run_selection_points(self.run_id, metric=self.config["selection"]["metric"])

    def add_child_run(self, step: str, key: str, config: dict[str, Any], payload: dict[str, Any] | None = None) -> int | None:
        """Fan-out to a child run (a sweep's trial) that a job of `step` waits for; the child's id."""
        from . import pipeline

        return pipeline.add_child_run(run_id=self.run_id, graph=self.graph, step=step, key=key, config=config, payload=payload)

    def log(self, line: str) -> None:
        self._log(line)

    def check_cancelled(self, *, now: bool = False) -> None:
        """Raise JobAbandoned once the run has ended (cancelled, or failed by the reaper) or this attempt no
        longer holds the job (the reaper sent it again); cheap to call often."""
        moment = time.monotonic()
        if not now and moment - self._last_check < LIVE_UPDATE_SECONDS:
            return
        self._last_check = moment
        with tolerate_db_errors(f"run {self.run_id}: cancel check"):
            why = job_still_held(self.job_id, self.attempt, on_completed_run=self.step.on_demand)
            if why:
                raise JobAbandoned(why)

    def record_step(self, info: StepInfo) -> None:
        """One optimizer step: to MLflow (batched), the loss curve and the progress bar (at most once a second)."""
        values = {"train/loss": info.loss, "train/learning_rate": info.learning_rate, "train/epoch": info.epoch}
        entry = {
            "step": info.step, "loss": round(info.loss, 5), "learning_rate": info.learning_rate, "epoch": round(info.epoch, 3),
            "tokens": info.tokens, "elapsed_seconds": info.elapsed_seconds, "device": info.device,
        }
        if info.peak_memory_bytes is not None:
            entry["peak_memory_bytes"] = info.peak_memory_bytes
        if info.val_loss is not None:
            values["val/loss"] = info.val_loss
            entry["val_loss"] = round(info.val_loss, 5)
        if self._metrics is not None:
            self._metrics.add(values, info.step)
        # A resumed attempt goes on from its checkpoint: what the lost attempt did after it is replaced.
        self._history = [e for e in self._history if e["step"] < info.step] + [entry]
        if not self._total_recorded:
            self._total_recorded = True
            self.record_figures({"total_steps": info.total_steps, "device": info.device})
        moment = time.monotonic()
        if moment - self._last_log >= LOG_EVERY_SECONDS or info.step in (1, info.total_steps) or info.val_loss is not None:
            self._last_log = moment
            speed = info.tokens / info.elapsed_seconds if info.elapsed_seconds > 0 else 0.0
            self.log(
                f"step {info.step}/{info.total_steps} epoch {info.epoch:.2f}: loss {info.loss:.4f}"
                + (f", validation loss {info.val_loss:.4f}" if info.val_loss is not None else "")
                + f", lr {info.learning_rate:.2e}, {speed:.0f} tokens/s"
            )
        if moment - self._last_live >= LIVE_UPDATE_SECONDS or info.step == info.total_steps or info.val_loss is not None:
            self._last_live = moment
            fraction = info.step / info.total_steps
            stage = f"training step {info.step}/{info.total_steps}, epoch {info.epoch:.2f}, loss {info.loss:.4f}"
            with tolerate_db_errors(f"run {self.run_id}: live training update"):
                job_set_progress(job_id=self.job_id, attempt=self.attempt, fraction=fraction, stage=stage)
                run_update_progress(run_id=self.run_id, progress=self._run_progress(fraction), train_history=self._history, stage=stage)

    def build_progress(self) -> Callable[[int, int], None]:
        """Stage updates while a local: model is built on first use (it takes a while)."""
        last, began = [0.0], [None]

        def report(step: int, total: int) -> None:
            moment = time.monotonic()
            if began[0] is None:  # the build is its own stage of the run's timeline: an event when it begins and ends
                began[0] = moment
                with tolerate_db_errors(f"run {self.run_id}: model build event"):
                    run_note(run_id=self.run_id, message=f"building {self.base_model} on first use")
            if moment - last[0] >= LIVE_UPDATE_SECONDS or step == total:
                last[0] = moment
                name = self.base_model.removeprefix("local:")
                # The build's own progress and time, apart from the job's: the page shows it as a build, with its own rate.
                self.record_figures({"model_build": {"model": self.base_model, "step": step, "total": total,
                                                     "seconds": round(moment - began[0], 3), "done": step == total}})
                self.progress(None, f"building {self.base_model} on first use: {describe_progress(name, step, total)}")
            if step == total:
                message = f"{self.base_model} built in {moment - began[0]:.0f}s; {self.step.label} goes on"
                self.log(message)
                with tolerate_db_errors(f"run {self.run_id}: model build event"):
                    run_note(run_id=self.run_id, message=message)

        return report

    def close(self) -> None:
        """Whatever the step's outcome: buffered metrics to MLflow, the loss curve kept."""
        if self._metrics is not None:
            try:
                self._metrics.flush()
            except Exception:  # Best effort: the run's own row has the history.
                log.warning("run %s: could not flush step metrics to MLflow", self.run_id, exc_info=True)
        if self._history:
            with tolerate_db_errors(f"run {self.run_id}: training history"):
                run_set_train_history(run_id=self.run_id, train_history=self._history)


def _mlflow_served() -> bool:
    """A tracking server: the artifact store is where another gpu worker finds checkpoints (else the run's directory)."""
    return str(settings.MLFLOW_TRACKING_URI).startswith(("http://", "https://", "databricks"))


def _sample(row: dict[str, Any], answer: str, reference_contexts: list[str] | None) -> Sample:
    return Sample(question=row["question"], contexts=row["contexts"], ground_truth=row["ground_truth"], answer=answer,
                  reference_contexts=reference_contexts)


def start_tracking(ctx: StepContext) -> None:
    """Reproducibility record + MLflow run, once per pipeline run (whichever job comes first).

    Jobs of one run may start at the same moment on different workers: the
    MLflow run's id is set with a compare-and-swap, and a job that lost the race
    deletes the MLflow run it made and uses the winner's.
    """
    run = ctx.run
    if not run.mlflow_run_id:
        record = reproducibility_record(run)
        parent = PipelineRun.objects.filter(pk=run.parent_id).values_list("mlflow_run_id", flat=True).first() if run.parent_id else ""
        experiment_id, mlflow_run_id = tracking.mlflow_start(
            run_id=run.pk, name=run.name, kind=run.kind, config=run.config,
            # a sweep's trials nest under the sweep's MLflow run
            tags={f"repro.{k}": v for k, v in tracking.flatten(record).items()} | ({"mlflow.parentRunId": parent} if parent else {}),
        )
        if run_set_mlflow_ids(run_id=run.pk, experiment_id=experiment_id, mlflow_run_id=mlflow_run_id):
            run_set_reproducibility(run_id=run.pk, record=record)
            run.reproducibility = record
            tracking.log_datasets(mlflow_run_id, [
                {"name": d.name, "sha256": d.sha256, "rows": d.row_count, "context": context}
                for context, datasets in (("training", run.train_datasets.order_by("name")), ("evaluation", run.eval_datasets.order_by("name")))
                for d in datasets
            ])
            ctx.log(f"MLflow run {mlflow_run_id}")
        else:
            tracking.delete_run(mlflow_run_id)
        run.refresh_from_db(fields=["mlflow_experiment_id", "mlflow_run_id", "reproducibility"])
    if ctx._metrics is None:
        ctx._metrics = tracking.MetricBuffer(run.mlflow_run_id)


# --- where each step's output goes: publish_* to MLflow (before), store_* to the database (in the finishing transaction)


def publish_finetune(ctx: StepContext, trained: TrainedAdapter) -> None:
    """The adapter and the training figures to the run's MLflow run (another gpu worker downloads the adapter)."""
    run, outcome = ctx.run, trained.outcome
    ctx.progress(1.0, "logging the adapter to MLflow")
    _publish_base_model_build(ctx, trained.base_model_info)
    tracking.set_tags(run.mlflow_run_id, {
        "best_step": str(outcome.best_step if outcome.best_step is not None else outcome.steps),
        "adapter": "best validation loss" if outcome.best_step is not None else "last step (no validation)",
        **({"resumed_from_step": str(outcome.resumed_from)} if outcome.resumed_from is not None else {}),
    })
    if outcome.best_val_loss is not None:
        tracking.log_metrics(run.mlflow_run_id, {"val/best_loss": outcome.best_val_loss}, step=outcome.best_step or 0)
    tracking.log_metrics(run.mlflow_run_id, {
        "train/final_loss": outcome.final_loss, "train/tokens_per_second": outcome.tokens / max(outcome.seconds, 1e-9),
        "train/seconds": outcome.seconds, "train/trainable_parameters": outcome.trainable_parameters,
    }, step=outcome.steps)
    tracking.log_artifacts(run.mlflow_run_id, outcome.adapter_dir, "adapter")


def finetune_figures(trained: TrainedAdapter) -> dict[str, Any]:
    outcome = trained.outcome
    return {
        "device": outcome.device, "dtype": outcome.dtype, "steps": outcome.steps, "seconds": round(outcome.seconds, 3),
        "tokens": outcome.tokens, "tokens_per_second": round(outcome.tokens / max(outcome.seconds, 1e-9), 2),
        "step_seconds": round(outcome.seconds / max(outcome.steps, 1), 4), "final_loss": outcome.final_loss,
        "trainable_parameters": outcome.trainable_parameters, "total_parameters": outcome.total_parameters,
        **({"peak_memory_bytes": outcome.peak_memory_bytes} if outcome.device.startswith("cuda") and outcome.peak_memory_bytes else {}),
    }


def store_finetune(ctx: StepContext, trained: TrainedAdapter) -> None:
    """Which adapter the fine-tune kept (by reference: the run's MLflow artifact `adapter`), and why."""
    outcome = trained.outcome
    _store_base_model_build(ctx, trained.base_model_info)
    if outcome.stopped_early:
        run_note(run_id=ctx.run_id, message=outcome.stopped_early)
    ctx.output = {
        "adapter": "adapter", "steps": outcome.steps, "best_step": outcome.best_step, "best_val_loss": outcome.best_val_loss,
        "kept": "best validation loss" if outcome.best_step is not None else "last step (no validation)",
        **({"resumed_from": outcome.resumed_from} if outcome.resumed_from is not None else {}),
    }


def example_rows(ctx: StepContext) -> list[dict[str, Any]]:
    """The pyfunc model's input example: the first rows of the first eval set, as the model takes them."""
    rows = next((s.rows for s in ctx.eval_sets() if s.rows), [])
    return [{"question": r["question"], "contexts": list(r["contexts"])} for r in rows[:2]]


def store_registration(ctx: StepContext, registered: Registered) -> None:
    """The version the register job made (or found): recorded on the run."""
    run_set_registered_model(run_id=ctx.run_id, name=registered.name, version=registered.version)
    ctx.output = {"model": registered.name, "version": registered.version}
    ctx.log(
        f"registered model {registered.name} version {registered.version}: "
        f"mlflow.pyfunc.load_model('models:/{registered.name}/{registered.version}') answers questions"
    )


def publish_answers(ctx: StepContext, generated: Generated) -> None:
    _publish_base_model_build(ctx, generated.base_model_info)
    if generated.prompt_example:
        tracking.log_text(ctx.run.mlflow_run_id, generated.prompt_example, "prompt_example.txt")


def store_answers(ctx: StepContext, generated: Generated) -> None:
    """The answers as samples of the run (each with whether the token limit cut it off); the prompt of the first eval row to the run."""
    datasets = _dataset_ids(ctx.run)
    for answer_set in generated.answer_sets:
        cut_off = answer_set.cut_off if answer_set.cut_off is not None else [None] * len(answer_set.answers)
        run_record_samples(run_id=ctx.run_id, samples=[
            {"dataset_id": datasets[answer_set.dataset], "variant": answer_set.variant, "index": i, "question": r["question"],
             "contexts": r["contexts"], "ground_truth": r["ground_truth"], "answer": answer, "cut_off": cut, "scores": {}, "reasons": {}}
            for i, (r, answer, cut) in enumerate(zip(answer_set.rows, answer_set.answers, cut_off, strict=True))
        ])
    _store_base_model_build(ctx, generated.base_model_info)
    if generated.prompt_example:
        run_update_reproducibility(run_id=ctx.run_id, extra={"prompt_example": generated.prompt_example})
    ctx.output = {"answers": {f"{a.dataset}/{a.variant}": len(a.answers) for a in generated.answer_sets}}


def _build_record(info: dict[str, Any]) -> dict[str, Any]:
    return {k: info[k] for k in ("name", "gguf_file", "gguf_sha256", "weights_sha256", "parameters", "spec") if k in info}


def _store_base_model_build(ctx: StepContext, info: dict[str, Any]) -> None:
    """A local build's identity (SmolLM2: the sha256 of the GGUF it was converted from) in the reproducibility record."""
    if info:
        run_update_reproducibility(run_id=ctx.run_id, extra={"base_model_build": _build_record(info)})


def _publish_base_model_build(ctx: StepContext, info: dict[str, Any]) -> None:
    if info:
        tracking.set_tags(ctx.run.mlflow_run_id, {f"repro.base_model_build.{k}": v for k, v in tracking.flatten(_build_record(info)).items()})


def _scored_rows(ctx: StepContext, scored_set: ScoredSet) -> list[dict[str, Any]]:
    """The scored samples as rows of the run; they replace the generated ones, so generation's cut-off flag is carried over."""
    datasets = _dataset_ids(ctx.run)
    cut_off = scored_set.cut_off if scored_set.cut_off is not None else [None] * len(scored_set.samples)
    return [
        {"dataset_id": datasets[scored_set.dataset], "variant": scored_set.variant, "index": index, "question": s.question,
         "contexts": s.contexts, "ground_truth": s.ground_truth, "answer": s.answer, "cut_off": cut, "scores": scores, "reasons": reasons}
        for index, s, cut, scores, reasons in zip(scored_set.indices, scored_set.samples, cut_off, scored_set.scored.scores,
                                                  scored_set.scored.reasons, strict=True)
    ]


def publish_scores(ctx: StepContext, scored_sets: list[ScoredSet]) -> None:
    """Metrics, fine-tuned - base differences and the per-sample CSVs to MLflow."""
    run = ctx.run
    metrics = run.config["evaluation"]["metrics"]
    for scored_set in scored_sets:
        aggregates = scored_set.scored.aggregate()
        tracking.log_metrics(run.mlflow_run_id, {f"{scored_set.dataset}/{scored_set.variant}/{m}": a["value"] for m, a in aggregates.items()})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{scored_set.dataset}__{scored_set.variant}.csv"
            write_scored_samples_csv(path, samples=_scored_rows(ctx, scored_set), metrics=metrics)
            tracking.log_artifact(run.mlflow_run_id, path, "samples")
    _log_differences(run, scored_sets)


def store_scores(ctx: StepContext, scored_sets: list[ScoredSet]) -> None:
    """Per-sample scores and aggregates to the run."""
    datasets = _dataset_ids(ctx.run)
    for scored_set in scored_sets:
        run_record_samples(run_id=ctx.run_id, samples=_scored_rows(ctx, scored_set))
        run_record_results(run_id=ctx.run_id, results=[
            {"dataset_id": datasets[scored_set.dataset], "variant": scored_set.variant, "metric": m, **agg}
            for m, agg in scored_set.scored.aggregate().items()
        ])
    ctx.output = {"scored": {f"{s.dataset}/{s.variant}": len(s.samples) for s in scored_sets}}


def _log_differences(run: PipelineRun, scored_sets: list[ScoredSet]) -> None:
    """finetuned - base per dataset and metric, where both were measured."""
    means = {(s.dataset, s.variant, m): a["value"] for s in scored_sets for m, a in s.scored.aggregate().items()}
    deltas = {
        f"{ds}/delta/{metric}": value - means[(ds, Variant.BASE, metric)]
        for (ds, variant, metric), value in means.items()
        if variant == Variant.FINETUNED and value is not None and means.get((ds, Variant.BASE, metric)) is not None
    }
    if deltas:
        tracking.log_metrics(run.mlflow_run_id, deltas)


def _dataset_ids(run: PipelineRun) -> dict[str, int]:
    return {d.name: d.pk for d in run.eval_datasets.all()}


def publish_comparisons(ctx: StepContext, compared: Compared) -> None:
    tracking.log_metrics(ctx.run.mlflow_run_id, {
        f"{dataset}/compare/{metric}/{field}": getattr(c, field)
        for dataset, by_metric in compared.comparisons.items() for metric, c in by_metric.items()
        for field in ("delta", "ci_low", "ci_high", "p_value")
    })


def store_comparisons(ctx: StepContext, compared: Compared) -> None:
    """The comparisons to the run, and the promotion gate's decision (MLflow gets its alias from the promote job)."""
    run = ctx.run
    datasets = _dataset_ids(run)
    run_record_comparisons(run_id=run.pk, comparisons=[
        {"dataset_id": datasets[dataset], "metric": metric, "n_pairs": c.n_pairs, "n_excluded": c.n_excluded, "base_mean": c.base_mean,
         "finetuned_mean": c.finetuned_mean, "delta": c.delta, "ci_low": c.ci_low, "ci_high": c.ci_high, "p_value": c.p_value,
         "p_adjusted": c.p_adjusted, "verdict": str(c.verdict),
         "method": {"interval": f"paired bootstrap ({c.ci_method})", "test": "paired permutation test, Holm across metrics",
                    "resamples": c.resamples, "seed": c.seed, "confidence": c.confidence,
                    "power": compared.power.get(dataset, {}).get(metric)}}
        for dataset, by_metric in compared.comparisons.items() for metric, c in by_metric.items()
    ])
    decision = compared.decision
    if decision is not None:
        run_record_promotion(
            run_id=run.pk, model_name=decision.model_name, model_version=decision.model_version, decision=decision.decision,
            alias=decision.alias, reason=decision.reason, automatic=True, by=None,
        )
        ctx.log(f"registry: {decision.model_name}/{decision.model_version} {decision.reason}")
    ctx.output = {"comparisons": sum(len(by_metric) for by_metric in compared.comparisons.values()),
                  **({"decision": decision.decision} if decision else {})}


# --- checkpoint selection: a checkpoint's scores, the choice


def publish_checkpoint_scores(ctx: StepContext, scores: CheckpointScores) -> None:
    """`sel/<metric>` at the checkpoint's step, for every metric measured (MLflow draws the selection curve)."""
    tracking.log_metrics(ctx.run.mlflow_run_id, {f"sel/{m}": v["mean"] for m, v in scores.metrics.items()}, step=scores.step)


def store_checkpoint_scores(ctx: StepContext, scores: CheckpointScores) -> None:
    ctx.output = {"step": scores.step, "metrics": scores.metrics, "samples": scores.samples}


def publish_selection(ctx: StepContext, selection: Selection) -> None:
    tracking.set_tags(ctx.run.mlflow_run_id, {"selection.chosen_step": str(selection.chosen_step), "selection.reason": selection.reason,
                                              "selection.metric": selection.metric, "adapter": f"chosen by selection (step {selection.chosen_step})"})


def store_selection(ctx: StepContext, selection: Selection) -> None:
    """The chosen checkpoint, by reference: generation, scoring, the gate and the registered model use its adapter."""
    ctx.output = {"adapter": f"selection/step-{selection.chosen_step}", "chosen_step": selection.chosen_step, "reason": selection.reason,
                  "metric": selection.metric, "points": selection.points}
    run_note(run_id=ctx.run_id, message=f"selection chose the checkpoint of {selection.reason}")
