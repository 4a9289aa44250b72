"""Every write to a run goes through here: the API, pages, admin, commands and jobs.

run_transition is the status machine: a compare-and-swap UPDATE so two workers
cannot both win, and one RunEvent per accepted transition. A run's jobs (the
Job rows of its graph, runs/kinds/) are written by the job_* services: added,
claimed with a compare-and-swap on (state, attempts), kept alive, finished,
failed or sent again; the engine (runs/pipeline.py) calls them and derives the
run's status from its jobs. What a step produced is stored with the run_record_*
and run_set_* services.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from typing import Any

from django.db import models, transaction
from django.db.models import F
from django.db.models.functions import Coalesce, Concat
from django.utils import timezone

from datasets_app.selectors import dataset_visible_to, datasets_by_names

from .config import validate_config
from .models import (
    RETRYABLE_STATUSES,
    TERMINAL_STATUSES,
    UNFINISHED_JOB_STATES,
    ExportCheck,
    Job,
    JobState,
    ModelExport,
    PipelineRun,
    PromotionDecision,
    RunEvent,
    RunResult,
    RunStatus,
    SampleResult,
    ScoreComparison,
)

log = logging.getLogger(__name__)

S = RunStatus
MAX_LOG_CHARS = 2_000_000


class InvalidTransition(Exception):
    def __init__(self, run_id: int, from_status: str, to_status: str) -> None:
        self.from_status = from_status
        self.to_status = to_status
        super().__init__(f"run {run_id}: cannot go from '{from_status}' to '{to_status}'")


class RunNotRetryable(InvalidTransition):
    """Only a run that ended failed or cancelled can be retried (HTTP 409 like any refused move)."""

    def __init__(self, run_id: int, status: str) -> None:
        self.from_status = status
        self.to_status = "retry"
        Exception.__init__(self, f"run {run_id} is '{status}': only a failed or cancelled run can be retried")


def allowed_transitions(*, kind: str, status: str) -> frozenset[str]:
    """The status machine of the run's kind (runs/kinds/: each kind declares its path)."""
    from .kinds import KINDS

    spec = KINDS.get(kind)
    return spec.transitions().get(status, frozenset()) if spec else frozenset()


def dataset_name_types(user) -> dict[str, str]:
    """Names and types of the datasets a user may use in a config."""
    return dict(dataset_visible_to(user).values_list("name", "kind"))


def run_create(*, config: dict[str, Any], owner, parent_id: int | None = None) -> PipelineRun:
    """Validate a config, store a pending run with the first jobs of its graph, and send them after commit."""
    from . import pipeline
    from .kinds import kind_named

    validated = validate_config(config, known_datasets=dataset_name_types(owner))
    graph = kind_named(validated["kind"]).graph(validated, has_parent=parent_id is not None)
    with transaction.atomic():
        run = PipelineRun.objects.create(
            name=validated["name"],
            kind=validated["kind"],
            config=validated,
            base_model=validated["model"]["base"],
            owner=owner,
            parent_id=parent_id,
            stage="queued",
        )
        by_name = datasets_by_names(validated["datasets"]["train"] + validated["datasets"]["eval"])
        run.train_datasets.set([by_name[n] for n in validated["datasets"]["train"]])
        run.eval_datasets.set([by_name[n] for n in validated["datasets"]["eval"]])
        RunEvent.objects.create(run=run, from_status=S.PENDING, to_status=S.PENDING, message="created")
        for step in graph.ready([]):
            job_add(run_id=run.pk, step=step.name, queue=step.queue)
        transaction.on_commit(lambda: pipeline.start(run_id=run.pk))
    return run


_RETRY_SUFFIX = re.compile(r" \(retry of #\d+\)$")


