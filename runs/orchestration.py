"""How a run's jobs are chained and queued.

    finetune:                 finetune (gpu) -> generate (gpu) -> score (cpu)
    eval_only, generate:      generate (gpu) -> score (cpu)
    eval_only, dataset:       score (cpu)

The database is the truth: `PipelineRun.current_job` says which job the run
waits for ("generate:queued") or runs ("generate:running"). A job claims it with
a compare-and-swap, so a job delivered twice runs once. RQ only carries work:
job ids derive from the run (`generate-12`), enqueued with unique=True.

Redis may lose a job (restarted without persistence) or be unreachable when a
job is sent: the run then still says "<job>:queued" and nothing would ever run
it. Sending never fails a request or a job because of Redis; the reaper's
`requeue_lost_jobs` sends such jobs again (`run_resend_lost_job`), and the
claim keeps a job that turns out to be delivered twice from running twice.

Without REDIS_URL (the embedded default) there are no queues: `drive_inline`
runs the queued jobs one after another in this process, in the foreground (the
`run_pipeline` command) or in a background thread (a web request).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.utils import timezone

from .models import TERMINAL_STATUSES, PipelineRun, RunKind

log = logging.getLogger(__name__)

JOB_QUEUES = {"finetune": "gpu", "generate": "gpu", "score": "cpu"}
# RQ states of a job that a worker will still take (or has taken) by itself.
RQ_WAITING_STATES = frozenset({"queued", "started", "deferred", "scheduled"})
# A job that keeps failing in RQ before it claims its run is not sent forever.
MAX_RESENDS = 3
_local = threading.local()


class JobKeepsFailing(Exception):
    """A run's job failed in RQ before it could claim the run, MAX_RESENDS times."""


def job_path(job: str) -> str:
    return {
        "finetune": "training.jobs.finetune_job",
        "generate": "evaluation.jobs.generate_job",
        "score": "evaluation.jobs.score_job",
    }[job]


def job_id(job: str, run_id: int) -> str:
    return f"{job}-{run_id}"


def first_job(*, kind: str, answers: str) -> str:
    if kind == RunKind.FINETUNE:
        return "finetune"
    return "generate" if answers == "generate" else "score"


def next_job(job: str) -> str | None:
    return {"finetune": "generate", "generate": "score", "score": None}[job]


def _send_to_queue(job: str, run_id: int, *, resends: int = 0) -> bool:
    """Put the run's job on its queue; False when Redis could not take it.

    The database already says "<job>:queued", so an unreachable Redis must not
    fail the request or the job that sends it: the reaper sends it again.
    """
    import django_rq
    from redis.exceptions import RedisError
    from rq.exceptions import DuplicateJobError

    queue = django_rq.get_queue(JOB_QUEUES[job])
    try:
        queue.enqueue_call(
            job_path(job), args=(run_id,), job_id=job_id(job, run_id), unique=True,
            timeout=settings.RQ_QUEUES[JOB_QUEUES[job]]["DEFAULT_TIMEOUT"], result_ttl=86400, failure_ttl=7 * 86400,
            meta={"resends": resends},
        )
    except DuplicateJobError:
        log.info("run %s: %s job already queued; a second enqueue is harmless", run_id, job)
    except RedisError as exc:
        log.warning(
            "run %s: could not send the %s job to the %s queue (%s: %s); it stays queued in the database "
            "and the reaper sends it again", run_id, job, JOB_QUEUES[job], type(exc).__name__, exc,
        )
        return False
    return True


@contextlib.contextmanager
def inline_foreground() -> Iterator[None]:
    """Inside this block, inline runs are left to the caller's drive_inline()."""
    previous = getattr(_local, "foreground", False)
    _local.foreground = True
    try:
        yield
    finally:
        _local.foreground = previous


def run_enqueue_first_job(*, run_id: int) -> None:
    """Called after the run's creation commits: its first job is already marked queued."""
    job = PipelineRun.objects.values_list("current_job", flat=True).get(pk=run_id).split(":")[0]
    if not settings.JOBS_INLINE:
        _send_to_queue(job, run_id)
    elif not getattr(_local, "foreground", False):
        threading.Thread(target=_drive_in_thread, args=(run_id,), name=f"run-{run_id}", daemon=True).start()


def run_enqueue_next(*, run_id: int, after: str) -> str | None:
    """Mark the job after `after` as queued and send it (after commit). Returns its name."""
    job = next_job(after)
    if job is None:
        return None
    # heartbeat_at doubles as "queued since": the reaper's grace period counts from it.
    PipelineRun.objects.filter(pk=run_id).update(current_job=f"{job}:queued", heartbeat_at=timezone.now())
    if not settings.JOBS_INLINE:
        transaction.on_commit(lambda: _send_to_queue(job, run_id))
    return job


