"""The engine: runs the jobs of a run's graph (runs/kinds/), one job function for every step.

`run_job(job_id)` is the RQ job (or is called inline) for any job of any kind:

1. claim the job (compare-and-swap queued -> running; a job delivered twice runs
   once) and bring the run's status in line with its jobs (pending -> training);
2. keep a heartbeat (and measure the job's peak memory) while the body works;
3. publish the body's work product to MLflow (artifacts, metrics), outside any
   transaction;
4. in one transaction, with the run's row locked: store the output (`store`),
   mark the job done, create the jobs that can start now (fan-in: every job they
   wait for has ended) and move the run's status (`Graph.status_of`); the new
   jobs are sent after commit.

A running job may add keyed jobs of a step spawned by it (fan-out: one scoring
job per checkpoint), sent at once (`add_job`). When a run ends (any terminal
status, whoever ends it), `after_run_ended` takes its queued jobs off the queues,
finishes its MLflow run, deletes registered versions the database does not
record, cancels its children and tells a parent's waiting job.

Served mode: each job is the RQ job `run_job(job_id)` on its step's queue. The
embedded default (no REDIS_URL) has no queues: `drive_inline` runs a run's
queued jobs in this process, in the foreground (`run_pipeline`) or in a
background thread (a web request).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from django.conf import settings
from django.db import Error as DatabaseError
from django.db import close_old_connections, connection, transaction

from . import queues, tracking
from .config import check_model_reference
from .execution import JobAbandoned, Pulse, RunLog, drop_broken_connection, failure_reason, run_fail
from .kinds import kind_of
from .kinds.base import Graph, JobView, Step
from .models import TERMINAL_STATUSES, Job, JobState, PipelineRun, RunStatus
from .selectors import job_views
from .services import (
    job_add,
    job_claim,
    job_end_waiting,
    job_fail,
    job_finish,
    run_cancel,
    run_transition,
    run_update_progress,
)
from .step_io import StepContext, start_tracking

log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_job(job_id: int) -> None:
    """The job function of every step (the RQ job `run_job(job_id)`, or called inline)."""
    attempt = job_claim(job_id=job_id, worker=worker_name(), on_completed_run=_on_demand(job_id))
    if attempt is None:
        log.info("job %s not claimed (already taken, or ended, or its run ended); skipping", job_id)
        return
    job = Job.objects.select_related("run").get(pk=job_id)
    run = job.run
    ctx: StepContext | None = None
    try:
        graph = kind_of(run).graph_of(run)
        step = graph.step(job.step)
        _sync(run.pk, graph, message=f"{job.label} started")
        run.refresh_from_db()
        # The worker applies the same rule as validation: known local: builds, paths only under MLOPS_MODEL_PATHS.
        check_model_reference(run.base_model)
        ctx = StepContext(run, job, step, graph)
        started = time.monotonic()
        with _inline_device(step.queue), Pulse(job_id, attempt) as pulse:
            start_tracking(ctx)
            output = step.body(ctx) if step.body else None
            ctx.check_cancelled(now=True)
            if pulse.lost:
                raise JobAbandoned(f"job {job.label} of run {run.pk} was given to another attempt")
        ctx.record_figures({"seconds": round(time.monotonic() - started, 3), **pulse.figures(),
                            **(step.figures(output) if step.figures and output is not None else {})})
        if step.publish:
            step.publish(ctx, output)
        _finish(ctx, step, output)
    except JobAbandoned as exc:
        _log(run.pk, f"{job.label} stopped: {exc}")
        _after_abandon(run.pk)
    except BaseException as exc:
        if isinstance(exc, DatabaseError):
            drop_broken_connection()  # else recording the failure fails the same way
        _log(run.pk, f"{job.label} failed:\n{traceback.format_exc()}")
        reason = failure_reason(job.label, exc)
        job_fail(job_id=job_id, attempt=attempt, error=reason)
        step_of = _step_or_none(run, job.step)
        if step_of is not None and step_of.on_demand:
            pass  # it fails only itself
        elif step_of is not None and step_of.tolerate_failure:
            graph = kind_of(run).graph_of(run)
            with transaction.atomic():
                locked = _locked(run.pk)
                _follow(run.pk, graph, job, state=JobState.FAILED)
                _advance(locked, graph, message=f"{job.label} failed")
        else:
            run_fail(run_id=run.pk, reason=reason)
        raise
    finally:
        if ctx is not None:
            ctx.close()


def _on_demand(job_id: int) -> bool:
    row = Job.objects.filter(pk=job_id).select_related("run").only("step", "run__kind", "run__config", "run__parent").first()
    step = _step_or_none(row.run, row.step) if row else None
    return bool(step and step.on_demand)


def _step_or_none(run: PipelineRun, name: str) -> Step | None:
    graph = kind_of(run).graph_of(run)
    return graph.step(name) if graph.has(name) else None


def _finish(ctx: StepContext, step: Step, output: Any) -> None:
    """The output stored, the job done, the next jobs created and the status moved: together or not at all."""
    with transaction.atomic():
        run = _locked(ctx.run_id)
        if run.status in TERMINAL_STATUSES and not (step.on_demand and run.status == RunStatus.COMPLETED):
            raise JobAbandoned(f"run {ctx.run_id} is {run.status}")
        if step.store:
            step.store(ctx, output)
        elif isinstance(output, dict):
            ctx.output = output
        if not job_finish(job_id=ctx.job_id, attempt=ctx.attempt, output=ctx.output):
            raise JobAbandoned(f"job {ctx.job.label} of run {ctx.run_id} was given to another attempt")
        _follow(run.pk, ctx.graph, ctx.job, state=JobState.DONE)
        _advance(run, ctx.graph, message=f"{ctx.job.label} finished")


def _follow(run_id: int, graph: Graph, job: Job, *, state: str) -> None:
    """Inside the transaction that ended `job`: the jobs that follow it (Step.follows), keyed like it, sent after commit."""
    for step in graph.followers(job.step):
        added = job_add(run_id=run_id, step=step.name, key=job.key, queue=step.queue, payload={"followed": job.pk, "state": state})
        if added is not None:
            transaction.on_commit(lambda added=added: dispatch(job_id=added.pk, queue=added.queue, run_id=run_id))


def _locked(run_id: int) -> PipelineRun:
    """The run's row, locked until the transaction ends: its jobs' fan-in and status change one writer at a time."""
    return PipelineRun.objects.select_for_update().only("pk", "kind", "status", "mlflow_run_id", "config", "parent").get(pk=run_id)


def _advance(run: PipelineRun, graph: Graph, *, message: str) -> None:
    """Inside the caller's transaction, with the run locked: create the jobs that can start, derive the status."""
    views = job_views(run.pk)
    for ready in graph.ready(views):
        job = job_add(run_id=run.pk, step=ready.name, queue=ready.queue)
        if job is not None:
            views.append(JobView(step=job.step, key=job.key, state=job.state, started=False))
            transaction.on_commit(lambda job=job: dispatch(job_id=job.pk, queue=job.queue, run_id=run.pk))
    status = graph.status_of(views, run.status)
    if status != run.status:
        if status == RunStatus.COMPLETED and run.mlflow_run_id:
            # A status mark, not a registration: whoever sees the run completed also finds its MLflow run finished.
            tracking.mlflow_finish(run.mlflow_run_id, "FINISHED")
        run_transition(run_id=run.pk, to=status, expected=run.status, message=message)
    elif status not in TERMINAL_STATUSES:
        ready_names = [j.step for j in views if j.state == JobState.QUEUED]
        if ready_names:
            run_update_progress(run_id=run.pk, stage=f"queued for {', '.join(graph.step(n).label for n in dict.fromkeys(ready_names))}")