def run_retry(*, run_id: int, owner) -> PipelineRun:
    """Start a failed or cancelled run again: a new run from the same config.

    The old run keeps its history; the new one is named "<name> (retry of #<id>)"
    and goes through run_create, so the config is validated again for `owner`
    (a dataset deleted since is refused with a message naming it).
    """
    run = PipelineRun.objects.only("pk", "name", "status", "config").get(pk=run_id)
    if run.status not in RETRYABLE_STATUSES:
        raise RunNotRetryable(run_id, run.status)
    base_name = _RETRY_SUFFIX.sub("", run.name)
    suffix = f" (retry of #{run.pk})"
    config = {**run.config, "name": base_name[: 200 - len(suffix)] + suffix}
    retry = run_create(config=config, owner=owner)
    run_append_logs(run_id=run.pk, text=f"[{timezone.now():%Y-%m-%d %H:%M:%S}] retried as run #{retry.pk}")
    run_append_logs(run_id=retry.pk, text=f"[{timezone.now():%Y-%m-%d %H:%M:%S}] retry of run #{run.pk} ({run.status}), same config")
    return retry


def run_transition(
    *, run_id: int, to: str, message: str = "", expected: str | None = None, error: str = "", also: dict[str, Any] | None = None,
) -> bool:
    """Move a run to `to` if the machine allows it from its current status.

    Returns False when another writer changed the status first (lost the race);
    raises InvalidTransition when the move is not allowed from the current status.
    With `expected`, the move only happens from that status (a job's claim).
    `also` are more fields written by the same UPDATE (the step the run is on).
    """
    run = PipelineRun.objects.only("pk", "kind", "status").get(pk=run_id)
    current = expected or run.status
    if to not in allowed_transitions(kind=run.kind, status=current):
        if expected is not None and run.status != expected:
            return False
        raise InvalidTransition(run_id, current, to)
    now = timezone.now()
    changes: dict[str, Any] = {"status": to}
    if to in TERMINAL_STATUSES:
        changes["finished_at"] = now
        changes["stage"] = to
        if to == S.COMPLETED:
            changes["progress"] = 100
    elif current == S.PENDING:
        changes["started_at"] = now
    if error:
        changes["error"] = error[:20000]
    changes.update(also or {})
    with transaction.atomic():
        updated = PipelineRun.objects.filter(pk=run_id, status=current).update(**changes)
        if not updated:
            return False
        RunEvent.objects.create(run_id=run_id, from_status=current, to_status=to, message=message[:2000])
        if to in TERMINAL_STATUSES:
            _end_jobs(run_id=run_id, status=to, reason=message)
    log.info("run %s: %s -> %s %s", run_id, current, to, message)
    return True


def _end_jobs(*, run_id: int, status: str, reason: str) -> None:
    """A run that ended leaves no job waiting or running; what else ending means (queues, MLflow, a parent)
    happens after commit (pipeline.after_run_ended)."""
    from . import pipeline

    now = timezone.now()
    unfinished = Job.objects.filter(run_id=run_id, state__in=UNFINISHED_JOB_STATES)
    queued = list(unfinished.filter(state=JobState.QUEUED).values_list("pk", "queue"))
    if status == S.FAILED:
        unfinished.filter(state=JobState.RUNNING).update(state=JobState.FAILED, finished_at=now, error=reason[:20000])
    unfinished.update(state=JobState.CANCELLED, finished_at=now)
    transaction.on_commit(lambda: pipeline.after_run_ended(run_id=run_id, status=status, queued=queued))


def run_transition_or_raise(*, run_id: int, to: str, message: str = "") -> None:
    """For callers outside jobs (API, admin): a lost race is reported like an invalid move."""
    if not run_transition(run_id=run_id, to=to, message=message):
        current = PipelineRun.objects.values_list("status", flat=True).get(pk=run_id)
        raise InvalidTransition(run_id, current, to)


def run_append_logs(*, run_id: int, text: str) -> None:
    """Append to a run's logs in one UPDATE (never a read-modify-write race)."""
    if not text:
        return
    if not text.endswith("\n"):
        text += "\n"
    PipelineRun.objects.filter(pk=run_id).update(logs=Concat(models.F("logs"), models.Value(text[-MAX_LOG_CHARS:])))


