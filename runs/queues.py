"""RQ transport: put a job on its queue, take it off, send it again if Redis lost it.

Which step goes to which queue is declared by the kinds (runs/kinds/); this
module only carries work. The database is the truth: a Job row says whether it
is queued or running; its RQ job id derives from the row (`job-12`), enqueued
with unique=True, and the claim (a compare-and-swap in runs/services.py) keeps a
job delivered twice from running twice.

Redis may lose a job (restarted without persistence) or be unreachable when a
job is sent: the row then still says queued and nothing would ever run it.
Sending never fails a request or a job because of Redis; the reaper's
`requeue_lost_jobs` sends such jobs again (`resend_lost_job`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from django.conf import settings

from .models import TERMINAL_STATUSES, Job, JobState

log = logging.getLogger(__name__)

# RQ states of a job that a worker will still take (or has taken) by itself.
RQ_WAITING_STATES = frozenset({"queued", "started", "deferred", "scheduled"})
# A job that keeps failing in RQ before it claims its run is not sent forever.
MAX_RESENDS = 3


class JobKeepsFailing(Exception):
    """A run's job failed in RQ before it could claim the run, MAX_RESENDS times."""


def rq_job_id(job_id: int) -> str:
    return f"job-{job_id}"


def send_job(*, func: Callable[..., None], queue: str, job_id: int, resends: int = 0) -> bool:
    """Put `func(job_id)` on `queue`; False when Redis could not take it.

    The database already says the job is queued, so an unreachable Redis must not
    fail the request or the job that sends it: the reaper sends it again.
    """
    import django_rq
    from redis.exceptions import RedisError
    from rq.exceptions import DuplicateJobError

    def enqueue() -> None:
        django_rq.get_queue(queue).enqueue_call(
            func, args=(job_id,), job_id=rq_job_id(job_id), unique=True,
            timeout=settings.RQ_QUEUES[queue]["DEFAULT_TIMEOUT"], result_ttl=86400, failure_ttl=7 * 86400,
            meta={"resends": resends},
        )

    try:
        try:
            enqueue()
        except DuplicateJobError:
            if _held_by_rq(queue, job_id):
                log.info("job %s already queued; a second enqueue is harmless", job_id)
                return True
            # The id is taken by an RQ job that ended (a database reset since, or another database on the same
            # Redis): it will never run this job, so it makes way.
            _delete_rq_job(queue, job_id)
            enqueue()
    except RedisError as exc:
        log.warning(
            "could not send job %s to the %s queue (%s: %s); it stays queued in the database "
            "and the reaper sends it again", job_id, queue, type(exc).__name__, exc,
        )
        return False
    return True


def _held_by_rq(queue: str, job_id: int) -> bool:
    import django_rq
    from rq.exceptions import NoSuchJobError
    from rq.job import Job as RqJob

    try:
        status = RqJob.fetch(rq_job_id(job_id), connection=django_rq.get_queue(queue).connection).get_status(refresh=True)
    except NoSuchJobError:
        return False
    return getattr(status, "value", status) in RQ_WAITING_STATES


def _delete_rq_job(queue: str, job_id: int) -> None:
    import django_rq
    from rq.exceptions import NoSuchJobError
    from rq.job import Job as RqJob

    try:
        RqJob.fetch(rq_job_id(job_id), connection=django_rq.get_queue(queue).connection).delete()
    except NoSuchJobError:
        pass


def remove_queued_jobs(*, jobs: Iterable[tuple[int, str]]) -> None:
    """Drop an ended run's waiting jobs, given (job id, queue) pairs; running ones stop by themselves."""
    if settings.JOBS_INLINE:
        return
    import django_rq
    from redis.exceptions import RedisError
    from rq.exceptions import NoSuchJobError
    from rq.job import Job as RqJob

    for job_id, queue in jobs:
        if not queue:
            continue
        try:
            try:
                rq_job = RqJob.fetch(rq_job_id(job_id), connection=django_rq.get_queue(queue).connection)
            except NoSuchJobError:
                continue
            if rq_job.get_status(refresh=True) in ("queued", "deferred", "scheduled"):
                rq_job.cancel()
                rq_job.delete()
        except RedisError as exc:
            # The run is cancelled in the database: a job left behind does not claim it.
            log.warning("could not remove queued job %s (%s: %s)", job_id, type(exc).__name__, exc)
            return


