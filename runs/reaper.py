"""Runs whose heartbeat went stale are failed with a reason: their worker is gone."""

from __future__ import annotations

from datetime import timedelta

from django.db.models import Q, QuerySet
from django.utils import timezone

from .execution import RunLog, run_fail
from .models import ACTIVE_STATUSES, PipelineRun


def stale_runs(*, stale_seconds: int) -> QuerySet[PipelineRun]:
    cutoff = timezone.now() - timedelta(seconds=stale_seconds)
    return PipelineRun.objects.filter(status__in=ACTIVE_STATUSES).filter(Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True))


def reap_stale_runs(*, stale_seconds: int) -> list[tuple[int, str]]:
    reaped = []
    now = timezone.now()
    for run in stale_runs(stale_seconds=stale_seconds):
        age = int((now - run.heartbeat_at).total_seconds()) if run.heartbeat_at else None
        reason = (
            f"worker lost: no heartbeat for {age}s (limit {stale_seconds}s) while {run.status}"
            f"{f' ({run.current_job})' if run.current_job else ''}; the worker process was probably killed"
        )
        if run_fail(run_id=run.pk, reason=reason):
            RunLog(run.pk)(reason)
            reaped.append((run.pk, reason))
    return reaped


_last_embedded_reap = [0.0]


def reap_if_embedded(*, every: float = 30.0) -> None:
    """Without workers (embedded default) nobody runs the cron reaper: the pages do it.

    A server process killed mid-run leaves its run `training`; the next page
    view after the heartbeat limit ends it `failed` with the reason.
    """
    import time

    from django.conf import settings

    now = time.monotonic()
    if settings.JOBS_INLINE and now - _last_embedded_reap[0] >= every:
        _last_embedded_reap[0] = now
        reap_stale_runs(stale_seconds=settings.REAPER_STALE_SECONDS)
