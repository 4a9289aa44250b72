from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db.models import Exists, OuterRef, QuerySet, Subquery, Value
from django.shortcuts import get_object_or_404

from .models import (
    TERMINAL_STATUSES,
    Job,
    JobState,
    PipelineRun,
    PromotionDecision,
    RunResult,
    SampleResult,
    ScoreComparison,
    ordered_variants,
)

if TYPE_CHECKING:
    from .kinds.base import JobView


def run_visible_to(user) -> QuerySet[PipelineRun]:
    """A user's own runs; staff see every run."""
    qs = PipelineRun.objects.all()
    return qs if user.is_staff else qs.filter(owner=user)


def run_status(run_id: int) -> str:
    return PipelineRun.objects.values_list("status", flat=True).get(pk=run_id)


def last_training_throughput(*, base_model: str, device: str | None, before_run: int | None = None, scan: int = 20) -> dict[str, Any] | None:
    """Training tokens/s of the latest completed fine-tune of this base model (on `device` when given), from its fine-tune job's measured figures.

    {"tokens_per_second", "run_id", "device"} or None; looks at the latest `scan` such runs (one query).
    """
    jobs = Job.objects.filter(step="finetune", state=JobState.DONE, run__status="completed", run__base_model=base_model)
    if before_run is not None:
        jobs = jobs.exclude(run_id=before_run)
    for run_id, figures in jobs.order_by("-finished_at").values_list("run_id", "figures")[:scan]:
        speed = (figures or {}).get("tokens_per_second")
        if not speed or (device and figures.get("device") != device):
            continue
        return {"tokens_per_second": float(speed), "run_id": run_id, "device": figures.get("device") or "unknown"}
    return None


def measured_jobs(*, steps: list[str], exclude_run: int | None = None, scan: int = 120) -> list[dict[str, Any]]:
    """The latest finished jobs of these steps on this database's workers, newest first, with what they measured:
    {"step", "run_id", "base_model", "figures", "seconds"} (seconds: the job's wall time, claim to finish).

    The rates a time estimate is built from (runs/estimates.py); one query, at most `scan` rows.
    """
    jobs = Job.objects.filter(step__in=steps, state=JobState.DONE, started_at__isnull=False, finished_at__isnull=False)
    if exclude_run is not None:
        jobs = jobs.exclude(run_id=exclude_run)
    rows = jobs.order_by("-finished_at").values_list("step", "run_id", "run__base_model", "figures", "started_at", "finished_at")[:scan]
    return [{"step": step, "run_id": run_id, "base_model": base_model, "figures": figures or {},
             "seconds": max((finished - started).total_seconds(), 0.0)}
            for step, run_id, base_model, figures, started, finished in rows]


def run_generated_samples(run: PipelineRun, *, dataset_name: str) -> list[SampleResult]:
    """The answers a run generated for one eval dataset, every variant, in row order."""
    return list(SampleResult.objects.filter(run=run, dataset__name=dataset_name).order_by("variant", "index"))


def run_sample_scores(run: PipelineRun, *, dataset_name: str, variant: str) -> dict[str, dict[int, float | None]]:
    """{metric: {row index: score or None}} of one variant of a run on one eval dataset."""
    out: dict[str, dict[int, float | None]] = {}
    for index, scores in SampleResult.objects.filter(run=run, dataset__name=dataset_name, variant=variant).values_list("index", "scores"):
        for metric, value in scores.items():
            out.setdefault(metric, {})[index] = value
    return out


def run_comparisons(run: PipelineRun) -> dict[tuple[str, str], ScoreComparison]:
    """Fine-tuned vs base per (eval dataset name, metric)."""
    return {(c.dataset.name if c.dataset else "", c.metric): c for c in ScoreComparison.objects.filter(run=run).select_related("dataset")}


def run_promotion(run: PipelineRun) -> PromotionDecision | None:
    """The latest decision about the run's registered version (the gate's or staff's)."""
    return PromotionDecision.objects.filter(run=run).select_related("by").order_by("-at", "-id").first()


def run_results_rows(run: PipelineRun) -> Iterator[tuple]:
    """(dataset, variant, metric, value, n_scored, n_failed, then the fine-tuned row's comparison with base) rows, for export.

    The comparison cells (n_pairs, delta, ci_low, ci_high, p_adjusted, verdict) are empty on other rows.
    """
    comparisons = run_comparisons(run)
    for result in RunResult.objects.filter(run=run).select_related("dataset").order_by("dataset__name", "metric", "variant"):
        dataset = result.dataset.name if result.dataset else ""
        c = comparisons.get((dataset, result.metric)) if result.variant == "finetuned" else None
        compared = ("",) * 6 if c is None else tuple("" if v is None else v for v in (c.n_pairs, c.delta, c.ci_low, c.ci_high, c.p_adjusted, c.verdict))
        yield (dataset, result.variant, result.metric, "" if result.value is None else result.value, result.n_scored, result.n_failed, *compared)


