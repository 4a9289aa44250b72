"""What the run pages show, computed from the rows: plain data for templates and charts.

Reads only (the writes live in runs/services.py). The live run page reads what a
run records: its RunEvents, its jobs (state, progress, and the figures each step
measured: device, dtype, tokens/s, peak memory, seconds), and `train_history`
entries ({"step", "loss", "learning_rate", "epoch"}, plus "val_loss", "tokens",
"elapsed_seconds", "device" where the trainer adds them). No log line is parsed.
What is not recorded is named, never made up.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db.models import Case, Count, DurationField, ExpressionWrapper, F, FloatField, Max, Prefetch, Q, Value, When
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import Cast
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html
from django.utils.text import Truncator

from .config import flatten_config
from .models import (
    TERMINAL_STATUSES,
    Job,
    JobState,
    PipelineRun,
    RunResult,
    RunStatus,
    SampleResult,
    ScoreComparison,
    ordered_variants,
)
from .selectors import dashboard_related, run_sample_scores

VARIANT_LABELS = {"finetuned": "fine-tuned", "base": "base model", "dataset": "stored answers"}
# These compare the retrieved contexts with the reference contexts: the answer, and so
# the model, plays no part. A difference between base and fine-tuned is always zero.
MODEL_INDEPENDENT_METRICS = frozenset({"non_llm_context_precision", "non_llm_context_recall", "context_precision", "context_recall"})

WORD_RE = re.compile(r"[A-Za-z0-9]+")
# Words too common to count as "the answer found the ground truth's words".
STOP_WORDS = frozenset(
    "a an and are as at be by for from has have in is it its of on or that the this to was were with which who what when where how".split()
)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max((end - start).total_seconds(), 0.0)


# --- live run page -----------------------------------------------------------------


def run_timeline(run: PipelineRun, *, now: datetime | None = None) -> list[dict[str, Any]]:
    """Each status the run went through: when it began and how long it lasted (the current one: so far)."""
    now = now or timezone.now()
    events = list(run.events.all())
    entries = []
    for i, event in enumerate(events):
        last = i == len(events) - 1
        end = events[i + 1].at if not last else (None if run.is_terminal else now)
        entries.append({
            "status": event.to_status, "at": event.at, "message": event.message, "seconds": _seconds(event.at, end),
            "current": last and not run.is_terminal, "terminal": last and run.is_terminal,
        })
    return entries


def _event_at(run: PipelineRun, status: str) -> datetime | None:
    return next((e.at for e in run.events.all() if e.to_status == status), None)


def _training_job(run: PipelineRun, jobs: list[Job]) -> Job | None:
    """The job that trains (a step the run is `training` during, not a fan-out of one), if the kind has one."""
    graph = run.spec.graph_of(run)
    for job in jobs:
        if graph.has(job.step) and graph.step(job.step).status == RunStatus.TRAINING and not graph.step(job.step).spawned:
            return job
    return None


def _peak_memory(job: Job | None) -> int | None:
    figures = (job.figures or {}) if job else {}
    return figures.get("peak_memory_bytes") or figures.get("peak_rss_bytes")


def _timed_history(run: PipelineRun) -> list[dict[str, Any]]:
    return [h for h in (run.train_history or []) if isinstance(h, dict) and h.get("step") is not None]


def _history_rate(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Steps/s and tokens/s between the first and the latest recorded step (the trainer's own clock), or None."""
    if len(history) < 2 or history[0].get("elapsed_seconds") is None or history[-1].get("elapsed_seconds") is None:
        return None
    first, last = history[0], history[-1]
    span = float(last["elapsed_seconds"]) - float(first["elapsed_seconds"])
    if span <= 0 or last["step"] <= first["step"]:
        return None
    tokens = (last["tokens"] - first["tokens"]) / span if last.get("tokens") is not None and first.get("tokens") is not None else None
    return {"steps_per_second": (last["step"] - first["step"]) / span, "tokens_per_second": tokens, "from": first["step"], "to": last["step"]}


def model_build(job: Job) -> dict[str, Any] | None:
    """The first-use build of a local: model that this job did (runs/step_io.py `build_progress`), as the page shows it:
    its own progress, time and, while it goes, an ETA from its own pace. None when the job built nothing."""
    build = (job.figures or {}).get("model_build")
    if not isinstance(build, dict):
        return None
    step, total, seconds = int(build.get("step") or 0), int(build.get("total") or 0), float(build.get("seconds") or 0.0)
    out = {"model": build.get("model", ""), "step": step, "total": total, "seconds": seconds, "done": bool(build.get("done")),
           "percent": round(100 * step / total) if total else 0, "eta_seconds": None, "eta_basis": ""}
    if not out["done"] and job.state == JobState.RUNNING:
        if step > 0 and seconds > 0 and total:
            out["eta_seconds"] = (total - step) * seconds / step
            out["eta_basis"] = f"the build's own pace: {step} of {total} in {seconds:.0f} s"
        else:
            out["eta_basis"] = "no estimate yet: the build has just begun"
    return out