def run_claim_job(*, run_id: int, job: str) -> bool:
    """queued -> running for this job; False when someone else has it or the run ended."""
    claimed = (
        PipelineRun.objects.filter(pk=run_id, current_job=f"{job}:queued")
        .exclude(status__in=TERMINAL_STATUSES)
        .update(current_job=f"{job}:running", heartbeat_at=timezone.now())
    )
    return bool(claimed)


def run_remove_queued_jobs(*, run_id: int) -> None:
    """Drop a cancelled run's waiting jobs from the queues (running ones stop by themselves)."""
    if settings.JOBS_INLINE:
        return
    import django_rq
    from redis.exceptions import RedisError
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    for job in JOB_QUEUES:
        queue = django_rq.get_queue(JOB_QUEUES[job])
        try:
            try:
                rq_job = Job.fetch(job_id(job, run_id), connection=queue.connection)
            except NoSuchJobError:
                continue
            if rq_job.get_status(refresh=True) in ("queued", "deferred", "scheduled"):
                rq_job.cancel()
                rq_job.delete()
        except RedisError as exc:
            # The run is cancelled in the database: a job left behind does not claim it.
            log.warning("run %s: could not remove the queued %s job (%s: %s)", run_id, job, type(exc).__name__, exc)
            return


def run_resend_lost_job(*, run_id: int, job: str) -> str | None:
    """Send a job again that the run waits for but RQ no longer holds; returns why, or None.

    RQ no longer holds it when Redis has no such job (Redis restarted, or was
    unreachable when the job was sent) or when it ended in RQ without claiming
    the run (failed, stopped or cancelled before its first query). A job RQ
    still holds (queued, started, ...) is left alone. Raises JobKeepsFailing
    after MAX_RESENDS failures before the claim; RedisError when Redis is down.
    """
    import django_rq
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    queue = django_rq.get_queue(JOB_QUEUES[job])
    try:
        rq_job = Job.fetch(job_id(job, run_id), connection=queue.connection)
    except NoSuchJobError:
        rq_job = None
    status = None if rq_job is None else rq_job.get_status(refresh=False)
    state = getattr(status, "value", status)  # JobStatus is a str enum
    if state in RQ_WAITING_STATES or not _still_waiting_for(run_id, job):
        return None  # a worker has it, or took it since the reaper looked
    resends = 0
    if rq_job is None:
        reason = f"the {job} job was not in Redis (Redis restarted, or was unreachable when the job was sent)"
    else:
        resends = int(rq_job.meta.get("resends", 0)) + 1
        failure = _last_line(_rq_failure(rq_job))
        reason = f"the {job} job ended {state} in RQ before it started{f' ({failure})' if failure else ''}"
        if resends > MAX_RESENDS:
            raise JobKeepsFailing(f"{reason}, {MAX_RESENDS + 1} times; not sending it again")
        rq_job.delete()  # its id is taken until then (jobs are enqueued unique)
    if not _send_to_queue(job, run_id, resends=resends):
        return None
    return f"{reason}: sent it again to the {JOB_QUEUES[job]} queue"


def _still_waiting_for(run_id: int, job: str) -> bool:
    return PipelineRun.objects.filter(pk=run_id, current_job=f"{job}:queued").exclude(status__in=TERMINAL_STATUSES).exists()


def _rq_failure(rq_job) -> str:
    try:
        result = rq_job.latest_result()
    except Exception:  # Best effort: the reason only decorates the log line.
        return ""
    return (getattr(result, "exc_string", None) or "") if result is not None else ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _job_function(job: str) -> Callable[[int], None]:
    module_name, function_name = job_path(job).rsplit(".", 1)
    module = __import__(module_name, fromlist=[function_name])
    return getattr(module, function_name)


def drive_inline(run_id: int) -> None:
    """Run the run's queued jobs in this process until none is left (embedded default)."""
    while True:
        current = PipelineRun.objects.values_list("current_job", "status").get(pk=run_id)
        job, _, state = current[0].partition(":")
        if state != "queued" or current[1] in TERMINAL_STATUSES:
            return
        _job_function(job)(run_id)


def _drive_in_thread(run_id: int) -> None:
    try:
        drive_inline(run_id)
    except Exception:  # The job already recorded the failure on the run.
        log.exception("inline run %s failed", run_id)
    finally:
        connection.close()
        close_old_connections()
