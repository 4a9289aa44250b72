"""Killed workers: SIGKILL the work-horse mid-training, or the whole worker (parent
and horse). Neither reports anything; the reaper must end the run `failed` with
a reason, and a retry of the run must then complete."""

from __future__ import annotations

import time

import psutil
import pytest

from runs.models import ACTIVE_STATUSES, Job, PipelineRun
from tests.conftest import status_changes, token_client

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
        assert status_changes(run) == ["pending", "training", "failed"]
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
    assert status_changes(again) == ["pending", "training", "evaluating", "completed"]
    assert len(again.train_history) == SHORT_FINETUNE["training"]["max_steps"]
    assert again.results.filter(metric="rouge_score", value__isnull=False).count() == 1
    assert PipelineRun.objects.get(pk=run_id).status == "failed"  # the original keeps its history
    assert f"retried as run #{again.pk}" in PipelineRun.objects.get(pk=run_id).logs
    assert not PipelineRun.objects.filter(status__in=ACTIVE_STATUSES).exists()


RESUMABLE = {
    **SHORT_FINETUNE,
    "name": "fault-resume",
    "training": {**SHORT_FINETUNE["training"], "max_steps": 24, "epochs": 3, "checkpoint_every": 3, "eval_every": 6, "max_attempts": 2},
}


def adapter_weights(run_id: int) -> dict:
    from safetensors.torch import load_file

    from runs.step_io import run_dir

    return load_file(str(run_dir(run_id) / "adapter" / "adapter_model.safetensors"))


def finetune_job(run_id: int) -> Job:
    return Job.objects.get(run_id=run_id, step="finetune")


def checkpointed_past(run_id: int, step: int) -> bool:
    job = finetune_job(run_id)
    return (job.checkpoint_step or 0) >= step and job.state == "running"


def kill_after_checkpoint(processes, run_id: int, *, step: int, whole_worker: bool) -> int:
    """SIGKILL the gpu work-horse (and its parent) once the run has a checkpoint at `step` or later; the checkpoint step."""
    wait_until(lambda: checkpointed_past(run_id, step), 240, f"a checkpoint at step {step} or later", every=0.05)
    gpu = processes.by_name["worker-gpu"]
    (horse,) = processes.horses("gpu")
    sigkill(horse)
    if whole_worker:
        sigkill(psutil.Process(gpu.pid))
    return finetune_job(run_id).checkpoint_step


def test_a_sigkilled_fine_tune_resumes_from_its_checkpoint_and_ends_with_the_adapter_of_an_uninterrupted_run(
    owned_rq_settings, processes, user, ledger,
):
    ledger.record(
        "fault", "SIGKILL the whole gpu worker mid-training, after a checkpoint",
        f"the reaper ({STALE_SECONDS}s) sends the fine-tune again; it resumes from the checkpoint (event and log say so), "
        "completes with attempts 2, a loss curve with every step once, and LoRA weights equal to an uninterrupted run's within 1e-5",
    )
    api = token_client(user)
    processes.worker("gpu")
    processes.worker("cpu")
    processes.reaper(stale_seconds=STALE_SECONDS, requeue_grace=5)
    try:
        whole_id = api.post("/api/runs/", {**RESUMABLE, "name": "fault-resume-whole"}, format="json").json()["id"]
        wait_until(lambda: ended(whole_id), 300, "the uninterrupted run to end")
        whole = PipelineRun.objects.get(pk=whole_id)
        assert whole.status == "completed" and finetune_job(whole_id).attempts == 1, whole.logs

        run_id = api.post("/api/runs/", RESUMABLE, format="json").json()["id"]
        at = kill_after_checkpoint(processes, run_id, step=3, whole_worker=True)
        gpu = processes.by_name["worker-gpu"]
        assert gpu.wait(timeout=10) is not None
        processes.supervise("gpu")  # what systemd / docker's restart policy does
        wait_until(lambda: ended(run_id), STALE_SECONDS + 300, "the resumed run to end")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{processes.logs()}") from exc
    run = PipelineRun.objects.get(pk=run_id)
    assert run.status == "completed", run.logs
    assert finetune_job(run_id).attempts == 2
    messages = list(run.events.values_list("message", flat=True))
    assert any(f"resuming from step {at} after the worker was lost (attempt 2 of 2)" in m for m in messages), messages
    assert f"attempt 2: resumed from step {at} after the worker was lost" in run.logs
    assert [e["step"] for e in run.train_history] == list(range(1, 25))
    assert [e["loss"] for e in run.train_history] == pytest.approx([e["loss"] for e in whole.train_history], abs=1e-5)
    assert finetune_job(run_id).output["best_step"] == finetune_job(whole_id).output["best_step"] is not None
    a, b = adapter_weights(whole_id), adapter_weights(run_id)
    assert a.keys() == b.keys() and a
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert not PipelineRun.objects.filter(status__in=ACTIVE_STATUSES).exists()


def test_a_fine_tune_that_loses_its_worker_on_every_attempt_fails_after_max_attempts(owned_rq_settings, processes, user, ledger):
    ledger.record(
        "fault", "SIGKILL the gpu work-horse on every attempt (training.max_attempts 2)",
        "the first loss resumes the run (attempt 2), the second fails it with a reason naming the attempts; nothing left running",
    )
    api = token_client(user)
    processes.worker("gpu")
    processes.worker("cpu")
    processes.reaper(stale_seconds=STALE_SECONDS, requeue_grace=5)
    run_id = api.post("/api/runs/", RESUMABLE, format="json").json()["id"]
    try:
        first = kill_after_checkpoint(processes, run_id, step=3, whole_worker=False)
        wait_until(lambda: finetune_job(run_id).attempts == 2, STALE_SECONDS + 30, "the reaper to resume the run")
        kill_after_checkpoint(processes, run_id, step=first + 3, whole_worker=False)
        wait_until(lambda: ended(run_id), STALE_SECONDS + 30, "the reaper to end the run")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{processes.logs()}") from exc
    run = PipelineRun.objects.get(pk=run_id)
    assert run.status == "failed" and finetune_job(run_id).attempts == 2, run.logs
    assert "worker lost: no heartbeat" in run.error and "2 attempts of training.max_attempts 2 used" in run.error
    assert not PipelineRun.objects.filter(status__in=ACTIVE_STATUSES).exists()