def run_score_table(run: PipelineRun) -> list[dict]:
    """One row per (eval dataset, metric): the value of each variant, and finetuned - base.

    Cells: {"value", "n_scored", "n_failed", "failure_reasons"}; delta is None
    unless both base and finetuned were measured.
    """
    table: dict[tuple[str, str], dict] = {}
    for result in RunResult.objects.filter(run=run).select_related("dataset").order_by("dataset__name", "metric"):
        key = (result.dataset.name if result.dataset else "", result.metric)
        row = table.setdefault(key, {"dataset": key[0], "metric": key[1], "variants": {}, "delta": None})
        row["variants"][result.variant] = {
            "value": result.value, "n_scored": result.n_scored, "n_failed": result.n_failed, "failure_reasons": result.failure_reasons,
        }
    for row in table.values():
        base, tuned = row["variants"].get("base"), row["variants"].get("finetuned")
        if base and tuned and base["value"] is not None and tuned["value"] is not None:
            row["delta"] = tuned["value"] - base["value"]
    return list(table.values())


# What a dashboard row shows of the run itself (runs/page_data.py dashboard_rows); the rest comes from dashboard_related.
DASHBOARD_COLUMNS = ("id", "name", "kind", "status", "config", "base_model", "progress", "stage", "created_at", "started_at", "finished_at")


def dashboard_runs(user, *, status: str = "", kind: str = "") -> QuerySet[PipelineRun]:
    """Runs for the dashboard, only the columns a row shows (its datasets and results: `dashboard_related`)."""
    qs = run_visible_to(user).only(*DASHBOARD_COLUMNS)
    if status:
        qs = qs.filter(status=status)
    if kind:
        qs = qs.filter(kind=kind)
    return qs


def dashboard_related(run_ids: list[int]) -> dict[str, dict[int, list]]:
    """The train and eval dataset names and the results of a page of runs, as plain values, in two queries.

    {"train": {run id: [name, ...]}, "eval": {...}, "results": {run id: [(dataset name, metric, variant, value, verdict), ...]}}
    (verdict: the paired comparison's of that dataset and metric, "" when none);
    names in the datasets' own order (kind, name). Plain values rather than prefetched managers:
    a row reads a handful of fields, and building 25 managers and model instances per page cost
    more than the queries themselves.
    """
    out: dict[str, dict[int, list]] = {"train": {}, "eval": {}, "results": {}}
    if not run_ids:
        return out
    train, eval_ = (
        through.objects.filter(pipelinerun_id__in=run_ids).annotate(role=Value(role)).values_list("role", "pipelinerun_id", "dataset__kind", "dataset__name")
        for role, through in (("train", PipelineRun.train_datasets.through), ("eval", PipelineRun.eval_datasets.through))
    )
    for role, run_id, _, name in sorted(train.order_by().union(eval_.order_by(), all=True)):
        out[role].setdefault(run_id, []).append(name)
    # The paired comparison's verdict rides along in the same query: a headline gain is coloured by it, never by its sign.
    verdict = ScoreComparison.objects.filter(run=OuterRef("run"), dataset=OuterRef("dataset"), metric=OuterRef("metric")).values("verdict")[:1]
    results = RunResult.objects.filter(run_id__in=run_ids).order_by().annotate(verdict=Subquery(verdict))
    for run_id, dataset, metric, variant, value, decided in results.values_list("run_id", "dataset__name", "metric", "variant", "value", "verdict"):
        out["results"].setdefault(run_id, []).append((dataset or "", metric, variant, value, decided or ""))
    return out


def run_for_page(user, pk: int, *, related: tuple[str, ...] = ("events", "jobs", "train_datasets", "eval_datasets")) -> PipelineRun:
    """A run for its pages with `related` prefetched (the status fragment needs only its events, the results page none)
    and `has_results` (whether any result is recorded) in the same query."""
    qs = run_visible_to(user).annotate(has_results=Exists(RunResult.objects.filter(run=OuterRef("pk"))))
    return get_object_or_404(qs.prefetch_related(*related), pk=pk)


def mlflow_links(run: PipelineRun) -> dict[str, str]:
    """Links into the MLflow UI when one is reachable by URL (MLFLOW_UI_URL or an http tracking URI)."""
    ui = settings.MLFLOW_UI_URL or (settings.MLFLOW_TRACKING_URI if settings.MLFLOW_TRACKING_URI.startswith("http") else "")
    links: dict[str, str] = {}
    if ui and run.mlflow_run_id:
        links["run"] = f"{ui.rstrip('/')}/#/experiments/{run.mlflow_experiment_id}/runs/{run.mlflow_run_id}"
    if ui and run.registered_model_name:
        links["model"] = f"{ui.rstrip('/')}/#/models/{run.registered_model_name}/versions/{run.registered_model_version}"
    return links