def run_update_progress(
    *, run_id: int, progress: int | None = None, stage: str | None = None, train_history: list[dict[str, Any]] | None = None,
) -> None:
    """Live state of an unfinished run: progress (0-100), stage text, the training history so far."""
    changes: dict[str, Any] = {}
    if progress is not None:
        changes["progress"] = max(0, min(100, int(progress)))
    if stage is not None:
        changes["stage"] = stage[:200]
    if train_history is not None:
        changes["train_history"] = train_history
    if changes:
        PipelineRun.objects.filter(pk=run_id).exclude(status__in=TERMINAL_STATUSES).update(**changes)


def run_set_train_history(*, run_id: int, train_history: list[dict[str, Any]]) -> None:
    """The final training history, whatever the run's status (a cancelled run keeps its curve)."""
    PipelineRun.objects.filter(pk=run_id).update(train_history=train_history)


def run_cancel(*, run_id: int, message: str = "cancelled by user") -> None:
    """Cancel a run that has not finished: its jobs are cancelled (queued ones come off the queues after
    commit), a running job stops at its next check; a sweep's children are cancelled with it."""
    run_transition_or_raise(run_id=run_id, to=S.CANCELLED, message=message)


def _clean_value(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def run_record_results(*, run_id: int, results: Iterable[dict[str, Any]]) -> list[RunResult]:
    """Upsert aggregate results: one row per (run, dataset, variant, metric)."""
    stored = []
    with transaction.atomic():
        for item in results:
            row, _ = RunResult.objects.update_or_create(
                run_id=run_id,
                dataset_id=item.get("dataset_id"),
                variant=item["variant"],
                metric=item["metric"],
                defaults={
                    "value": _clean_value(item.get("value")),
                    "n_scored": item.get("n_scored", 0),
                    "n_failed": item.get("n_failed", 0),
                    "failure_reasons": item.get("failure_reasons", {}),
                },
            )
            stored.append(row)
    return stored


def run_record_samples(*, run_id: int, samples: Iterable[dict[str, Any]]) -> int:
    """Replace the per-sample rows of the given (dataset, variant) pairs."""
    rows = [SampleResult(run_id=run_id, **sample) for sample in samples]
    with transaction.atomic():
        for dataset_id, variant in {(r.dataset_id, r.variant) for r in rows}:
            SampleResult.objects.filter(run_id=run_id, dataset_id=dataset_id, variant=variant).delete()
        SampleResult.objects.bulk_create(rows, batch_size=500)
    return len(rows)


def run_set_reproducibility(*, run_id: int, record: dict[str, Any]) -> None:
    PipelineRun.objects.filter(pk=run_id).update(reproducibility=record)


def run_update_reproducibility(*, run_id: int, extra: dict[str, Any]) -> None:
    """Add keys to the run's reproducibility record (what a step learns: the base model build, the prompt)."""
    with transaction.atomic():
        run = PipelineRun.objects.select_for_update().only("reproducibility").get(pk=run_id)
        PipelineRun.objects.filter(pk=run_id).update(reproducibility={**(run.reproducibility or {}), **extra})


def run_set_registered_model(*, run_id: int, name: str, version: str) -> None:
    PipelineRun.objects.filter(pk=run_id).update(registered_model_name=name, registered_model_version=version)


def run_set_mlflow_ids(*, run_id: int, experiment_id: str, mlflow_run_id: str) -> bool:
    """The run's MLflow run, set once: False when another job of the run set one first (compare-and-swap)."""
    return bool(PipelineRun.objects.filter(pk=run_id, mlflow_run_id="").update(mlflow_experiment_id=experiment_id, mlflow_run_id=mlflow_run_id))


def run_record_comparisons(*, run_id: int, comparisons: Iterable[dict[str, Any]]) -> list[ScoreComparison]:
    """Replace the run's fine-tuned vs base comparisons: one row per (eval dataset, metric)."""
    rows = [ScoreComparison(run_id=run_id, **{k: _clean_value(v) if isinstance(v, float) else v for k, v in item.items()}) for item in comparisons]
    with transaction.atomic():
        ScoreComparison.objects.filter(run_id=run_id).delete()
        ScoreComparison.objects.bulk_create(rows)
    return rows


def run_record_promotion(
    *, run_id: int, model_name: str, model_version: str, decision: str, alias: str, reason: str, automatic: bool, by=None,
) -> PromotionDecision:
    """One decision about a registered version (the gate's, or staff's by hand)."""
    return PromotionDecision.objects.create(
        run_id=run_id, model_name=model_name, model_version=model_version, decision=decision, alias=alias,
        reason=reason[:5000], automatic=automatic, by=by,
    )


def run_set_data_check(*, run_id: int, report: dict[str, Any]) -> None:
    PipelineRun.objects.filter(pk=run_id).update(data_check=report)


def run_note(*, run_id: int, message: str) -> None:
    """An event of the run that is not a status change (resumed, stopped early): from = to = its status."""
    status = PipelineRun.objects.values_list("status", flat=True).get(pk=run_id)
    RunEvent.objects.create(run_id=run_id, from_status=status, to_status=status, message=message[:2000])




# --- jobs: the rows of a run's graph (runs/kinds/), claimed with compare-and-swap


def job_add(
    *, run_id: int, step: str, queue: str, key: str = "", payload: dict[str, Any] | None = None, child_id: int | None = None,
) -> Job | None:
    """A new job of the run (queued, or waiting for `child_id`); None when that (step, key) exists already."""
    job, created = Job.objects.get_or_create(
        run_id=run_id, step=step, key=key,
        defaults={"queue": queue, "payload": payload or {}, "child_id": child_id, "heartbeat_at": timezone.now(),
                  "state": JobState.WAITING if child_id is not None else JobState.QUEUED},
    )
    return job if created else None


def job_claim(*, job_id: int, worker: str, on_completed_run: bool = False) -> int | None:
    """queued -> running for one more attempt; returns that attempt's number, or None when the job is not
    queued (taken, ended) or its run ended (an on-demand job may also run on a completed run). The attempt
    number is what later writes of this attempt present."""
    now = timezone.now()
    ended = TERMINAL_STATUSES - {S.COMPLETED} if on_completed_run else TERMINAL_STATUSES
    claimed = (
        Job.objects.filter(pk=job_id, state=JobState.QUEUED)
        .exclude(run__status__in=ended)
        .update(state=JobState.RUNNING, attempts=F("attempts") + 1, worker=worker[:200], heartbeat_at=now,
                started_at=Coalesce(F("started_at"), models.Value(now)), error="")
    )
    if not claimed:
        return None
    return Job.objects.values_list("attempts", flat=True).get(pk=job_id)


def _held(job_id: int, attempt: int):
    return Job.objects.filter(pk=job_id, state=JobState.RUNNING, attempts=attempt)


def job_heartbeat(*, job_id: int, attempt: int) -> bool:
    """False when this attempt no longer holds the job (the reaper sent it again, or the run ended)."""
    return bool(_held(job_id, attempt).update(heartbeat_at=timezone.now()))


def job_set_progress(*, job_id: int, attempt: int, fraction: float | None, stage: str) -> None:
    changes: dict[str, Any] = {"heartbeat_at": timezone.now(), "stage": stage[:200]}
    if fraction is not None:
        changes["progress"] = max(0.0, min(1.0, float(fraction)))
    _held(job_id, attempt).update(**changes)


def job_set_checkpoint(*, job_id: int, attempt: int, step: int) -> None:
    """A checkpoint of the running job was stored: a new attempt can resume from `step`."""
    _held(job_id, attempt).update(checkpoint_step=step, heartbeat_at=timezone.now())


def job_set_figures(*, job_id: int, figures: dict[str, Any]) -> None:
    """Figures the job measured (device, dtype, speed, peak memory, seconds), kept whatever its outcome."""
    with transaction.atomic():
        current = Job.objects.select_for_update().values_list("figures", flat=True).get(pk=job_id)
        Job.objects.filter(pk=job_id).update(figures={**(current or {}), **figures})


def job_finish(*, job_id: int, attempt: int, output: dict[str, Any] | None = None) -> bool:
    """running -> done for the attempt that holds it; False when it no longer does."""
    return bool(_held(job_id, attempt).update(
        state=JobState.DONE, progress=1.0, output=output or {}, finished_at=timezone.now(), heartbeat_at=timezone.now(),
    ))


def job_fail(*, job_id: int, attempt: int | None, error: str) -> bool:
    """The job failed (its body raised): running -> failed, for this attempt (any attempt when None)."""
    jobs = _held(job_id, attempt) if attempt is not None else Job.objects.filter(pk=job_id, state__in=UNFINISHED_JOB_STATES)
    return bool(jobs.update(state=JobState.FAILED, error=error[:20000], finished_at=timezone.now()))


def job_end_waiting(*, job_id: int, succeeded: bool, output: dict[str, Any], error: str = "") -> bool:
    """A job that waited for its child run: done when the child completed, failed otherwise."""
    return bool(Job.objects.filter(pk=job_id, state=JobState.WAITING).update(
        state=JobState.DONE if succeeded else JobState.FAILED, output=output, error=error[:20000], progress=1.0,
        finished_at=timezone.now(),
    ))


def job_requeue_lost(*, job_id: int, attempt: int, message: str) -> bool:
    """The attempt's worker was lost: running -> queued (compare-and-swap on the attempt), an event saying so."""
    with transaction.atomic():
        job = Job.objects.select_related("run").filter(pk=job_id).first()
        if job is None or job.run.status in (S.FAILED, S.CANCELLED):
            return False
        if not _held(job_id, attempt).update(state=JobState.QUEUED, heartbeat_at=timezone.now(), worker=""):
            return False
        RunEvent.objects.create(run_id=job.run_id, from_status=job.run.status, to_status=job.run.status, message=message[:2000])
    return True


def job_touch_queued(*, job_id: int) -> None:
    """A queued job sent again: it waits from now (the reaper's grace period starts again)."""
    Job.objects.filter(pk=job_id, state=JobState.QUEUED).update(heartbeat_at=timezone.now())


# --- exports of a completed fine-tune's model (runs/export.py)


def export_record(*, run_id: int, job_id: int, label: str, fields: dict[str, Any], checks: list[dict[str, Any]]) -> ModelExport:
    """An export and the check of each of its forms, stored once by the job that made them (a retried store replaces them)."""
    with transaction.atomic():
        ModelExport.objects.filter(job_id=job_id).delete()
        export = ModelExport.objects.create(run_id=run_id, job_id=job_id, label=label[:100], **fields)
        ExportCheck.objects.bulk_create([ExportCheck(export=export, **check) for check in checks])
    return export


# --- deleting a run


class RunNotDeletable(Exception):
    """A run that cannot be deleted now (HTTP 409), with the reason."""


def run_delete_rows(*, run_id: int) -> None:
    """The run's rows (events, jobs, results, samples, comparisons, decisions, children): one transaction.

    runs/deletion.py calls it after removing the run's files and MLflow run; the checks come first there.
    """
    with transaction.atomic():
        PipelineRun.objects.filter(pk=run_id).delete()


def run_mark_decisions_applied(*, decision_ids: list[int]) -> None:
    """Promotion decisions whose alias and tags MLflow now has."""
    PromotionDecision.objects.filter(pk__in=decision_ids, applied_at__isnull=True).update(applied_at=timezone.now())