def job_timing(job: Job, *, trains: bool, history: list[dict[str, Any]], now: datetime) -> dict[str, Any]:
    """A running job's own ETA, from its own measured pace, and what that pace is:
    a model build: its build steps; a training job: its optimizer steps per second; any other job: its progress over
    the time it has run. {"seconds", "basis", "building", "build"}; seconds is None when nothing is measured yet."""
    build = model_build(job)
    out: dict[str, Any] = {"seconds": None, "basis": "", "pace": "", "building": False, "build": build}
    if job.state != JobState.RUNNING:
        return out
    if build and not build["done"]:
        return {**out, "seconds": build["eta_seconds"], "basis": build["eta_basis"], "pace": "the build's pace", "building": True}
    if trains:
        rate, total = _history_rate(history), (job.figures or {}).get("total_steps")
        if rate and total:
            left = max(int(total) - int(history[-1]["step"]), 0)
            return {**out, "seconds": left / rate["steps_per_second"], "pace": f"at {rate['steps_per_second']:.2f} steps/s",
                    "basis": f"{left} training steps left at {rate['steps_per_second']:.2f} steps/s (steps {rate['from']}-{rate['to']})"}
        return {**out, "basis": "no estimate yet: from the second training step"}
    elapsed = _seconds(job.started_at, now)
    if elapsed and elapsed >= 1 and 0 < job.progress < 1:
        return {**out, "seconds": elapsed * (1 - job.progress) / job.progress, "pace": f"{job.progress:.0%} in {elapsed:.0f} s",
                "basis": f"this job's own pace: {job.progress:.0%} done in {elapsed:.0f} s"}
    return {**out, "basis": "no estimate yet: no progress measured"}


def run_live_stats(run: PipelineRun, *, now: datetime | None = None) -> dict[str, Any]:
    """Elapsed time, speed, ETAs, device and peak memory, from what the run's jobs have recorded so far.

    Two ETAs, each with its basis: the training job's (its own steps/s) and the run's (every stage left, at the
    pace this machine measured: runs/estimates.py), or "no estimate yet"; never a constant. A model build on first
    use is shown as a build (`build`), with its own progress and pace, apart from training.
    `not_recorded` names each figure the run does not record (yet), so the page can say so.
    """
    from .estimates import remaining_for_run

    now = now or timezone.now()
    jobs = list(run.jobs.all())
    training = _training_job(run, jobs)
    figures = (training.figures or {}) if training else {}
    history = _timed_history(run)
    last = history[-1] if history else {}
    stats: dict[str, Any] = {
        "elapsed_seconds": _seconds(run.started_at, run.finished_at or now),
        "steps": int(last["step"]) if last else None, "total_steps": figures.get("total_steps"), "steps_per_second": None,
        "tokens_per_second": None, "speed_basis": "", "eta_seconds": None, "eta_basis": "", "eta_stages": [],
        "training_eta_seconds": None, "training_eta_basis": "", "build": None,
        "device": figures.get("device") or last.get("device") or "", "dtype": figures.get("dtype") or "",
        "peak_memory_bytes": _peak_memory(training), "peak_memory_basis": "", "not_recorded": [],
    }
    if training is not None and training.state == JobState.DONE and figures.get("tokens_per_second"):
        # training finished: the trainer measured its own loop
        stats.update(steps=figures.get("steps", stats["steps"]), total_steps=figures.get("steps"), tokens_per_second=figures["tokens_per_second"],
                     speed_basis="measured by the trainer over its training loop")
        stats["steps_per_second"] = 1 / figures["step_seconds"] if figures.get("step_seconds") else None
    else:
        rate = _history_rate(history)
        if rate:
            stats.update(steps_per_second=rate["steps_per_second"], tokens_per_second=rate["tokens_per_second"],
                         speed_basis="between the first and the latest step")

    if not run.is_terminal:
        own = {job.pk: job_timing(job, trains=job is training, history=history, now=now) for job in jobs}
        stats["build"] = next((t["build"] for t in own.values() if t["building"]), None)
        if training is not None and training.pk in own and not own[training.pk]["building"]:
            stats["training_eta_seconds"], stats["training_eta_basis"] = own[training.pk]["seconds"], own[training.pk]["basis"]
        remaining = remaining_for_run(run, jobs, own=own, now=now)
        stats.update(eta_seconds=remaining["seconds"], eta_basis=remaining["basis"], eta_stages=remaining["stages"])

    if stats["peak_memory_bytes"] is not None:
        stats["peak_memory_basis"] = ("the GPU's peak allocation while training" if figures.get("peak_memory_bytes")
                                      else "the worker's peak resident memory while the training job ran")
    if run.shows.get("training"):
        if not stats["device"]:
            stats["not_recorded"].append("device (recorded with the first training step)")
        if stats["tokens_per_second"] is None:
            stats["not_recorded"].append("tokens/s (from the second training step)")
        if stats["peak_memory_bytes"] is None:
            stats["not_recorded"].append("peak memory (measured when the training job ends)")
    return stats


