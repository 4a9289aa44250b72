"""The reaper: runs whose worker is gone are failed with a reason, and runs whose
queued job Redis lost get it sent again.

Two passes, run together by `reap_job` (the scheduler) and `manage.py reap_runs`:

- `requeue_lost_jobs`: a run that waits for a job ("<job>:queued") longer than a
  grace period, while RQ does not hold that job (Redis restarted without
  persistence, or was unreachable when the job was sent), gets it again. The
  claim compare-and-swap makes a job that was not lost after all run once.
- `reap_stale_runs`: a run whose running job stopped its heartbeat (a SIGKILLed
  work-horse or worker never reports) ends `failed` with a reason saying so;
  except a fine-tune with a checkpoint and attempts left (training.max_attempts):
  it is sent again and resumes from its last checkpoint.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from .execution import RunLog, run_fail
from .models import ACTIVE_STATUSES, TERMINAL_STATUSES, PipelineRun
from .services import run_requeue_lost_finetune

log = logging.getLogger(__name__)

# How long a run may wait for a queued job before the reaper asks RQ about it:
# longer than sending takes (the job is marked queued before it is sent, after commit).
REQUEUE_GRACE_SECONDS = 30


def stale_runs(*, stale_seconds: int) -> QuerySet[PipelineRun]:
    cutoff = timezone.now() - timedelta(seconds=stale_seconds)
    runs = PipelineRun.objects.filter(status__in=ACTIVE_STATUSES).filter(Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True))
    if not settings.JOBS_INLINE:
        # Waiting in a queue is not a lost worker: nothing beats until a worker takes
        # the job, and a job Redis lost is sent again by requeue_lost_jobs. (Inline,
        # a queued job is run at once by the thread that queued it: if it went stale
        # that thread is gone.)
        runs = runs.exclude(current_job__endswith=":queued")
    return runs


def reap_stale_runs(*, stale_seconds: int) -> list[tuple[int, str]]:
    reaped = []
    now = timezone.now()
    for run in stale_runs(stale_seconds=stale_seconds):
        silence = f"for {int((now - run.heartbeat_at).total_seconds())}s" if run.heartbeat_at else "ever"
        reason = (
            f"worker lost: no heartbeat {silence} (limit {stale_seconds}s) while {run.status}"
            f"{f' ({run.current_job})' if run.current_job else ''}; the worker process was probably killed"
        )
        resumed = resume_lost_finetune(run, reason=reason)
        if resumed:
            reaped.append((run.pk, resumed))
            continue
        if run.current_job == "finetune:running" and run.attempts > 1:
            reason += f"; {run.attempts} attempts of training.max_attempts {_max_attempts(run)} used"
        elif run.current_job == "finetune:running" and run.checkpoint_step is None and _max_attempts(run) > 1:
            reason += "; no checkpoint to resume from yet"
        if run_fail(run_id=run.pk, reason=reason):
            RunLog(run.pk)(reason)
            reaped.append((run.pk, reason))
    return reaped


def _max_attempts(run: PipelineRun) -> int:
    return int((run.config.get("training") or {}).get("max_attempts", 1))


def resume_lost_finetune(run: PipelineRun, *, reason: str) -> str:
    """A fine-tune whose worker died, with a checkpoint and attempts left, is sent again; returns what was done ("" if not).

    The run goes back to "finetune:queued" (a service, compare-and-swap) and the
    step registry sends the step again in place of the dead job
    (`pipeline.resend_after_lost_worker`): the claim and body are the usual
    ones, and the body resumes from the checkpoint.
    """
    from .pipeline import resend_after_lost_worker

    if run.current_job != "finetune:running" or run.checkpoint_step is None or run.attempts >= _max_attempts(run):
        return ""
    attempt = run.attempts + 1
    message = (
        f"{reason}; resuming from step {run.checkpoint_step} after the worker was lost "
        f"(attempt {attempt} of {_max_attempts(run)})"
    )
    if not run_requeue_lost_finetune(run_id=run.pk, message=message):
        return ""
    RunLog(run.pk)(message)
    transaction.on_commit(lambda: resend_after_lost_worker(run_id=run.pk, step_name="finetune"))
    return message


def waiting_runs(*, grace_seconds: int) -> QuerySet[PipelineRun]:
    """Unfinished runs waiting for a queued job since before the grace period."""
    cutoff = timezone.now() - timedelta(seconds=grace_seconds)
    return (
        PipelineRun.objects.exclude(status__in=TERMINAL_STATUSES)
        .filter(current_job__endswith=":queued")
        # heartbeat_at is set when a job queues the next one; a new run has only created_at.
        .filter(Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, created_at__lt=cutoff))
    )


def requeue_lost_jobs(*, grace_seconds: int = REQUEUE_GRACE_SECONDS) -> list[tuple[int, str]]:
    """Send again the queued jobs that RQ lost; returns (run id, what was done) per run.

    Nothing to do inline (there is no queue to lose a job). While Redis is
    unreachable the pass stops and the next one tries again: the runs wait.
    """
    from redis.exceptions import RedisError

    from .pipeline import resend_lost_step
    from .queues import JobKeepsFailing

    if settings.JOBS_INLINE:
        return []
    done = []
    for run_id, current_job in waiting_runs(grace_seconds=grace_seconds).values_list("pk", "current_job"):
        job = current_job.partition(":")[0]
        try:
            outcome = resend_lost_step(run_id=run_id, step_name=job)
        except RedisError as exc:
            log.warning("requeue: Redis unreachable (%s: %s); lost jobs are sent on a later pass", type(exc).__name__, exc)
            break
        except JobKeepsFailing as exc:
            reason = f"{job} job lost: {exc}"
            if run_fail(run_id=run_id, reason=reason):
                RunLog(run_id)(reason)
                done.append((run_id, reason))
            continue
        if outcome:
            RunLog(run_id)(outcome)
            done.append((run_id, outcome))
    return done


_last_embedded_reap = [0.0]


def reap_if_embedded(*, every: float = 30.0) -> None:
    """Without workers (embedded default) nobody runs the cron reaper: the pages do it.

    A server process killed mid-run leaves its run `training`; the next page
    view after the heartbeat limit ends it `failed` with the reason.
    """
    import time

    now = time.monotonic()
    if settings.JOBS_INLINE and now - _last_embedded_reap[0] >= every:
        _last_embedded_reap[0] = now
        reap_stale_runs(stale_seconds=settings.REAPER_STALE_SECONDS)