def resend_lost_job(*, func: Callable[..., None], queue: str, job_id: int) -> str | None:
    """Send a job again that the run waits for but RQ no longer holds; returns why, or None.

    RQ no longer holds it when Redis has no such job (Redis restarted, or was
    unreachable when the job was sent) or when it ended in RQ without claiming
    the run (failed, stopped or cancelled before its first query). A job RQ
    still holds (queued, started, ...) is left alone. Raises JobKeepsFailing
    after MAX_RESENDS failures before the claim; RedisError when Redis is down.
    """
    import django_rq
    from rq.exceptions import NoSuchJobError
    from rq.job import Job as RqJob

    try:
        rq_job = RqJob.fetch(rq_job_id(job_id), connection=django_rq.get_queue(queue).connection)
    except NoSuchJobError:
        rq_job = None
    status = None if rq_job is None else rq_job.get_status(refresh=False)
    state = getattr(status, "value", status)  # JobStatus is a str enum
    if state in RQ_WAITING_STATES or not _still_waiting(job_id):
        return None  # a worker has it, or took it since the reaper looked
    resends = 0
    step = _label(job_id)
    if rq_job is None:
        reason = f"the {step} job was not in Redis (Redis restarted, or was unreachable when the job was sent)"
    else:
        resends = int(rq_job.meta.get("resends", 0)) + 1
        failure = _last_line(_rq_failure(rq_job))
        reason = f"the {step} job ended {state} in RQ before it started{f' ({failure})' if failure else ''}"
        if resends > MAX_RESENDS:
            raise JobKeepsFailing(f"{reason}, {MAX_RESENDS + 1} times; not sending it again")
        rq_job.delete()  # its id is taken until then (jobs are enqueued unique)
    from .services import job_touch_queued

    job_touch_queued(job_id=job_id)
    if not send_job(func=func, queue=queue, job_id=job_id, resends=resends):
        return None
    return f"{reason}: sent it again to the {queue} queue"


def replace_dead_job(*, func: Callable[..., None], queue: str, job_id: int) -> bool:
    """Send a step again whose worker died (the reaper saw its heartbeat stop); False when Redis could not take it.

    The dead job's RQ entry goes first, whatever its state, so its unique id is
    free: failed when RQ saw its work-horse die, still "started" when the whole
    worker was killed (RQ keeps it there until the job's timeout).
    """
    import django_rq
    from redis.exceptions import RedisError
    from rq.exceptions import NoSuchJobError
    from rq.job import Job as RqJob

    try:
        RqJob.fetch(rq_job_id(job_id), connection=django_rq.get_queue(queue).connection).delete()
    except NoSuchJobError:
        pass
    except RedisError as exc:
        log.warning("could not remove dead job %s (%s: %s); the reaper sends it later", job_id, type(exc).__name__, exc)
        return False
    return send_job(func=func, queue=queue, job_id=job_id)


def _still_waiting(job_id: int) -> bool:
    return Job.objects.filter(pk=job_id, state=JobState.QUEUED).exclude(run__status__in=TERMINAL_STATUSES - {"completed"}).exists()


def _label(job_id: int) -> str:
    row = Job.objects.filter(pk=job_id).values_list("step", "key").first()
    return "" if row is None else (f"{row[0]}:{row[1]}" if row[1] else row[0])


def _rq_failure(rq_job) -> str:
    try:
        result = rq_job.latest_result()
    except Exception:  # Best effort: the reason only decorates the log line.
        return ""
    return (getattr(result, "exc_string", None) or "") if result is not None else ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