def _sync(run_id: int, graph: Graph, *, message: str) -> None:
    with transaction.atomic():
        _advance(_locked(run_id), graph, message=message)


def add_job(*, run_id: int, graph: Graph, step: str, key: str, payload: dict[str, Any] | None = None) -> int | None:
    """A keyed job of a spawned step (fan-out from a running job) or of an on-demand step (a service's request),
    sent after commit; its id, or None when it exists already or the run ended (an on-demand job may follow completion)."""
    spec = graph.step(step)
    if not (spec.spawned or spec.on_demand):
        raise ValueError(f"step {step} is neither spawned_by another step nor on_demand: its job is created by the graph")
    with transaction.atomic():
        run = _locked(run_id)
        if run.status in TERMINAL_STATUSES and not (spec.on_demand and run.status == RunStatus.COMPLETED):
            return None
        job = job_add(run_id=run_id, step=step, key=key, queue=spec.queue, payload=payload)
        if job is not None:
            transaction.on_commit(lambda: dispatch(job_id=job.pk, queue=job.queue, run_id=run_id))
    return job.pk if job is not None else None


def add_child_run(
    *, run_id: int, graph: Graph, step: str, key: str, config: dict[str, Any], payload: dict[str, Any] | None = None,
    room: Callable[[list[Job]], bool] | None = None,
) -> int | None:
    """Fan-out to a child run (a sweep's trial): the child is created (validated like any run, owned by the
    parent's owner) with a job of the parent's `step` that waits for it; returns the child's id. `room(jobs)`,
    asked with the parent locked, may refuse (None): two callers at once never both take the last place."""
    from .services import run_create

    spec = graph.step(step)
    if not spec.spawned:
        raise ValueError(f"step {step} is not declared spawned_by another step")
    with transaction.atomic():
        parent = PipelineRun.objects.select_for_update().only("pk", "owner", "status").get(pk=run_id)
        if parent.status in TERMINAL_STATUSES:
            raise JobAbandoned(f"run {run_id} is {parent.status}")
        if room is not None and not room(list(Job.objects.filter(run_id=run_id))):
            return None
        child = run_create(config=config, owner=parent.owner, parent_id=run_id)
        job_add(run_id=run_id, step=step, key=key, queue=spec.queue, payload=payload, child_id=child.pk)
    return child.pk