def run_job_rows(run: PipelineRun, *, now: datetime | None = None) -> list[dict[str, Any]]:
    """The run's jobs for its page: each step (and key) with its state, its own progress and ETA (with the pace it
    comes from), a model build it is doing, attempts, worker, time, speed and the memory it measured."""
    now = now or timezone.now()
    graph = run.spec.graph_of(run)
    jobs = list(run.jobs.all())
    training, history = _training_job(run, jobs), _timed_history(run)
    rows = []
    for job in jobs:
        figures = job.figures or {}
        end = job.finished_at or (now if job.state == JobState.RUNNING else None)
        timing = job_timing(job, trains=job is training, history=history, now=now)
        rows.append({
            "label": job.label, "step_label": graph.step(job.step).label if graph.has(job.step) else job.step, "state": job.state,
            "progress": round(100 * (1.0 if job.state == JobState.DONE else job.progress or 0.0)), "stage": job.stage,
            "eta_seconds": timing["seconds"], "eta_basis": timing["basis"], "eta_pace": timing["pace"], "build": timing["build"],
            "building": timing["building"],
            "attempts": job.attempts, "worker": job.worker, "queue": job.queue or "—", "seconds": _seconds(job.started_at, end),
            "device": figures.get("device", ""), "dtype": figures.get("dtype", ""), "peak_memory_bytes": _peak_memory(job),
            "peak_rss_bytes": figures.get("peak_rss_bytes"), "rss_growth_bytes": figures.get("rss_growth_bytes"),
            "gpu_peak_bytes": figures.get("peak_memory_bytes"),
            "speed": (f"{figures['tokens_per_second']:.0f} tokens/s" if figures.get("tokens_per_second")
                      else f"{figures['answers_per_second']:.2f} answers/s" if figures.get("answers_per_second")
                      else f"{figures['samples_per_second']:.2f} answers scored/s" if figures.get("samples_per_second") else ""),
            "error": job.error, "child": job.child_id,
        })
    return rows


def run_sections_key(run: PipelineRun) -> str:
    """What the run page's late sections (data check, playground, registry card) depend on, as one string: the page
    sends its key with each poll, and the status fragment sends the sections along when the key has changed."""
    return f"{run.status}:{int(bool(run.data_check))}:{run.registered_model_name}:{run.registered_model_version}"


def mlflow_ui_links(run: PipelineRun) -> dict[str, str]:
    """Links into the MLflow UI: MLFLOW_UI_URL, an http tracking server, or the local `make mlflow-ui`.

    `needs_local_ui` is set when the link only works once `make mlflow-ui` runs.
    """
    tracking = settings.MLFLOW_TRACKING_URI
    ui = settings.MLFLOW_UI_URL or (tracking if tracking.startswith("http") else "")
    links: dict[str, str] = {}
    if not ui and tracking.startswith("sqlite:"):
        ui, links["needs_local_ui"] = "http://127.0.0.1:5000", "make mlflow-ui"
    ui = ui.rstrip("/")
    if ui and run.mlflow_run_id:
        links["run"] = f"{ui}/#/experiments/{run.mlflow_experiment_id}/runs/{run.mlflow_run_id}"
    if ui and run.registered_model_name:
        links["model"] = f"{ui}/#/models/{run.registered_model_name}/versions/{run.registered_model_version}"
    return links


def default_run_plan() -> dict[str, Any] | None:
    """What the default fine-tune (configs/finetune_rag_qa.yaml, `make run`) has to do and how long it takes here, from
    this machine's measured paces (runs/estimates.py): the dashboard's first-run invitation. None if the file will not load."""
    from .config import ConfigError, parse_yaml, validate_config
    from .estimates import plan_for_config

    path = settings.BASE_DIR / "configs" / "finetune_rag_qa.yaml"
    try:
        config = validate_config(parse_yaml(path.read_text(encoding="utf-8"), source=str(path)))
    except (OSError, ConfigError):
        return None
    return {"base_model": config["model"]["base"], **plan_for_config(config)}


# --- results page ------------------------------------------------------------------


def score_tables(run: PipelineRun) -> list[dict[str, Any]]:
    """Per eval dataset: one row per metric with each variant's cell, the difference, whether the model
    matters, and the paired comparison (ScoreComparison: CI, adjusted p, verdict) where one was made."""
    by_dataset: dict[str, dict[str, dict[str, Any]]] = {}
    variants: set[str] = set()
    for result in RunResult.objects.filter(run=run).select_related("dataset").order_by("dataset__name", "metric"):
        name = result.dataset.name if result.dataset else ""
        row = by_dataset.setdefault(name, {}).setdefault(result.metric, {
            "metric": result.metric, "cells": {}, "delta": None, "model_independent": result.metric in MODEL_INDEPENDENT_METRICS,
        })
        row["cells"][result.variant] = {
            "value": result.value, "n_scored": result.n_scored, "n_failed": result.n_failed, "failure_reasons": result.failure_reasons or {},
        }
        variants.add(result.variant)
    comparisons = {
        (c.dataset.name if c.dataset else "", c.metric): c for c in ScoreComparison.objects.filter(run=run).select_related("dataset")
    }
    order = {m: i for i, m in enumerate((run.config.get("evaluation") or {}).get("metrics", []))}
    tables = []
    for name, rows in sorted(by_dataset.items()):
        for row in rows.values():
            row["comparison"] = comparisons.get((name, row["metric"]))
            base, tuned = row["cells"].get("base"), row["cells"].get("finetuned")
            if base and tuned and base["value"] is not None and tuned["value"] is not None:
                row["delta"] = tuned["value"] - base["value"]
        tables.append({"dataset": name, "rows": sorted(rows.values(), key=lambda r: (order.get(r["metric"], len(order)), r["metric"]))})
    return [{**t, "variants": ordered_variants(variants)} for t in tables]


def results_chart(tables: list[dict[str, Any]]) -> dict[str, Any]:
    """{dataset: {"metrics": [...], "variants": {variant: [value or None per metric]}}}: one small chart per metric."""
    chart: dict[str, Any] = {}
    for table in tables:
        metrics = [row["metric"] for row in table["rows"]]
        chart[table["dataset"]] = {
            "metrics": metrics,
            "variants": {v: [(row["cells"].get(v) or {}).get("value") for row in table["rows"]] for v in table["variants"]},
            "model_independent": [row["model_independent"] for row in table["rows"]],
            # fine-tuned − base with the paired comparison's 95% interval: the error bars of the difference chart
            "differences": [{"metric": row["metric"], "delta": row["comparison"].delta, "ci_low": row["comparison"].ci_low,
                             "ci_high": row["comparison"].ci_high, "verdict": row["comparison"].verdict, "n_pairs": row["comparison"].n_pairs}
                            for row in table["rows"] if row.get("comparison") is not None and not row["model_independent"]],
        }
    return chart


