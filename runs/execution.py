"""Job plumbing the step registry (runs/pipeline.py) wraps every step body in.

A live job keeps its heartbeat fresh from a side thread, its log lines are
timestamped into the run's logs, and best-effort writes survive a dropped
database connection.

A lost database connection (server restarted, backend terminated) is closed
before the failure is recorded, so recording it reconnects; the heartbeat
thread and other best-effort writes (`tolerate_db_errors`) survive one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from django.conf import settings
from django.db import Error as DatabaseError
from django.db import connection
from django.utils import timezone

from .models import RunStatus
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