def dispatch(*, job_id: int, queue: str, run_id: int) -> None:
    """A queued job to its worker: the RQ queue, or (embedded default) this process's driver of the run."""
    if not settings.JOBS_INLINE:
        queues.send_job(func=run_job, queue=queue, job_id=job_id)
    else:
        _ensure_driver(run_id)


def start(*, run_id: int) -> None:
    """After the run's creation commits: send its first jobs (or run them inline).

    Inside `inline_foreground()` a run created by the caller itself is left to
    the caller's `drive_inline`; a child run created by a job gets a driver of its own.
    """
    if not settings.JOBS_INLINE:
        for job_id, queue in Job.objects.filter(run_id=run_id, state=JobState.QUEUED).values_list("pk", "queue"):
            queues.send_job(func=run_job, queue=queue, job_id=job_id)
    elif not getattr(_local, "foreground", False):
        _ensure_driver(run_id)


def resend_lost_job(*, job_id: int, queue: str) -> str | None:
    """The reaper's hand: send again a queued job that RQ lost (see queues.resend_lost_job)."""
    return queues.resend_lost_job(func=run_job, queue=queue, job_id=job_id)


def resend_after_lost_worker(*, job_id: int, queue: str, run_id: int) -> None:
    """The reaper's hand for a job whose worker died and that goes on (a fine-tune resuming, a scoring retried)."""
    if settings.JOBS_INLINE:
        _ensure_driver(run_id)  # a thread of this process (the embedded server, whose pages reap)
    else:
        queues.replace_dead_job(func=run_job, queue=queue, job_id=job_id)


# --- when a run ends


def after_run_ended(*, run_id: int, status: str, queued: list[tuple[int, str]]) -> None:
    """After a terminal transition commits (whoever made it): the queues, MLflow, the registry, children, parent.

    Each part is best effort and idempotent: the run's state is already recorded.
    """
    queues.remove_queued_jobs(jobs=queued)
    run = PipelineRun.objects.only("pk", "mlflow_run_id", "parent_id", "status").filter(pk=run_id).first()
    if run is None:
        return
    if run.mlflow_run_id and status != RunStatus.COMPLETED:
        _best_effort(run_id, "mark its MLflow run", lambda: tracking.mlflow_finish(run.mlflow_run_id, "KILLED" if status == RunStatus.CANCELLED else "FAILED"))
    if status != RunStatus.COMPLETED:
        _after_abandon(run_id)
        for child_id in PipelineRun.objects.filter(parent_id=run_id).exclude(status__in=TERMINAL_STATUSES).values_list("pk", flat=True):
            _best_effort(run_id, f"cancel child run {child_id}", lambda child_id=child_id: _cancel_quietly(child_id, f"its parent run #{run_id} ended {status}"))
    if run.parent_id is not None:
        _best_effort(run_id, "tell its parent", lambda: child_ended(child_id=run_id))


def _after_abandon(run_id: int) -> None:
    """A job's output was dropped, or the run ended: no registered version the database does not record."""
    from .promotion import forget_unrecorded_versions

    status = PipelineRun.objects.values_list("status", flat=True).filter(pk=run_id).first()
    if status in (RunStatus.FAILED, RunStatus.CANCELLED):
        _best_effort(run_id, "delete unrecorded registered versions", lambda: forget_unrecorded_versions(run_id))
        _best_effort(run_id, "delete unrecorded exports", lambda: _forget_exports(run_id))


def _forget_exports(run_id: int) -> None:
    """A run whose config export (export_at_end) registered, then failed or was cancelled before recording it."""
    from .export import forget_unrecorded_exports

    run = PipelineRun.objects.get(pk=run_id)
    if run.mlflow_run_id and (run.config.get("datasets") or {}).get("train"):
        forget_unrecorded_exports(run)


def _cancel_quietly(run_id: int, message: str) -> None:
    from .services import InvalidTransition

    try:
        run_cancel(run_id=run_id, message=message)
    except InvalidTransition:
        pass  # it ended meanwhile


