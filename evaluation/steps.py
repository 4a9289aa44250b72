"""The generate, score and compare step bodies: answers, their RAGAS scores, fine-tuned vs base.

Called by the step registry (runs/pipeline.py) with a context that carries the
validated config, the eval rows and a few callbacks; they import nothing from
the application and return what they produced (the registry stores it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .samples import Sample

if TYPE_CHECKING:
    from .scoring import ScoredSamples
    from .significance import PairedComparison


@dataclass
class EvalSet:
    """An eval dataset's rows as the run scores them (the first max_samples)."""

    name: str
    rows: list[dict[str, Any]]


@dataclass
class AnswerSet:
    """Answers of one model variant to one eval set, in row order; `cut_off[i]` when answer i used every
    new token it was allowed without reaching a stop token (None: not recorded)."""

    dataset: str
    variant: str
    rows: list[dict[str, Any]]
    answers: list[str]
    cut_off: list[bool] | None = None


@dataclass
class Generated:
    answer_sets: list[AnswerSet]
    prompt_example: str  # exactly what the model was asked for the first eval row
    base_model_info: dict[str, Any]  # what a local build records of itself (SmolLM2: the GGUF's sha256)


@dataclass
class ToScore:
    """One (eval set, variant) to score: samples with their row indices (and, where generation recorded it,
    whether each answer was cut off by the token limit: carried to the scored rows, not scored)."""

    dataset: str
    variant: str
    indices: list[int]
    samples: list[Sample]
    cut_off: list[bool | None] | None = None


@dataclass
class ScoredSet:
    dataset: str
    variant: str
    indices: list[int]
    samples: list[Sample]
    scored: ScoredSamples
    cut_off: list[bool | None] | None = None


class GenerateContext(Protocol):
    config: dict[str, Any]
    base_model: str
    variants: list[str]  # what to generate, in order: "finetuned" (the adapter) and/or "base"

    def eval_sets(self) -> list[EvalSet]: ...
    def adapter_dir(self) -> Path: ...  # the run's adapter on this machine (only asked for "finetuned")
    def progress(self, fraction: float | None, stage: str) -> None: ...
    def log(self, line: str) -> None: ...
    def check_cancelled(self) -> None: ...
    def build_progress(self) -> Callable[[int, int], None]: ...
    def record_figures(self, figures: dict[str, Any]) -> None: ...  # what this step measured (device, speed)


class ScoreContext(Protocol):
    config: dict[str, Any]

    def to_score(self) -> list[ToScore]: ...
    def progress(self, fraction: float | None, stage: str) -> None: ...
    def log(self, line: str) -> None: ...
    def check_cancelled(self) -> None: ...
    def record_figures(self, figures: dict[str, Any]) -> None: ...  # what this step measured (its pace, for time estimates)