def highlight(answer: str, ground_truth: str) -> list[tuple[str, bool]]:
    """The answer cut into (text, found) pieces: `found` for a word that the ground truth also has.

    Words are split the way ROUGE's default tokenizer splits them (lowercased runs of
    letters and digits); very common words are not marked.
    """
    truth = {w.lower() for w in WORD_RE.findall(ground_truth or "")} - STOP_WORDS
    pieces: list[tuple[str, bool]] = []
    position = 0
    for match in WORD_RE.finditer(answer or ""):
        if match.start() > position:
            pieces.append((answer[position:match.start()], False))
        pieces.append((match.group(), match.group().lower() in truth))
        position = match.end()
    if position < len(answer or ""):
        pieces.append((answer[position:], False))
    return pieces


def marked_html(pieces: list[tuple[str, bool]]) -> str:
    """The answer as HTML, each found word in <mark>: one string rather than a template loop over every word."""
    layout = "".join("<mark>{}</mark>" if found else "{}" for _, found in pieces)
    return format_html(layout, *(text for text, _ in pieces))  # every piece escaped


SAMPLE_SORTS = {
    "": "dataset order",
    "wins": "biggest gains first (fine-tuned − base)",
    "losses": "biggest losses first (fine-tuned − base)",
    "score_asc": "lowest score first",
    "score_desc": "highest score first",
}
LEGACY_SORT_RE = re.compile(r"^(?P<metric>[a-z_]+):(?P<variant>finetuned|base|dataset)$")
SAMPLE_FILTERS = {"": "all samples", "better": "fine-tuned better", "worse": "fine-tuned worse", "same": "no change", "unmeasured": "not measured"}


def sample_rows(
    run: PipelineRun, *, dataset: str = "", metric: str = "", sort: str = "", show: str = "", variant: str = "", details: bool = True
) -> dict[str, Any]:
    """Samples with every variant's answer side by side, the ground truth's words marked, and the per-sample difference.

    `metric` picks the score that sorting and filtering use (default: the first
    configured metric that depends on the model); the difference is fine-tuned − base;
    the score sorts use `variant` (default: the run's main one).

    The database orders and filters the samples (one row per eval row; to sort or filter
    on scores, with its fine-tuned, base and sorted-by scores of that one metric and their
    difference), so a page reads only the rows it shows. With `details=False`, "rows" is
    that query (dicts with dataset__name and index) for the view to paginate, and
    `sample_details` fills in the rows of the page; a run with thousands of samples
    shows ten at a time, and reading and marking every answer cost over a second.
    """
    samples = SampleResult.objects.filter(run=run).order_by()
    metrics = list((run.config.get("evaluation") or {}).get("metrics", []))
    if metric not in metrics:
        metric = next((m for m in metrics if m not in MODEL_INDEPENDENT_METRICS), metrics[0] if metrics else "")
    counts = list(samples.values("dataset__name", "variant").annotate(
        recorded=Count("pk", filter=Q(cut_off__isnull=False)), cut=Count("pk", filter=Q(cut_off=True))))
    present = {(c["dataset__name"], c["variant"]) for c in counts}
    datasets = sorted({name for name, _ in present if name})
    variants = {v for name, v in present if not dataset or name == dataset}
    variant_list = ordered_variants(variants)
    paired = "finetuned" in variants and "base" in variants
    main = run.main_variant if run.main_variant in variants else (variant_list[0] if variant_list else "")
    scored = variant if variant in variants else main

    score: Any = Value(None, output_field=FloatField())
    if metric:  # a JSON null is not measured (SQLite's text extraction would cast it to 0.0)
        score = Case(When(**{f"scores__{metric}": None}, then=score), default=Cast(KeyTextTransform(metric, "scores"), FloatField()))

    def score_of(which: str):  # one sample per (eval row, variant): the max is that sample's score
        return Max(Case(When(variant=which, then=score), output_field=FloatField()))

    keys = (samples.filter(dataset__name=dataset) if dataset else samples).values("dataset__name", "index")
    in_order = (F("dataset__name").asc(nulls_last=True), "index")
    if sort in SAMPLE_SORTS and sort or show in ("better", "worse", "same", "unmeasured"):
        keys = keys.annotate(tuned=score_of("finetuned"), base=score_of("base"), score=score_of(scored)).annotate(
            difference=F("tuned") - F("base") if paired else Value(None, output_field=FloatField()))
    else:  # dataset order, every sample: no score needs reading to order or filter
        keys = keys.distinct()
    if show == "better":
        keys = keys.filter(difference__gt=0)
    elif show == "worse":
        keys = keys.filter(difference__lt=0)
    elif show == "same":
        keys = keys.filter(difference=0)
    elif show == "unmeasured":
        keys = keys.filter(difference__isnull=True) if paired else keys.filter(score__isnull=True)
    if sort in ("wins", "losses"):
        keys = keys.order_by(F("difference").desc(nulls_last=True) if sort == "wins" else F("difference").asc(nulls_last=True), *in_order)
    elif sort in ("score_asc", "score_desc"):
        keys = keys.order_by(F("score").desc(nulls_last=True) if sort == "score_desc" else F("score").asc(nulls_last=True), *in_order)
    else:
        keys = keys.order_by(*in_order)
    out = {
        "rows": keys, "has_samples": bool(variants), "variants": variant_list, "metrics": metrics, "metric": metric, "datasets": datasets,
        "paired": paired, "main": main, "scored_variant": scored,
        "sorts": SAMPLE_SORTS if paired else {k: v for k, v in SAMPLE_SORTS.items() if k not in ("wins", "losses")},
        "filters": SAMPLE_FILTERS if paired else {"": "all samples", "unmeasured": "not measured"},
        "max_new_tokens": (run.config.get("evaluation") or {}).get("max_new_tokens"), "cut_offs": cut_off_counts(run, counts),
    }
    if details:
        out["rows"] = sample_details(run, keys, out)
    return out


