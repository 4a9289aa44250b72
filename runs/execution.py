"""Job plumbing the engine (runs/pipeline.py) wraps every job's body in.

A live job keeps its heartbeat fresh from a side thread (which also measures
the job's peak memory), its log lines are timestamped into the run's logs, and
best-effort writes survive a dropped database connection.

A lost database connection (server restarted, backend terminated) is closed
before the failure is recorded, so recording it reconnects; the heartbeat
thread and other best-effort writes (`tolerate_db_errors`) survive one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

from django.conf import settings
from django.db import Error as DatabaseError
from django.db import connection
from django.utils import timezone

from .models import RunStatus
from .services import InvalidTransition, job_heartbeat, run_append_logs, run_transition

log = logging.getLogger(__name__)


class JobAbandoned(Exception):
    """The job's work is not wanted any more: its run ended (cancelled, failed) or the reaper gave the job to
    another attempt while this one worked."""


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


class Pulse:
    """The running job's side thread: the heartbeat every HEARTBEAT_SECONDS, and the process's resident memory
    sampled a few times a second, so the job's own peak (not the process's lifetime maximum) is known."""

    SAMPLE_SECONDS = 0.25

    def __init__(self, job_id: int, attempt: int, every: float | None = None) -> None:
        self.job_id, self.attempt = job_id, attempt
        self.interval = every if every is not None else settings.HEARTBEAT_SECONDS
        self.peak_rss_bytes: int | None = None
        self.start_rss_bytes: int | None = None
        self.lost = False  # this attempt no longer holds the job
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pulse-job-{job_id}", daemon=True)

    def _sample(self) -> None:
        rss = _rss_bytes()
        if rss is not None and (self.peak_rss_bytes is None or rss > self.peak_rss_bytes):
            self.peak_rss_bytes = rss

    def _beat(self) -> None:
        with tolerate_db_errors(f"job {self.job_id}: heartbeat"):
            if not job_heartbeat(job_id=self.job_id, attempt=self.attempt):
                self.lost = True

    def _run(self) -> None:
        try:
            last_beat = time.monotonic()
            while not self._stop.wait(min(self.SAMPLE_SECONDS, self.interval)):
                self._sample()
                if time.monotonic() - last_beat >= self.interval:
                    last_beat = time.monotonic()
                    self._beat()
        finally:
            _close_quietly()

    def figures(self) -> dict[str, int]:
        """The process's peak resident memory while the job ran, and how much of it the job added."""
        if self.peak_rss_bytes is None:
            return {}
        out = {"peak_rss_bytes": self.peak_rss_bytes}
        if self.start_rss_bytes is not None:
            out["rss_growth_bytes"] = max(0, self.peak_rss_bytes - self.start_rss_bytes)
        return out

    def __enter__(self) -> Pulse:
        self.start_rss_bytes = _rss_bytes()
        self._sample()
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()


def _rss_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or the platform does not say: no figure rather than a wrong one
        return None


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
