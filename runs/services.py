"""Every write to a run goes through here: the API, pages, admin, commands and jobs.

run_transition is the status machine of DESIGN.md: a compare-and-swap UPDATE so
two workers cannot both win, and one RunEvent per accepted transition. The step
registry (runs/pipeline.py) moves runs through their steps with run_queue_step,
run_claim_step and run_advance; what a step produced is stored with the
run_record_* and run_set_* services.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from typing import Any

from django.db import models, transaction
from django.db.models.functions import Concat
from django.utils import timezone

from datasets_app.selectors import dataset_visible_to, datasets_by_names

from .config import validate_config
from .models import (
    RETRYABLE_STATUSES,
    TERMINAL_STATUSES,
    PipelineRun,
    PromotionDecision,
    RunEvent,
    RunKind,
    RunResult,
    RunStatus,
    SampleResult,
    ScoreComparison,
)

log = logging.getLogger(__name__)

S = RunStatus
TRANSITIONS: dict[str, dict[str, frozenset[str]]] = {
    RunKind.FINETUNE: {
        S.PENDING: frozenset({S.TRAINING, S.FAILED, S.CANCELLED}),
        S.TRAINING: frozenset({S.EVALUATING, S.FAILED, S.CANCELLED}),
        S.EVALUATING: frozenset({S.COMPLETED, S.FAILED, S.CANCELLED}),
    },
    RunKind.EVAL_ONLY: {
        S.PENDING: frozenset({S.EVALUATING, S.FAILED, S.CANCELLED}),
        S.EVALUATING: frozenset({S.COMPLETED, S.FAILED, S.CANCELLED}),
    },
}
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
    return TRANSITIONS.get(kind, {}).get(status, frozenset())


def dataset_name_types(user) -> dict[str, str]:
    """Names and types of the datasets a user may use in a config."""
    return dict(dataset_visible_to(user).values_list("name", "kind"))


def run_create(*, config: dict[str, Any], owner) -> PipelineRun:
    """Validate a config, store a pending run and send its first step after commit."""
    from . import pipeline

    validated = validate_config(config, known_datasets=dataset_name_types(owner))
    first = pipeline.chain_for(kind=validated["kind"], answers=validated["evaluation"]["answers"])[0]
    with transaction.atomic():
        run = PipelineRun.objects.create(
            name=validated["name"],
            kind=validated["kind"],
            config=validated,
            base_model=validated["model"]["base"],
            owner=owner,
            stage="queued",
            current_job=f"{first.name}:queued",
        )
        by_name = datasets_by_names(validated["datasets"]["train"] + validated["datasets"]["eval"])
        run.train_datasets.set([by_name[n] for n in validated["datasets"]["train"]])
        run.eval_datasets.set([by_name[n] for n in validated["datasets"]["eval"]])
        RunEvent.objects.create(run=run, from_status=S.PENDING, to_status=S.PENDING, message="created")
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
    changes: dict[str, Any] = {"status": to, "heartbeat_at": now}
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
    log.info("run %s: %s -> %s %s", run_id, current, to, message)
    return True


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
    changes: dict[str, Any] = {"heartbeat_at": timezone.now()}
    if progress is not None:
        changes["progress"] = max(0, min(100, int(progress)))
    if stage is not None:
        changes["stage"] = stage[:200]
    if train_history is not None:
        changes["train_history"] = train_history
    PipelineRun.objects.filter(pk=run_id).exclude(status__in=TERMINAL_STATUSES).update(**changes)


def run_set_train_history(*, run_id: int, train_history: list[dict[str, Any]]) -> None:
    """The final training history, whatever the run's status (a cancelled run keeps its curve)."""
    PipelineRun.objects.filter(pk=run_id).update(train_history=train_history)


def run_heartbeat(*, run_id: int) -> None:
    PipelineRun.objects.filter(pk=run_id).update(heartbeat_at=timezone.now())


def run_cancel(*, run_id: int, message: str = "cancelled by user") -> None:
    """Cancel a run that has not finished; queued jobs are removed, a running
    step stops at its next check (it sees the status)."""
    from . import pipeline

    run_transition_or_raise(run_id=run_id, to=S.CANCELLED, message=message)
    transaction.on_commit(lambda: pipeline.remove_queued_steps(run_id=run_id))