def cut_off_counts(run: PipelineRun, counts: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """{eval dataset: [{"variant", "label", "cut", "of", "max_new_tokens"}]}: how many answers of each variant the token
    limit cut off, out of those where generation recorded it (none for stored answers or runs from before)."""
    max_new_tokens = (run.config.get("evaluation") or {}).get("max_new_tokens")
    out: dict[str, list[dict[str, Any]]] = {}
    for variant in ordered_variants({c["variant"] for c in counts}):
        for c in sorted((c for c in counts if c["variant"] == variant and c["recorded"]), key=lambda c: c["dataset__name"] or ""):
            out.setdefault(c["dataset__name"] or "", []).append(
                {"variant": variant, "label": VARIANT_LABELS.get(variant, variant), "cut": c["cut"], "of": c["recorded"], "max_new_tokens": max_new_tokens})
    return out


def sample_details(run: PipelineRun, keys, samples: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of `keys` (some of `samples["rows"]`, from sample_rows) as the page shows them, in one query:
    dataset, index, difference, score, question, contexts, ground truth, and per variant (`columns`, in
    `samples["variants"]` order) the answer with the ground truth's words marked, its scores, and whether the token
    limit cut it off (None: not recorded)."""
    rows = [{"dataset": key["dataset__name"] or "", "index": key["index"]} for key in keys]
    by_key = {(row["dataset"], row["index"]): row for row in rows}
    if not by_key:
        return rows
    metrics, metric = samples["metrics"], samples["metric"]
    names = {name for name, _ in by_key}
    in_datasets = Q(dataset__name__in=[n for n in names if n]) | (Q(dataset__isnull=True) if "" in names else Q(pk__in=[]))
    qs = SampleResult.objects.filter(in_datasets, run=run, index__in={index for _, index in by_key}).select_related("dataset")
    for sample in qs.order_by("dataset__name", "index", "variant"):
        row = by_key.get((sample.dataset.name if sample.dataset else "", sample.index))
        if row is None:
            continue
        row.setdefault("question", sample.question)
        row.setdefault("contexts", sample.contexts or [])
        row.setdefault("ground_truth", sample.ground_truth)
        pieces = highlight(sample.answer, sample.ground_truth)
        row.setdefault("answers", {})[sample.variant] = {
            "text": sample.answer, "pieces": pieces, "marked": marked_html(pieces), "cut_off": sample.cut_off,
            "scores": [{"metric": m, "value": (sample.scores or {}).get(m), "reason": (sample.reasons or {}).get(m, "")} for m in metrics],
            "score": (sample.scores or {}).get(metric),
        }
    for row in rows:
        answers = row.setdefault("answers", {})
        tuned, base = (answers.get("finetuned") or {}).get("score"), (answers.get("base") or {}).get("score")
        row["difference"] = tuned - base if samples["paired"] and tuned is not None and base is not None else None
        row["score"] = (answers.get(samples["scored_variant"]) or {}).get("score")
        row["columns"] = [{"variant": v, "label": VARIANT_LABELS[v], **answers[v]} if v in answers else {"variant": v, "label": VARIANT_LABELS[v], "missing": True}
                          for v in samples["variants"]]
    return rows


# --- compare page ------------------------------------------------------------------


def _shown(value: Any) -> str:
    if value is None:
        return "—"
    return value if isinstance(value, str) else json.dumps(value)


def _applies(field: str, run: PipelineRun) -> bool:
    """Whether a config field plays a part in the run (its kind says: an eval-only run trains and promotes nothing,
    and a run that scores stored answers generates nothing)."""
    return run.spec.config_applies(field, run.config)


def config_differences(runs: list[PipelineRun]) -> list[dict[str, Any]]:
    """The config fields whose values differ between the runs they apply to.

    A field absent from one config and null in another is no difference; a field a
    run does not use (`_applies`) is left out of the comparison and shows "n/a".
    """
    flat = [flatten_config(run.config) for run in runs]
    fields = sorted({k for f in flat for k in f})
    diff = []
    for field in fields:
        applies = [_applies(field, run) for run in runs]
        values = [f.get(field) for f in flat]
        compared = {json.dumps(v, sort_keys=True) for v, a in zip(values, applies, strict=True) if a}
        if len(compared) > 1:
            diff.append({"field": field, "values": [_shown(v) if a else "n/a" for v, a in zip(values, applies, strict=True)]})
    return diff


def _recorded_sha256(run: PipelineRun, dataset: str) -> str:
    """The eval dataset's sha256 in the run's reproducibility record ("" when not recorded)."""
    entry = ((run.reproducibility or {}).get("datasets") or {}).get(dataset)
    if isinstance(entry, dict):
        entry = entry.get("sha256")
    return entry if isinstance(entry, str) else ""


def paired_with_reference(runs: list[PipelineRun]) -> dict[str, Any]:
    """Each run after the first against the first (the reference), on every eval dataset and metric both scored.

    Main-variant per-sample scores are paired by row index and compared with
    evaluation/significance.py: one Holm family per (run, dataset), across the
    metrics both scored; delta = other - reference, so `better` means the other
    run scored higher. A dataset whose sha256 differs between the two
    reproducibility records is not paired (a refusal naming it); where a record
    lacks the dataset the rows are paired unchecked, and a note says so.

    Returns {"reference": run or None, "cells": {(dataset, metric, run pk): cell},
    "refused": {(dataset, run pk): message}, "messages": [refusals], "unchecked": [notes],
    "rows": {(dataset, run pk): the eval row indices that run scored}}.
    A cell: {"n_pairs", "n_excluded", "delta", "ci_low", "ci_high", "interval", "p_adjusted",
    "p_text", "verdict", "verdict_class"}.
    """
    out: dict[str, Any] = {"reference": runs[0] if len(runs) > 1 else None, "cells": {}, "refused": {}, "messages": [], "unchecked": [],
                           "rows": {}}
    if len(runs) < 2:
        return out
    from evaluation.significance import compare_metrics, format_interval, format_p_value, pair_by_index

    reference, others = runs[0], runs[1:]
    main = SampleResult.objects.filter(run=reference, variant=reference.main_variant)
    datasets = sorted({name for name in main.values_list("dataset__name", flat=True).distinct() if name})
    for dataset in datasets:
        mine = run_sample_scores(reference, dataset_name=dataset, variant=reference.main_variant)
        if not mine:
            continue
        out["rows"][(dataset, reference.pk)] = frozenset(i for scores in mine.values() for i in scores)
        for other in others:
            theirs = run_sample_scores(other, dataset_name=dataset, variant=other.main_variant)
            if theirs:
                out["rows"][(dataset, other.pk)] = frozenset(i for scores in theirs.values() for i in scores)
            metrics = sorted(set(mine) & set(theirs))
            if not metrics:
                continue
            ref_sha, other_sha = _recorded_sha256(reference, dataset), _recorded_sha256(other, dataset)
            if ref_sha and other_sha and ref_sha != other_sha:
                message = (f"#{other.pk} {other.name} is not paired with #{reference.pk} {reference.name} on {dataset}: "
                           f"they scored different versions of {dataset} (sha256 {other_sha[:12]}… vs {ref_sha[:12]}…).")
                out["refused"][(dataset, other.pk)] = message
                out["messages"].append(message)
                continue
            if not (ref_sha and other_sha):
                missing = " and ".join(f"#{r.pk}" for r, sha in ((reference, ref_sha), (other, other_sha)) if not sha)
                out["unchecked"].append(f"{dataset}: the reproducibility record of {missing} has no sha256 for it, "
                                        f"so #{other.pk} and #{reference.pk} are paired by row without checking they scored the same file.")
            compared = compare_metrics({m: pair_by_index(mine[m], theirs[m]) for m in metrics})
            for metric, c in compared.items():
                verdict = str(c.verdict) if c.verdict is not None else ""
                out["cells"][(dataset, metric, other.pk)] = {
                    "n_pairs": c.n_pairs, "n_excluded": c.n_excluded, "delta": c.delta, "ci_low": c.ci_low, "ci_high": c.ci_high,
                    "interval": format_interval(c.delta, c.ci_low, c.ci_high), "p_adjusted": c.p_adjusted,
                    "p_text": format_p_value(c.p_adjusted), "verdict": verdict, "verdict_class": "verdict-" + verdict.replace(" ", "-"),
                }
    return out


def _row_span(rows: frozenset[int]) -> str:
    """0-9 for ten rows in a row, else their count."""
    return f"rows {min(rows)}-{max(rows)}" if rows and max(rows) - min(rows) + 1 == len(rows) else f"{len(rows)} chosen rows"


def different_rows(runs: list[PipelineRun], rows: dict[tuple[str, int], frozenset[int]], counts: dict[tuple[str, int], int]) -> list[str]:
    """A warning per eval dataset that the runs scored on different rows (a different number, or other rows):
    their means are then not comparable, and only the paired row (the rows both scored) compares like with like.

    `rows`: the row indices each run scored (from its samples); `counts`: rows per run from its results, where
    a run kept no samples.
    """
    warnings = []
    for dataset in sorted({d for d, _ in (*rows, *counts)}):
        seen = {run.pk: rows.get((dataset, run.pk)) for run in runs if (dataset, run.pk) in rows or (dataset, run.pk) in counts}
        sizes = {pk: len(r) if r is not None else counts[(dataset, pk)] for pk, r in seen.items()}
        known = [r for r in seen.values() if r is not None]
        if len(sizes) < 2 or (len(set(sizes.values())) == 1 and len(set(known)) <= 1):
            continue
        parts = [f"#{pk} {sizes[pk]} row{'s' if sizes[pk] != 1 else ''}" + (f" ({_row_span(seen[pk])})" if seen[pk] else "") for pk in sizes]
        warnings.append(f"{dataset}: these runs scored different rows ({', '.join(parts)}). Their means are over different questions and "
                        "do not compare; the paired row below uses only the rows both runs scored.")
    return warnings


def compare_data(runs: list[PipelineRun]) -> dict[str, Any]:
    """Scores of several runs side by side (base kept beside fine-tuned, with the rows each mean is over), each run's
    paired difference from the first run, the reference (`paired_with_reference`), a warning where the runs scored
    different rows, charts (means; paired differences with their 95% intervals), loss curves, config differences.

    No run is called "best" on unpaired means: the paired verdict says which scored higher, and only a verdict is
    coloured. The runs come with their results and comparisons prefetched (`compare_queryset`).
    """
    keys = sorted({(r.dataset.name if r.dataset else "", r.metric) for run in runs for r in run.results.all()})
    variants = ordered_variants(r.variant for run in runs for r in run.results.all())
    paired = paired_with_reference(runs)
    counts: dict[tuple[str, int], int] = {}
    rows = []
    for dataset, metric in keys:
        cells = []
        for run in runs:
            results = {r.variant: r for r in run.results.all() if (r.dataset.name if r.dataset else "") == dataset and r.metric == metric}
            values = {variant: r.value for variant, r in results.items()}
            main = run.main_variant
            delta = values["finetuned"] - values["base"] if values.get("finetuned") is not None and values.get("base") is not None else None
            own = next((c for c in run.comparisons.all() if (c.dataset.name if c.dataset else "") == dataset and c.metric == metric), None)
            n = (results[main].n_scored + results[main].n_failed) if main in results else None
            if n is not None:
                counts[(dataset, run.pk)] = max(counts.get((dataset, run.pk), 0), n)
            cells.append({"main": main, "value": values.get(main), "base": values.get("base") if main != "base" else None,
                          "delta": delta, "values": values, "verdict": own.verdict if own and delta is not None else "",
                          "n": results[main].n_scored if main in results else None})
        for run, cell in zip(runs, cells, strict=True):
            cell["paired"] = paired["cells"].get((dataset, metric, run.pk))
            cell["refused"] = (dataset, run.pk) in paired["refused"]
            cell["reference"] = run is paired["reference"]
        rows.append({
            "dataset": dataset, "metric": metric, "cells": cells, "model_independent": metric in MODEL_INDEPENDENT_METRICS,
            "has_base": any(c["base"] is not None for c in cells), "has_delta": any(c["delta"] is not None for c in cells),
            "has_paired": any(c["paired"] or c["refused"] for c in cells),
        })
        row = rows[-1]
        row["rowspan"] = 1 + row["has_base"] + (row["has_base"] and row["has_delta"]) + row["has_paired"]
    labels = [f"#{run.pk} {run.name}" for run in runs]
    chart = {
        "runs": labels,
        "panels": [{"title": f"{row['dataset']} · {row['metric']}", "values": {v: [c["values"].get(v) for c in row["cells"]] for v in variants},
                    "n": [c["n"] for c in row["cells"]]} for row in rows],
    }
    differences = [row for row in rows if not row["model_independent"] and any(c["paired"] for c in row["cells"])]
    paired_chart = {
        "reference": labels[0] if paired["reference"] else "",
        "categories": [f"{row['dataset']} · {row['metric']}" for row in differences],
        "runs": [{"run": label, "delta": [(row["cells"][i]["paired"] or {}).get("delta") for row in differences],
                  "low": [(row["cells"][i]["paired"] or {}).get("ci_low") for row in differences],
                  "high": [(row["cells"][i]["paired"] or {}).get("ci_high") for row in differences],
                  "verdict": [(row["cells"][i]["paired"] or {}).get("verdict", "") for row in differences],
                  "n_pairs": [(row["cells"][i]["paired"] or {}).get("n_pairs") for row in differences]}
                 for i, label in enumerate(labels) if i > 0],
    }
    losses = [{"run": f"#{run.pk} {run.name}", "steps": [h["step"] for h in run.train_history if isinstance(h, dict) and h.get("loss") is not None],
               "loss": [h["loss"] for h in run.train_history if isinstance(h, dict) and h.get("loss") is not None]}
              for run in runs if run.train_history]
    return {"runs": runs, "mains": [VARIANT_LABELS[run.main_variant] for run in runs], "rows": rows, "chart": chart, "losses": losses,
            "paired_chart": paired_chart, "diff": config_differences(runs), "reference": paired["reference"],
            "pairing_refused": paired["messages"], "pairing_unchecked": paired["unchecked"],
            "different_rows": different_rows(runs, paired["rows"], counts)}


def compare_queryset(qs):
    return qs.prefetch_related(Prefetch("results", queryset=RunResult.objects.select_related("dataset")),
                               Prefetch("comparisons", queryset=ScoreComparison.objects.select_related("dataset")))


# --- dashboard ---------------------------------------------------------------------

DASHBOARD_SORTS = {
    "-created": "newest first", "created": "oldest first", "name": "name A→Z", "-name": "name Z→A",
    "-duration": "longest first", "duration": "shortest first", "status": "status",
}


def dashboard_order(qs, *, search: str = "", sort: str = "-created"):
    """The dashboard's runs whose name contains `search`, in one of DASHBOARD_SORTS (runs not started sort last by duration)."""
    if search:
        qs = qs.filter(name__icontains=search)
    if sort in ("duration", "-duration"):
        qs = qs.annotate(took=ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField()))
        took = F("took").desc(nulls_last=True) if sort == "-duration" else F("took").asc(nulls_last=True)
        return qs.order_by(took, "-created_at", "-id")
    fields = {"-created": ("-created_at", "-id"), "created": ("created_at", "id"), "name": ("name", "-id"), "-name": ("-name", "-id"),
              "status": ("status", "-created_at", "-id")}
    return qs.order_by(*fields.get(sort, fields["-created"]))


def headline(run: PipelineRun, limit: int = 2, *, results: list[tuple[str, str, str, float | None, str]] | None = None) -> list[dict[str, Any]]:
    """Up to `limit` metrics of the run's first eval dataset: the main variant's score and, for a fine-tune, its gain over
    base with the paired comparison's verdict (what the page colours: never the sign of a bare difference).

    `results`: the run's (dataset name, metric, variant, value, verdict) rows (`selectors.dashboard_related`);
    without them, the run's prefetched results and comparisons. Model-independent metrics come last.
    """
    if results is None:
        verdicts = {(c.dataset.name if c.dataset else "", c.metric): c.verdict for c in run.comparisons.all()}
        results = [(r.dataset.name if r.dataset else "", r.metric, r.variant, r.value, verdicts.get((r.dataset.name if r.dataset else "", r.metric), ""))
                   for r in run.results.all()]
    if not results:
        return []
    first = min(row[0] for row in results)
    values = {(metric, variant): value for dataset, metric, variant, value, _ in results if dataset == first}
    verdicts = {metric: verdict for dataset, metric, _, _, verdict in results if dataset == first and verdict}
    main = run.main_variant
    configured = [m for m in (run.config.get("evaluation") or {}).get("metrics", []) if (m, main) in values]
    configured.sort(key=lambda m: m in MODEL_INDEPENDENT_METRICS)
    out = []
    for metric in configured[:limit]:
        value, base = values.get((metric, main)), values.get((metric, "base"))
        delta = value - base if main == "finetuned" and value is not None and base is not None else None
        out.append({
            "metric": metric, "value": value, "variant": VARIANT_LABELS[main], "dataset": first, "delta": delta,
            "verdict": verdicts.get(metric, "") if delta is not None else "", "model_independent": metric in MODEL_INDEPENDENT_METRICS,
        })
    return out


def dashboard_rows(runs: list[PipelineRun], *, now: datetime | None = None) -> list[dict[str, Any]]:
    """What each dashboard row shows (templates/runs/_run_row.html), worked out here once per page rather than
    by template tags per row: datasets and results in two queries, links, dates, headline scores, duration."""
    now = now or timezone.now()
    related = dashboard_related([run.pk for run in runs])
    rows = []
    for run in runs:
        label = model_label(run)
        created = timezone.template_localtime(run.created_at)
        rows.append({
            "pk": run.pk, "name": run.name, "kind": run.kind, "status": run.status, "progress": run.progress, "stage": run.stage,
            "terminal": run.is_terminal, "retryable": run.is_retryable, "model_label": label, "model_label_short": Truncator(label).chars(40),
            "detail_url": reverse("run-detail", args=[run.pk]), "row_url": "" if run.is_terminal else reverse("run-row", args=[run.pk]),
            "train": related["train"].get(run.pk, []), "eval": related["eval"].get(run.pk, []),
            "heads": headline(run, results=related["results"].get(run.pk, [])),
            "created_iso": created.isoformat(), "created_text": date_format(created, "M j, H:i"),  # the date filter's "c" is isoformat()
            "took": run_duration(run, now=now),
        })
        rows[-1]["results_url"] = reverse("run-results", args=[run.pk]) if rows[-1]["heads"] else ""
    return rows


def run_duration(run: PipelineRun, *, now: datetime | None = None) -> float | None:
    """Seconds from start to finish, or so far for a run still going."""
    if run.started_at is None:
        return None
    return _seconds(run.started_at, run.finished_at or (None if run.status in TERMINAL_STATUSES else now or timezone.now()))


def model_label(run: PipelineRun) -> str:
    """What produced the answers: the base model's name, or "stored answers" for an eval-only run that scores a file's answers."""
    return run.spec.model_label(run.config, run.base_model)


# --- checkpoint selection -------------------------------------------------------------


def selection_summary(run: PipelineRun) -> dict[str, Any] | None:
    """What selection did (from the run's jobs, prefetched or not): the metric, each scored checkpoint's mean with its
    interval and rows, the loss at that step, the chosen step and why. None for a run without selection."""
    selection = (run.config or {}).get("selection")
    if not selection:
        return None
    jobs = list(run.jobs.all())
    metric = selection.get("metric")
    losses = {h["step"]: h.get("loss") for h in (run.train_history or []) if isinstance(h, dict) and "step" in h}
    points = []
    for job in jobs:
        if job.step != "score_checkpoint":
            continue
        step = (job.payload or {}).get("step") or (job.output or {}).get("step")
        measured = ((job.output or {}).get("metrics") or {}).get(metric) or {}
        points.append({
            "step": step, "state": job.state, "mean": measured.get("mean"), "ci_low": measured.get("ci_low"), "ci_high": measured.get("ci_high"),
            "n": measured.get("n"), "n_failed": measured.get("n_failed"), "loss": losses.get(step),
            "reasons": measured.get("failure_reasons") or {}, "error": job.error[:300] if job.error else "",
        })
    chosen = next(((j.output or {}) for j in jobs if j.step == "select" and j.state == JobState.DONE), {})
    return {
        "metric": metric, "every": selection.get("every"), "points": sorted(points, key=lambda p: p["step"] or 0),
        "chosen_step": chosen.get("chosen_step"), "reason": chosen.get("reason", ""),
        "pending": sum(p["state"] in ("queued", "running") for p in points),
    }
