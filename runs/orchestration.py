"""How a run's jobs are chained and queued.

    finetune:                 finetune (gpu) -> generate (gpu) -> score (cpu)
    eval_only, generate:      generate (gpu) -> score (cpu)
    eval_only, dataset:       score (cpu)

The database is the truth: `PipelineRun.current_job` says which job the run
waits for ("generate:queued") or runs ("generate:running"). A job claims it with
a compare-and-swap, so a job delivered twice runs once. RQ only carries work:
job ids derive from the run (`generate-12`), enqueued with unique=True.

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
_local = threading.local()


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


def _send_to_queue(job: str, run_id: int) -> None:
    import django_rq
    from rq.exceptions import DuplicateJobError

    queue = django_rq.get_queue(JOB_QUEUES[job])
    try:
        queue.enqueue_call(
            job_path(job), args=(run_id,), job_id=job_id(job, run_id), unique=True,
            timeout=settings.RQ_QUEUES[JOB_QUEUES[job]]["DEFAULT_TIMEOUT"], result_ttl=86400, failure_ttl=7 * 86400,
        )
    except DuplicateJobError:
        log.info("run %s: %s job already queued; a second enqueue is harmless", run_id, job)


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
    PipelineRun.objects.filter(pk=run_id).update(current_job=f"{job}:queued")
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
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    for job in JOB_QUEUES:
        queue = django_rq.get_queue(JOB_QUEUES[job])
        try:
            rq_job = Job.fetch(job_id(job, run_id), connection=queue.connection)
        except NoSuchJobError:
            continue
        if rq_job.get_status(refresh=True) in ("queued", "deferred", "scheduled"):
            rq_job.cancel()
            rq_job.delete()


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