def child_ended(*, child_id: int) -> None:
    """A child run ended: the parent's job that waited for it ends too (done if the child completed), and the
    parent's graph moves on. The parent step's `tolerate_failure` says whether a failed child fails the parent."""
    child = PipelineRun.objects.only("pk", "status", "error", "parent_id").get(pk=child_id)
    waiting = Job.objects.filter(child_id=child_id, state=JobState.WAITING).select_related("run").first()
    if waiting is None:
        return
    parent = waiting.run
    graph = kind_of(parent).graph_of(parent)
    succeeded = child.status == RunStatus.COMPLETED
    with transaction.atomic():
        locked = _locked(parent.pk)
        if locked.status in TERMINAL_STATUSES:
            return
        if not job_end_waiting(job_id=waiting.pk, succeeded=succeeded, output={"child": child_id, "status": child.status},
                               error="" if succeeded else f"child run #{child_id} ended {child.status}: {child.error}"):
            return
        _follow(parent.pk, graph, waiting, state=JobState.DONE if succeeded else JobState.FAILED)
        step = graph.step(waiting.step)
        if not succeeded and not step.tolerate_failure:
            run_fail(run_id=parent.pk, reason=f"{waiting.label} failed: child run #{child_id} ended {child.status}")
            return
        _advance(locked, graph, message=f"{waiting.label} ended ({child.status})")


def _best_effort(run_id: int, what: str, call) -> None:
    try:
        call()
    except Exception:
        log.warning("run %s: could not %s", run_id, what, exc_info=True)


def _log(run_id: int, line: str) -> None:
    try:
        RunLog(run_id)(line)
    except DatabaseError:
        log.exception("run %s: could not append to the run's logs", run_id)
        drop_broken_connection()


# --- the embedded default: no queues, jobs run in this process

_local = threading.local()


@contextlib.contextmanager
def inline_foreground() -> Iterator[None]:
    """Inside this block, inline runs are left to the caller's drive_inline()."""
    previous = getattr(_local, "foreground", False)
    _local.foreground = True
    try:
        yield
    finally:
        _local.foreground = previous


# Runs a thread of this process drives now; a job queued for one of them is left to that driver.
_driven: set[int] = set()
_driven_lock = threading.Lock()
WAIT_FOR_CHILDREN_SECONDS = 0.5


# Inline, this process is the one gpu worker: one gpu job at a time (a sweep's trials run side by side in threads,
# and loading two models at once in one process is not safe: Transformers builds them on a process-wide meta device).
_inline_gpu = threading.Lock()


@contextlib.contextmanager
def _inline_device(queue: str) -> Iterator[None]:
    if settings.JOBS_INLINE and queue == "gpu":
        with _inline_gpu:
            yield
    else:
        yield


_preloaded = threading.Lock()
_preload_done: list[bool] = []


def _preload_once() -> None:
    """The ML stack imported once, before any thread of this process runs a job: Transformers' lazy modules are not
    safe to import from two threads at once (a sweep's trials run side by side inline)."""
    if _preload_done:
        return
    with _preloaded:
        if not _preload_done:
            from .worker import preload

            preload()
            _preload_done.append(True)


def drive_inline(run_id: int) -> None:
    """Run the run's queued jobs in this process, oldest first, until the run ends or nothing is left to do
    (embedded default). While its jobs wait for child runs (driven by threads of their own), it waits too."""
    _preload_once()
    with _driven_lock:
        if run_id in _driven:
            log.info("run %s is driven by another thread of this process already", run_id)
            return
        _driven.add(run_id)
    try:
        while True:
            status = PipelineRun.objects.values_list("status", flat=True).get(pk=run_id)
            with _driven_lock:
                job_id = Job.objects.filter(run_id=run_id, state=JobState.QUEUED).order_by("id").values_list("pk", flat=True).first()
                waiting = job_id is None and Job.objects.filter(run_id=run_id, state=JobState.WAITING).exists()
                # (a completed run may still have on-demand jobs queued: an export)
                if status in (RunStatus.FAILED, RunStatus.CANCELLED) or (job_id is None and not waiting):
                    _driven.discard(run_id)  # under the lock: a job dispatched from now on starts a new driver
                    return
            if job_id is None:
                time.sleep(WAIT_FOR_CHILDREN_SECONDS)
                continue
            run_job(job_id)
    finally:
        with _driven_lock:
            _driven.discard(run_id)


def _ensure_driver(run_id: int) -> None:
    with _driven_lock:
        if run_id in _driven:
            return
    threading.Thread(target=_drive_in_thread, args=(run_id,), name=f"run-{run_id}", daemon=True).start()


def _drive_in_thread(run_id: int) -> None:
    try:
        drive_inline(run_id)
    except Exception:  # The job already recorded the failure on the run.
        log.exception("inline run %s failed", run_id)
    finally:
        connection.close()
        close_old_connections()