def run_queue_step(*, run_id: int, step: str) -> None:
    """The run now waits for `step`; heartbeat_at doubles as "queued since" (the reaper's grace period)."""
    PipelineRun.objects.filter(pk=run_id).update(current_job=f"{step}:queued", heartbeat_at=timezone.now())


def run_claim_step(*, run_id: int, step: str) -> bool:
    """queued -> running for this step; False when someone else has it or the run ended."""
    claimed = (
        PipelineRun.objects.filter(pk=run_id, current_job=f"{step}:queued")
        .exclude(status__in=TERMINAL_STATUSES)
        .update(current_job=f"{step}:running", heartbeat_at=timezone.now())
    )
    return bool(claimed)


def run_advance(*, run_id: int, step: str, next_step: str | None, next_status: str) -> bool:
    """After `step`: the run waits for `next_step` (in `next_status`), or is completed when there is none.

    One transaction, one compare-and-swap on "<step>:running": False when the
    run was cancelled (or failed by the reaper) while the step ran.
    """
    now = timezone.now()
    running = {"pk": run_id, "current_job": f"{step}:running"}
    with transaction.atomic():
        current = PipelineRun.objects.select_for_update().only("status").filter(**running).first()
        if current is None or current.status in TERMINAL_STATUSES:
            return False
        if next_step is None:
            return run_transition(
                run_id=run_id, to=S.COMPLETED, expected=current.status, message=f"{step} finished", also={"current_job": f"{step}:done"},
            )
        if current.status != next_status:
            return run_transition(
                run_id=run_id, to=next_status, expected=current.status, message=f"{step} finished",
                also={"current_job": f"{next_step}:queued"},
            )
        return bool(PipelineRun.objects.filter(**running).update(current_job=f"{next_step}:queued", heartbeat_at=now))


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


def run_set_mlflow_ids(*, run_id: int, experiment_id: str, mlflow_run_id: str) -> None:
    PipelineRun.objects.filter(pk=run_id).update(mlflow_experiment_id=experiment_id, mlflow_run_id=mlflow_run_id)


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


def run_set_checkpoint(*, run_id: int, step: int, train_history: list[dict[str, Any]] | None = None) -> None:
    """A checkpoint of the running fine-tune was stored: a new attempt can resume from `step`."""
    changes: dict[str, Any] = {"checkpoint_step": step, "heartbeat_at": timezone.now()}
    if train_history is not None:
        changes["train_history"] = train_history
    PipelineRun.objects.filter(pk=run_id).exclude(status__in=TERMINAL_STATUSES).update(**changes)


def run_set_best_step(*, run_id: int, step: int | None) -> None:
    """The step whose adapter the run kept (best validation loss)."""
    PipelineRun.objects.filter(pk=run_id).update(best_step=step)


def run_set_data_check(*, run_id: int, report: dict[str, Any]) -> None:
    PipelineRun.objects.filter(pk=run_id).update(data_check=report)


def run_note(*, run_id: int, message: str) -> None:
    """An event of the run that is not a status change (resumed, stopped early): from = to = its status."""
    status = PipelineRun.objects.values_list("status", flat=True).get(pk=run_id)
    RunEvent.objects.create(run_id=run_id, from_status=status, to_status=status, message=message[:2000])


def run_requeue_lost_finetune(*, run_id: int, message: str) -> bool:
    """The fine-tune's worker was lost: "finetune:running" -> "finetune:queued", one attempt more, an event saying so.

    A compare-and-swap on the running step and the attempt count: False when the
    run moved on, ended, or another reaper got there first.
    """
    with transaction.atomic():
        run = PipelineRun.objects.only("pk", "status", "attempts").filter(
            pk=run_id, status=S.TRAINING, current_job="finetune:running",
        ).first()
        if run is None:
            return False
        updated = PipelineRun.objects.filter(pk=run_id, status=S.TRAINING, current_job="finetune:running", attempts=run.attempts).update(
            current_job="finetune:queued", attempts=run.attempts + 1, heartbeat_at=timezone.now(),
        )
        if not updated:
            return False
        RunEvent.objects.create(run_id=run_id, from_status=S.TRAINING, to_status=S.TRAINING, message=message[:2000])
    return True
