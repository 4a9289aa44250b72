"""Killed workers: SIGKILL the work-horse mid-training, or the whole worker (parent
and horse). Neither reports anything; the reaper must end the run `failed` with
a reason, and a retry of the run must then complete."""

from __future__ import annotations

import time

import psutil
import pytest

from runs.models import ACTIVE_STATUSES, PipelineRun
from tests.conftest import token_client

from . import fault_tools
from .fault_tools import SHORT_FINETUNE, sigkill, wait_until

owned_redis, owned_rq_settings, processes = fault_tools.owned_redis_fixture, fault_tools.owned_rq_settings_fixture, fault_tools.processes_fixture

pytestmark = [pytest.mark.reliability, pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]

STALE_SECONDS = 8  # the reaper's limit in these tests (workers beat every second)


def training_started(run_id: int) -> bool:
    run = PipelineRun.objects.only("status", "train_history").get(pk=run_id)
    return run.status == "training" and len(run.train_history) >= 1


def ended(run_id: int) -> bool:
    return PipelineRun.objects.get(pk=run_id).is_terminal


@pytest.mark.parametrize("target", ["work-horse", "whole worker"])
def test_a_sigkilled_worker_fails_its_run_through_the_reaper_and_a_retry_completes(target, owned_rq_settings, processes, user, ledger):
    ledger.record(
        "fault", f"SIGKILL the {target} mid-training",
        f"run failed with 'worker lost' within the reaper's limit ({STALE_SECONDS}s) + 30s; nothing left training/evaluating; "
        "POST /retry/ gives a new run that completes",
    )
    api = token_client(user)
    gpu = processes.worker("gpu")
    processes.worker("cpu")
    processes.reaper(stale_seconds=STALE_SECONDS, requeue_grace=5)
    run_id = api.post("/api/runs/", SHORT_FINETUNE, format="json").json()["id"]
    try:
        wait_until(lambda: training_started(run_id), 180, "training to start")
        (horse,) = processes.horses("gpu")
        victims = [horse] if target == "work-horse" else [horse, psutil.Process(gpu.pid)]
        killed_at = time.monotonic()
        for victim in victims:
            sigkill(victim)
        assert PipelineRun.objects.get(pk=run_id).status == "training"  # nobody told the database

        wait_until(lambda: ended(run_id), STALE_SECONDS + 30, "the reaper to end the run")
        took = time.monotonic() - killed_at
        run = PipelineRun.objects.get(pk=run_id)
        assert run.status == "failed", run.logs
        assert took <= STALE_SECONDS + 30
        assert "worker lost: no heartbeat" in run.error and "while training (finetune:running)" in run.error
        assert list(run.events.values_list("to_status", flat=True)) == ["pending", "training", "failed"]
        assert not PipelineRun.objects.filter(status__in=ACTIVE_STATUSES).exists()

        if target == "work-horse":
            assert gpu.poll() is None, "the worker's parent outlives its horse and takes the next job"
        else:
            assert gpu.wait(timeout=10) is not None
            processes.supervise("gpu")  # what systemd / docker's restart policy does

        response = api.post(f"/api/runs/{run_id}/retry/")
        assert response.status_code == 201, response.content
        retry = response.json()
        assert retry["status"] == "pending" and retry["id"] != run_id
        assert retry["name"] == f"{SHORT_FINETUNE['name']} (retry of #{run_id})"
        assert {k: v for k, v in retry["config"].items() if k != "name"} == {k: v for k, v in run.config.items() if k != "name"}

        wait_until(lambda: ended(retry["id"]), 300, "the retry to end")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{processes.logs()}") from exc
    again = PipelineRun.objects.get(pk=retry["id"])
    assert again.status == "completed", again.logs
    assert list(again.events.values_list("to_status", flat=True)) == ["pending", "training", "evaluating", "completed"]
    assert len(again.train_history) == SHORT_FINETUNE["training"]["max_steps"]
    assert again.results.filter(metric="rouge_score", value__isnull=False).count() == 1
    assert PipelineRun.objects.get(pk=run_id).status == "failed"  # the original keeps its history
    assert f"retried as run #{again.pk}" in PipelineRun.objects.get(pk=run_id).logs
    assert not PipelineRun.objects.filter(status__in=ACTIVE_STATUSES).exists()
