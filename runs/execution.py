"""What every pipeline job does around its work: claim, heartbeat, status, failure.

Jobs stay thin (`finetune_job(run_id)` calls `execute_job(...)` with a body);
this module makes sure a job delivered twice runs once, a live job keeps its
heartbeat fresh, an exception ends the run `failed` with the traceback in its
logs, and a cancelled run stops quietly.

A lost database connection (server restarted, backend terminated) is closed
before the failure is recorded, so recording it reconnects; the heartbeat
thread and other best-effort writes (`tolerate_db_errors`) survive one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import traceback
from collections.abc import Callable, Iterator

from django.conf import settings
from django.db import Error as DatabaseError
from django.db import connection
from django.utils import timezone

from .models import TERMINAL_STATUSES, PipelineRun, RunStatus
from .orchestration import run_claim_job
from .services import InvalidTransition, run_append_logs, run_heartbeat, run_transition

log = logging.getLogger(__name__)


class RunCancelled(Exception):
    """The run left its active status (cancelled) while a job was working on it."""


class RunLog:
    """Timestamped lines appended to the run's logs (and the process log)."""

    def __init__(self, run_id: int) -> None:
        self.run_id = run_id

    def __call__(self, message: str) -> None:
        log.info("run %s: %s", self.run_id, message)
        run_append_logs(run_id=self.run_id, text=f"[{timezone.now():%Y-%m-%d %H:%M:%S}] {message}")


def drop_broken_connection() -> None:
    """Close this thread's database connection if it no longer works, so the next query reconnects.

    Django reconnects only at request boundaries; a job or a thread has none.
    Inside a transaction nothing is closed (the transaction is lost anyway).
    """
    if connection.in_atomic_block or connection.connection is None:
        return
    try:
        usable = connection.is_usable()
    except Exception:
        usable = False
    if not usable:
        _close_quietly()


def _close_quietly() -> None:
    try:
        connection.close()
    except Exception:  # A broken connection may complain about being closed.
        log.debug("closing a broken database connection failed", exc_info=True)


@contextlib.contextmanager
def tolerate_db_errors(what: str) -> Iterator[None]:
    """For writes a job can do without (progress, heartbeat, cancel checks).

    A database error is logged and its connection dropped, and the job goes on;
    the next write reconnects. Writes that matter (results, transitions) are
    not wrapped: their error fails the job. Inside a transaction the error is
    not swallowed (the transaction is unusable after it).
    """
    try:
        yield
    except DatabaseError as exc:
        if connection.in_atomic_block:
            raise
        log.warning("%s skipped after a database error (%s: %s)", what, type(exc).__name__, _first_line(exc))
        drop_broken_connection()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


@contextlib.contextmanager
def heartbeat(run_id: int, every: float | None = None) -> Iterator[None]:
    """Refresh heartbeat_at from a side thread while the block runs.

    A SIGKILLed work-horse takes the thread with it, so the heartbeat goes stale
    and the reaper fails the run. A lost database connection does not stop the
    thread: it reconnects at the next beat.
    """
    interval = every if every is not None else settings.HEARTBEAT_SECONDS
    stop = threading.Event()

    def beat() -> None:
        try:
            while not stop.wait(interval):
                with tolerate_db_errors(f"run {run_id}: heartbeat"):
                    run_heartbeat(run_id=run_id)
        finally:
            _close_quietly()

    thread = threading.Thread(target=beat, name=f"heartbeat-{run_id}", daemon=True)
    run_heartbeat(run_id=run_id)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def check_not_cancelled(run_id: int) -> None:
    status = PipelineRun.objects.values_list("status", flat=True).get(pk=run_id)
    if status in TERMINAL_STATUSES:
        raise RunCancelled(f"run {run_id} is {status}")


def execute_job(*, run_id: int, job: str, status: str, body: Callable[[PipelineRun, RunLog], None]) -> None:
    """Claim `job` for the run, move it to `status` if needed, run body, record failure."""
    if not run_claim_job(run_id=run_id, job=job):
        log.info("run %s: %s job not claimed (already taken, or the run ended); skipping", run_id, job)
        return
    run_log = RunLog(run_id)
    try:
        run = PipelineRun.objects.get(pk=run_id)
        if run.status != status and not run_transition(run_id=run_id, to=status, expected=run.status, message=f"{job} started"):
            raise RunCancelled(f"run {run_id} changed status before {job} started")
        run.refresh_from_db()
        with heartbeat(run_id):
            body(run, run_log)
    except RunCancelled as exc:
        run_log(f"{job} stopped: {exc}")
        _finish_mlflow(run_id, "KILLED")
    except BaseException as exc:
        if isinstance(exc, DatabaseError):
            drop_broken_connection()  # else recording the failure fails the same way
        try:
            run_log(f"{job} failed:\n{traceback.format_exc()}")
        except DatabaseError:
            log.exception("run %s: could not append the failure to the run's logs", run_id)
            drop_broken_connection()
        run_fail(run_id=run_id, reason=failure_reason(job, exc))
        _finish_mlflow(run_id, "FAILED")
        raise


def failure_reason(job: str, exc: BaseException) -> str:
    if isinstance(exc, DatabaseError):
        return f"{job} failed: the database connection was lost or refused the query ({type(exc).__name__}: {_first_line(exc)})"
    return f"{job} failed: {type(exc).__name__}: {exc}"


def run_fail(*, run_id: int, reason: str) -> bool:
    """End a run `failed` unless it already ended (cancelled, or failed by the reaper).

    One retry on a fresh connection after a database error; if the database is
    still unreachable, the run's heartbeat stops and the reaper fails it later.
    """
    for attempt in (1, 2):
        try:
            return run_transition(run_id=run_id, to=RunStatus.FAILED, message=reason[:2000], error=reason)
        except InvalidTransition:
            return False
        except DatabaseError:
            if attempt == 2 or connection.in_atomic_block:
                raise
            log.warning("run %s: recording the failure hit a database error; retrying on a new connection", run_id, exc_info=True)
            _close_quietly()
    return False


def _finish_mlflow(run_id: int, status: str) -> None:
    """Best effort: the pipeline run's state is already recorded in the database."""
    from . import tracking

    try:
        mlflow_run_id = PipelineRun.objects.values_list("mlflow_run_id", flat=True).get(pk=run_id)
        if mlflow_run_id:
            tracking.mlflow_finish(mlflow_run_id, status)
    except Exception:
        log.warning("run %s: could not mark its MLflow run %s", run_id, status, exc_info=True)