def run_samples_table(run: PipelineRun, *, dataset: str | None, sort: str | None, order: str) -> dict[str, Any]:
    """Samples joined across variants: one row per (eval dataset, index), sortable by a metric.

    sort is "metric" or "metric:variant" (default variant: the run's main one);
    samples without that score sort last.
    """
    qs = SampleResult.objects.filter(run=run).select_related("dataset").order_by("dataset__name", "index", "variant")
    if dataset:
        qs = qs.filter(dataset__name=dataset)
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    variants: list[str] = []
    metrics: list[str] = list((run.config.get("evaluation") or {}).get("metrics", []))
    for sample in qs:
        key = (sample.dataset.name if sample.dataset else "", sample.index)
        row = rows.setdefault(key, {
            "dataset": key[0], "index": sample.index, "question": sample.question, "contexts": sample.contexts,
            "ground_truth": sample.ground_truth, "answers": {}, "scores": {}, "reasons": {}, "cut_off": {},
        })
        row["answers"][sample.variant] = sample.answer
        row["cut_off"][sample.variant] = sample.cut_off
        row["scores"][sample.variant] = sample.scores
        row["reasons"][sample.variant] = sample.reasons
        if sample.variant not in variants:
            variants.append(sample.variant)
    variants = ordered_variants(variants)
    ordered = list(rows.values())
    if sort:
        metric, _, variant = sort.partition(":")
        variant = variant or (variants[0] if variants else "")

        def key(row: dict[str, Any]) -> tuple[int, float]:
            value = row["scores"].get(variant, {}).get(metric)
            if value is None:
                return (1, 0.0)
            return (0, value if order != "desc" else -value)

        ordered.sort(key=key)
    datasets = sorted(SampleResult.objects.filter(run=run).values_list("dataset__name", flat=True).distinct())
    return {"rows": ordered, "variants": variants, "metrics": metrics, "datasets": datasets}


# --- jobs


def job_views(run_id: int) -> list[JobView]:
    """The run's jobs as its graph sees them (runs/kinds/base.py)."""
    from .kinds.base import JobView

    return [JobView(step=step, key=key, state=state, started=attempts > 0)
            for step, key, state, attempts in Job.objects.filter(run_id=run_id).order_by("id").values_list("step", "key", "state", "attempts")]


def run_step_fractions(run_id: int) -> dict[str, float]:
    """{step: progress 0-1} of a run's jobs (a step with several keyed jobs: their mean)."""
    by_step: dict[str, list[float]] = {}
    for step, state, progress in Job.objects.filter(run_id=run_id).values_list("step", "state", "progress"):
        by_step.setdefault(step, []).append(1.0 if state == JobState.DONE else float(progress or 0.0))
    return {step: sum(values) / len(values) for step, values in by_step.items()}


def job_still_held(job_id: int, attempt: int, *, on_completed_run: bool = False) -> str:
    """"" while this attempt holds the running job and its run goes on (or, for an on-demand job, completed); else why not."""
    row = Job.objects.filter(pk=job_id).values_list("state", "attempts", "run__status").first()
    if row is None:
        return f"job {job_id} was deleted"
    state, attempts, status = row
    if status in TERMINAL_STATUSES and not (on_completed_run and status == "completed"):
        return f"run is {status}"
    if state != JobState.RUNNING or attempts != attempt:
        return f"attempt {attempt} no longer holds the job (now {state}, attempt {attempts})"
    return ""


def run_jobs(run: PipelineRun) -> list[Job]:
    """The run's jobs in the order they were created (prefetched ones when the caller prefetched `jobs`)."""
    return list(run.jobs.all())


def run_selection_points(run_id: int, *, metric: str) -> list[dict[str, Any]]:
    """The run's scored checkpoints (done score_checkpoint jobs): {"step", "mean", "ci_low", "ci_high", "n", "n_failed"}
    of `metric`, by step."""
    points = []
    for output in Job.objects.filter(run_id=run_id, step="score_checkpoint", state=JobState.DONE).values_list("output", flat=True):
        measured = (output.get("metrics") or {}).get(metric) or {}
        points.append({"step": output["step"], **{k: measured.get(k) for k in ("mean", "ci_low", "ci_high", "n", "n_failed")}})
    return sorted(points, key=lambda p: p["step"])


def run_adapter_reference(run_id: int) -> str:
    """Where the run's adapter is in its directory and MLflow run: the chosen checkpoint's, or the fine-tune's."""
    chosen = Job.objects.filter(run_id=run_id, step="select", state=JobState.DONE).values_list("output", flat=True).first()
    return (chosen or {}).get("adapter") or "adapter"


def run_sweep_winner(run_id: int) -> int | None:
    """The winning trial (a child run) of a sweep whose pick is done; None otherwise."""
    picked = Job.objects.filter(run_id=run_id, step="pick", state=JobState.DONE).values_list("output", flat=True).first()
    return (picked or {}).get("winner")


def latest_difference_spreads(datasets: list[str], metrics: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """{dataset: {metric: {"sd", "run_id"}}}: the spread of the per-row paired differences (fine-tuned - base) of the
    latest comparison that measured it, for each eval dataset and metric (what the eval set's power is estimated from)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    rows = (ScoreComparison.objects.filter(dataset__name__in=datasets, metric__in=metrics).order_by("-id")
            .values_list("dataset__name", "metric", "run_id", "method")[:2000])
    for dataset, metric, run_id, method in rows:
        spread = ((method or {}).get("power") or {}).get("sd_difference")
        if spread is not None and metric not in out.get(dataset, {}):
            out.setdefault(dataset, {})[metric] = {"sd": spread, "run_id": run_id}
    return out
