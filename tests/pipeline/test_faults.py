"""Faults with real worker processes: a killed work-horse, a cancel mid-training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import psutil
import pytest

from runs.models import PipelineRun
from runs.reaper import reap_stale_jobs
from tests.conftest import ROOT, status_changes, token_client, worker_env
from tests.runs.factories import finetune_config

pytestmark = [pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]

LONG_FINETUNE = finetune_config(
    training={"epochs": 100, "batch_size": 4, "max_seq_length": 256, "max_truncated_fraction": 1.0, "learning_rate": 1e-3},
    evaluation={"metrics": ["rouge_score"], "max_samples": 2, "max_new_tokens": 4},
)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def gpu_worker(rq_settings, redis_url) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "rqworker", "gpu"],
        env=worker_env(redis_url, HEARTBEAT_SECONDS="1"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    yield proc
    for child in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
        child.kill()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def training_started(run_id: int) -> Callable[[], bool]:
    def check() -> bool:
        run = PipelineRun.objects.get(pk=run_id)
        return run.status == "training" and len(run.train_history) >= 2

    return check


def test_a_sigkilled_work_horse_leaves_the_run_failed_through_the_reaper(gpu_worker, user):
    run_id = token_client(user).post("/api/runs/", LONG_FINETUNE, format="json").json()["id"]
    wait_until(training_started(run_id), 120, "training to start")
    horses = psutil.Process(gpu_worker.pid).children()
    assert len(horses) == 1
    os.kill(horses[0].pid, signal.SIGKILL)
    wait_until(lambda: not horses[0].is_running() or horses[0].status() == psutil.STATUS_ZOMBIE, 10, "the horse to die")

    assert PipelineRun.objects.get(pk=run_id).status == "training"  # nobody told the database
    time.sleep(3)
    reaped = reap_stale_jobs(stale_seconds=2)
    assert [run for run, _ in reaped] == [run_id]
    run = PipelineRun.objects.get(pk=run_id)
    assert run.status == "failed"
    assert "worker lost: no heartbeat" in run.error and "while training" in run.error
    assert not PipelineRun.objects.filter(status__in=["training", "evaluating"]).exists()


def test_cancel_mid_training_stops_the_job_and_queues_nothing_more(gpu_worker, user):
    import django_rq

    api = token_client(user)
    run_id = api.post("/api/runs/", LONG_FINETUNE, format="json").json()["id"]
    wait_until(training_started(run_id), 120, "training to start")
    response = api.post(f"/api/runs/{run_id}/cancel/")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    wait_until(lambda: "finetune stopped" in PipelineRun.objects.get(pk=run_id).logs, 30, "the training loop to stop")
    run = PipelineRun.objects.get(pk=run_id)
    assert run.status == "cancelled"
    assert status_changes(run) == ["pending", "training", "cancelled"]
    assert len(run.train_history) < 100 * 42  # it stopped long before the end
    assert django_rq.get_queue("gpu").job_ids == [] and django_rq.get_queue("cpu").job_ids == []

    from runs.tracking import client

    assert client().get_run(run.mlflow_run_id).info.status == "KILLED"


def test_cancel_removes_a_queued_job(rq_settings, user):
    import django_rq

    api = token_client(user)
    run_id = api.post("/api/runs/", LONG_FINETUNE, format="json").json()["id"]
    assert django_rq.get_queue("gpu").job_ids == [f"job-{PipelineRun.objects.get(pk=run_id).jobs.get().pk}"]
    api.post(f"/api/runs/{run_id}/cancel/")
    assert django_rq.get_queue("gpu").job_ids == []
    assert PipelineRun.objects.get(pk=run_id).status == "cancelled"