def generate_step(ctx: GenerateContext) -> Generated:
    from training.data import render_prompt
    from training.finetune import load_base_model, load_tokenizer
    from training.local_models import local_model_info, resolve_model_path
    from training.precision import pick_device

    from .generation import adapter_disabled, encode_eval_prompts, generate_detailed

    config = ctx.config
    evaluation = config["evaluation"]
    training = config.get("training") or {}
    prompt_format = config["model"].get("prompt_format", "auto")
    ctx.progress(0.0, "loading model for generation")
    base_path = resolve_model_path(ctx.base_model, progress=ctx.build_progress())
    device, dtype = pick_device(training.get("precision", "auto"))
    tokenizer = load_tokenizer(base_path)
    model = load_base_model(base_path, device=device, dtype=dtype)
    if "finetuned" in ctx.variants:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(ctx.adapter_dir()))
    max_seq = training.get("max_seq_length", 512)
    max_prompt = max(16, min(max_seq, getattr(model.config, "max_position_embeddings", max_seq)) - evaluation["max_new_tokens"])

    eval_sets = ctx.eval_sets()
    first = next((s.rows[0] for s in eval_sets if s.rows), None)
    prompt_example = "" if first is None else render_prompt(
        tokenizer, question=first["question"], contexts=first["contexts"], prompt_format=prompt_format, max_prompt_tokens=max_prompt,
    )
    jobs = [(s, v) for s in eval_sets for v in ctx.variants]
    produced: list[AnswerSet] = []
    began = time.monotonic()
    for number, (eval_set, variant) in enumerate(jobs):
        ctx.check_cancelled()
        prompts = encode_eval_prompts(tokenizer, eval_set.rows, max_prompt_tokens=max_prompt, prompt_format=prompt_format)

        def on_batch(done: int, total: int, number: int = number, eval_set: EvalSet = eval_set, variant: str = variant) -> None:
            ctx.progress((number + done / max(total, 1)) / len(jobs), f"generating {variant} answers for {eval_set.name}: {done}/{total}")
            ctx.check_cancelled()

        settings = {"batch_size": evaluation["batch_size"], "max_new_tokens": evaluation["max_new_tokens"], "on_batch": on_batch,
                    "prompt_format": prompt_format}
        if variant == "base" and "finetuned" in ctx.variants:
            with adapter_disabled(model):
                generated = generate_detailed(model, tokenizer, prompts, **settings)
        else:
            generated = generate_detailed(model, tokenizer, prompts, **settings)
        cut_off = [g.cut_off for g in generated]
        produced.append(AnswerSet(dataset=eval_set.name, variant=variant, rows=eval_set.rows, answers=[g.text for g in generated], cut_off=cut_off))
        ctx.log(f"generated {len(generated)} {variant} answers for {eval_set.name}"
                + (f"; {sum(cut_off)} cut off at {evaluation['max_new_tokens']} new tokens" if any(cut_off) else ""))
    seconds = time.monotonic() - began
    answered = sum(len(a.answers) for a in produced)
    ctx.record_figures({"device": device, "dtype": str(dtype).removeprefix("torch."), "answers": answered,
                        "generation_seconds": round(seconds, 3), "answers_per_second": round(answered / seconds, 3) if seconds > 0 else None})
    return Generated(answer_sets=produced, prompt_example=prompt_example, base_model_info=local_model_info(base_path))


def score_step(ctx: ScoreContext) -> list[ScoredSet]:
    from .scoring import score_samples

    evaluation = ctx.config["evaluation"]
    judge = evaluation.get("judge")
    api_key = judge_api_key(judge) if judge else ""
    if judge and not api_key:
        ctx.log(f"note: environment variable {judge['api_key_env']} is not set; calling the judge without an API key")
    groups = ctx.to_score()
    if not groups:
        raise RuntimeError("nothing to score: no samples were generated")
    produced: list[ScoredSet] = []
    began = time.monotonic()
    for number, group in enumerate(groups):
        ctx.check_cancelled()
        ctx.progress(number / len(groups), f"scoring {group.variant} answers for {group.dataset} ({len(group.samples)} samples)")
        scored = score_samples(group.samples, evaluation["metrics"], judge=judge, judge_api_key=api_key)
        produced.append(ScoredSet(dataset=group.dataset, variant=group.variant, indices=group.indices, samples=group.samples, scored=scored,
                                  cut_off=group.cut_off))
        aggregates = scored.aggregate()
        summary = ", ".join(f"{m}={a['value']:.4f}" if a["value"] is not None else f"{m}=not measured" for m, a in aggregates.items())
        failed = {m: a["failure_reasons"] for m, a in aggregates.items() if a["n_failed"]}
        ctx.log(f"scored {group.variant} on {group.dataset}: {summary}" + (f"; not measured: {failed}" if failed else ""))
    seconds, samples = time.monotonic() - began, sum(len(group.samples) for group in groups)
    ctx.record_figures({"samples": samples, "metrics": sorted(evaluation["metrics"]), "scoring_seconds": round(seconds, 3),
                        "samples_per_second": round(samples / seconds, 3) if seconds > 0 else None})
    return produced


def judge_api_key(judge: dict[str, Any]) -> str:
    """The judge's API key, read from the named environment variable at use time (never stored)."""
    return os.environ.get(judge["api_key_env"], "")


class CompareContext(Protocol):
    config: dict[str, Any]

    def paired_scores(self) -> dict[str, dict[str, tuple[list[float | None], list[float | None]]]]: ...
    def progress(self, fraction: float | None, stage: str) -> None: ...
    def log(self, line: str) -> None: ...


