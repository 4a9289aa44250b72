"""The reaper: jobs whose worker is gone get their step's policy, and jobs Redis lost are sent again.

Passes, run together by `reap_job` (the scheduler) and `manage.py reap_runs`:

- `requeue_lost_jobs`: a job queued longer than a grace period while RQ does
  not hold it (Redis restarted without persistence, or was unreachable when the
  job was sent) is sent again. The claim's compare-and-swap makes a job that
  was not lost after all run once.
- `reap_stale_jobs`: a running job whose heartbeat stopped (a SIGKILLed
  work-horse or worker never reports) gets its step's lost-job policy
  (runs/kinds/base.py): a fine-tune with a checkpoint and attempts left resumes,
  a scoring or registry job is sent again, anything else fails the run with a
  reason saying so.
- `apply_pending_decisions`: promotion decisions recorded but not yet given to
  MLflow (runs/promotion.py).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from .execution import RunLog, run_fail
from .kinds import kind_of
from .kinds.base import JobFacts
from .models import TERMINAL_STATUSES, Job, JobState, RunStatus
from .services import job_fail, job_requeue_lost

log = logging.getLogger(__name__)

# How long a job may wait in a queue before the reaper asks RQ about it:
# longer than sending takes (the job is marked queued before it is sent, after commit).
REQUEUE_GRACE_SECONDS = 30


def stale_jobs(*, stale_seconds: int) -> QuerySet[Job]:
    """Running jobs of unfinished runs whose heartbeat stopped.

    Inline (the embedded default) a queued job is run at once by the thread that
    queued it: if it went stale, that thread is gone, so it counts too. In served
    mode waiting in a queue is not a lost worker (requeue_lost_jobs sees to it).
    """
    cutoff = timezone.now() - timedelta(seconds=stale_seconds)
    states = [JobState.RUNNING, JobState.QUEUED] if settings.JOBS_INLINE else [JobState.RUNNING]
    # A completed run's jobs are on-demand ones (an export): theirs too.
    return (Job.objects.filter(state__in=states, heartbeat_at__lt=cutoff).exclude(run__status__in=TERMINAL_STATUSES - {RunStatus.COMPLETED})
            .select_related("run").order_by("id"))


def reap_stale_jobs(*, stale_seconds: int) -> list[tuple[int, str]]:
    """Each lost job's policy applied; returns (run id, what was done)."""
    reaped = []
    now = timezone.now()
    for job in stale_jobs(stale_seconds=stale_seconds):
        run = job.run
        silence = int((now - job.heartbeat_at).total_seconds())
        reason = (
            f"worker lost: no heartbeat for {silence}s (limit {stale_seconds}s) while {run.status} "
            f"({job.label}:{job.state}); the worker process was probably killed"
        )
        graph = kind_of(run).graph_of(run)
        policy = graph.step(job.step).on_lost if graph.has(job.step) else None
        facts = JobFacts(step=job.step, key=job.key, attempts=job.attempts, checkpoint_step=job.checkpoint_step)
        decision = policy.decide(job=facts, config=run.config, reason=reason) if policy else None
        if decision is not None and decision.retry and job.state == JobState.RUNNING:
            if job_requeue_lost(job_id=job.pk, attempt=job.attempts, message=decision.message):
                RunLog(run.pk)(decision.message)
                transaction.on_commit(lambda job=job: _send_again(job))
                reaped.append((run.pk, decision.message))
            continue
        message = decision.message if decision is not None else reason
        if run.status == RunStatus.COMPLETED or (policy is not None and graph.step(job.step).on_demand):
            if job_fail(job_id=job.pk, attempt=job.attempts, error=message):  # an on-demand job fails only itself
                RunLog(run.pk)(message)
                reaped.append((run.pk, message))
            continue
        if run_fail(run_id=run.pk, reason=message):
            RunLog(run.pk)(message)
            reaped.append((run.pk, message))
    return reaped


def _send_again(job: Job) -> None:
    from .pipeline import resend_after_lost_worker

    resend_after_lost_worker(job_id=job.pk, queue=job.queue, run_id=job.run_id)


def waiting_jobs(*, grace_seconds: int) -> QuerySet[Job]:
    """Queued jobs of unfinished runs, waiting since before the grace period."""
    cutoff = timezone.now() - timedelta(seconds=grace_seconds)
    ended = TERMINAL_STATUSES - {RunStatus.COMPLETED}  # a completed run's queued jobs are on-demand ones: theirs too
    return Job.objects.filter(state=JobState.QUEUED, heartbeat_at__lt=cutoff).exclude(run__status__in=ended).order_by("id")


def requeue_lost_jobs(*, grace_seconds: int = REQUEUE_GRACE_SECONDS) -> list[tuple[int, str]]:
    """Send again the queued jobs that RQ lost; returns (run id, what was done) per job.

    Nothing to do inline (there is no queue to lose a job). While Redis is
    unreachable the pass stops and the next one tries again: the jobs wait.
    """
    from redis.exceptions import RedisError

    from .pipeline import resend_lost_job
    from .queues import JobKeepsFailing

    if settings.JOBS_INLINE:
        return []
    done = []
    for job_id, run_id, step, key, queue in waiting_jobs(grace_seconds=grace_seconds).values_list("pk", "run_id", "step", "key", "queue"):
        label = f"{step}:{key}" if key else step
        try:
            outcome = resend_lost_job(job_id=job_id, queue=queue)
        except RedisError as exc:
            log.warning("requeue: Redis unreachable (%s: %s); lost jobs are sent on a later pass", type(exc).__name__, exc)
            break
        except JobKeepsFailing as exc:
            reason = f"{label} job lost: {exc}"
            job_fail(job_id=job_id, attempt=None, error=reason)
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
        reap_stale_jobs(stale_seconds=settings.REAPER_STALE_SECONDS)