def compare_step(ctx: CompareContext) -> dict[str, dict[str, PairedComparison]]:
    """Fine-tuned vs base on the same samples, per eval dataset and metric: paired interval, test, verdict."""
    from .significance import compare_metrics, format_interval

    seed = (ctx.config.get("training") or {}).get("seed", 0)
    ctx.progress(0.0, "comparing fine-tuned with base: paired bootstrap and permutation tests")
    produced = {dataset: compare_metrics(pairs, seed=seed) for dataset, pairs in ctx.paired_scores().items()}
    for dataset, by_metric in produced.items():
        summary = "; ".join(f"{m} {format_interval(c.delta, c.ci_low, c.ci_high)} {c.verdict}" for m, c in by_metric.items())
        ctx.log(f"fine-tuned vs base on {dataset}: {summary}")
    return produced


# --- choosing the checkpoint by scored quality (selection: {metric, every, patience, min_delta, rows})


@dataclass
class CheckpointScores:
    """One checkpoint's selection answers scored: each metric's mean with its interval, and the samples behind it."""

    step: int
    metrics: dict[str, dict[str, Any]]  # {metric: {"mean", "ci_low", "ci_high", "n", "n_failed", "failure_reasons"}}
    samples: list[dict[str, Any]]  # each selection row's answer and its scores and reasons


class ScoreCheckpointContext(Protocol):
    config: dict[str, Any]
    payload: dict[str, Any]  # {"step", "samples": [{"index", "question", "contexts", "ground_truth", "answer"}]}

    def progress(self, fraction: float | None, stage: str) -> None: ...
    def log(self, line: str) -> None: ...
    def check_cancelled(self) -> None: ...


def score_checkpoint_step(ctx: ScoreCheckpointContext) -> CheckpointScores:
    """Score one checkpoint's answers to the selection rows with the same ragas code as the final evaluation."""
    from .scoring import score_samples
    from .selection import mean_interval

    evaluation = ctx.config["evaluation"]
    judge = evaluation.get("judge")
    step, rows = int(ctx.payload["step"]), ctx.payload["samples"]
    ctx.progress(0.0, f"scoring the checkpoint of step {step} on {len(rows)} selection rows")
    samples = [Sample(question=r["question"], contexts=r["contexts"], ground_truth=r["ground_truth"], answer=r["answer"]) for r in rows]
    scored = score_samples(samples, evaluation["metrics"], judge=judge, judge_api_key=judge_api_key(judge) if judge else "")
    seed = (ctx.config.get("training") or {}).get("seed", 0)
    metrics = {}
    for metric, aggregate in scored.aggregate().items():
        metrics[metric] = {**mean_interval([s.get(metric) for s in scored.scores], seed=seed), "failure_reasons": aggregate["failure_reasons"]}
    selected = ctx.config["selection"]["metric"]
    shown = metrics.get(selected, {})
    ctx.log(f"checkpoint of step {step}: {selected} " + (f"{shown['mean']:.4f} [{shown['ci_low']:.4f}, {shown['ci_high']:.4f}]"
                                                        if shown.get("mean") is not None else "not measured") + f" over {shown.get('n', 0)} rows")
    return CheckpointScores(step=step, metrics=metrics, samples=[
        {"index": r["index"], "answer": r["answer"], "scores": s, "reasons": reasons}
        for r, s, reasons in zip(rows, scored.scores, scored.reasons, strict=True)
    ])


@dataclass
class Selection:
    chosen_step: int
    reason: str
    metric: str
    points: list[dict[str, Any]]  # {"step", "mean", "ci_low", "ci_high", "n", "n_failed"} of the selection metric, by step


class SelectContext(Protocol):
    config: dict[str, Any]

    def selection_points(self) -> list[dict[str, Any]]: ...
    def log(self, line: str) -> None: ...


def select_step(ctx: SelectContext) -> Selection:
    """Every checkpoint's scores are in: the chosen one is the highest selection-metric mean (the earlier on a tie)."""
    from .selection import choose

    metric = ctx.config["selection"]["metric"]
    points = sorted(ctx.selection_points(), key=lambda p: p["step"])
    chosen, reason = choose(points, metric=metric)
    ctx.log(f"selection: the adapter of {reason}")
    return Selection(chosen_step=chosen, reason=reason, metric=metric, points=points)
