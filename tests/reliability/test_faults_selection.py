"""Checkpoint selection on real workers when workers die: a cpu worker lost while it scores a checkpoint (its job
is sent again and the run completes), and a gpu worker lost after a checkpoint was scored (the resumed fine-tune
keeps the scores already stored). A local stand-in judge that takes its time keeps each scoring job busy long
enough to be killed in the middle of it."""

from __future__ import annotations

import psutil
import pytest

from runs.models import ACTIVE_STATUSES, Job, PipelineRun
from tests.conftest import token_client
from tests.judge_server import JudgeServer

from . import fault_tools
from .fault_tools import SHORT_FINETUNE, sigkill, wait_until

owned_redis, owned_rq_settings, processes = fault_tools.owned_redis_fixture, fault_tools.owned_rq_settings_fixture, fault_tools.processes_fixture

pytestmark = [pytest.mark.reliability, pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]

STALE_SECONDS = 8


def selecting(judge_url: str, **training) -> dict:
    return {
        **SHORT_FINETUNE, "name": "fault-selection",
        "training": {**SHORT_FINETUNE["training"], "max_steps": 6, "epochs": 1, "checkpoint_every": 2, "max_attempts": 2, **training},
        "evaluation": {**SHORT_FINETUNE["evaluation"], "metrics": ["rouge_score", "faithfulness"],
                       "judge": {"base_url": judge_url, "model": "judge", "api_key_env": "NO_KEY_NEEDED", "timeout": 60}},
        "selection": {"metric": "rouge_score", "every": 2, "patience": None, "rows": 0.05, "max_rows": 2},
    }


def checkpoint_jobs(run_id: int) -> list[Job]:
    return list(Job.objects.filter(run_id=run_id, step="score_checkpoint").order_by("key"))


def ended(run_id: int) -> bool:
    return PipelineRun.objects.get(pk=run_id).is_terminal


def test_a_cpu_worker_lost_while_scoring_a_checkpoint_has_its_job_sent_again_and_the_run_completes(owned_rq_settings, processes, user, ledger):
    ledger.record("fault", "SIGKILL the whole cpu worker while it scores a checkpoint (selection)",
                  f"the reaper ({STALE_SECONDS}s) sends the scoring job again (attempt 2); every checkpoint scored; the run completes")
    with JudgeServer(mode="delayed", delay=3) as judge:
        api = token_client(user)
        processes.worker("gpu")
        cpu = processes.worker("cpu")
        processes.reaper(stale_seconds=STALE_SECONDS, requeue_grace=5)
        run_id = api.post("/api/runs/", selecting(judge.base_url), format="json").json()["id"]
        try:
            wait_until(lambda: any(j.state == "running" for j in checkpoint_jobs(run_id)), 240, "a checkpoint's scoring to start", every=0.1)
            victim = next(j for j in checkpoint_jobs(run_id) if j.state == "running")
            for horse in processes.horses("cpu"):
                sigkill(horse)
            sigkill(psutil.Process(cpu.pid))
            cpu.wait(timeout=10)
            processes.supervise("cpu")  # what systemd / docker's restart policy does
            wait_until(lambda: ended(run_id), STALE_SECONDS + 360, "the run to end")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{processes.logs()}") from exc
    run = PipelineRun.objects.get(pk=run_id)
    assert run.status == "completed", run.logs
    victim.refresh_from_db()
    assert victim.state == "done" and victim.attempts == 2
    assert "sending the score_checkpoint job again (attempt 2 of 3)" in run.logs
    scored = {j.key: j.output["metrics"]["rouge_score"]["mean"] for j in checkpoint_jobs(run_id)}
    assert set(scored) == {"ckpt-2", "ckpt-4", "ckpt-6"} and all(v is not None for v in scored.values())
    chosen = Job.objects.get(run_id=run_id, step="select").output
    assert chosen["chosen_step"] in (2, 4, 6) and not [p for p in chosen["points"] if p["mean"] is None]
    assert not PipelineRun.objects.filter(status__in=ACTIVE_STATUSES).exists()


def test_a_gpu_worker_lost_after_a_scored_checkpoint_resumes_and_keeps_the_scores(owned_rq_settings, processes, user, ledger):
    ledger.record("fault", "SIGKILL the whole gpu worker after a checkpoint was scored (selection)",
                  "the fine-tune resumes from its checkpoint (attempt 2); the scores already stored are kept, not redone; the run completes")
    with JudgeServer(mode="ok") as judge:
        api = token_client(user)
        gpu = processes.worker("gpu")
        processes.worker("cpu")
        processes.reaper(stale_seconds=STALE_SECONDS, requeue_grace=5)
        run_id = api.post("/api/runs/", selecting(judge.base_url, max_steps=12, epochs=2), format="json").json()["id"]
        finetune = lambda: Job.objects.get(run_id=run_id, step="finetune")  # noqa: E731

        def scored_and_checkpointed() -> bool:
            done = [j for j in checkpoint_jobs(run_id) if j.state == "done"]
            job = finetune()
            return bool(done) and job.state == "running" and (job.checkpoint_step or 0) >= max(j.output["step"] for j in done)

        try:
            wait_until(scored_and_checkpointed, 300, "a scored checkpoint and a fine-tune checkpoint past it", every=0.1)
            before = {j.key: (j.attempts, j.output) for j in checkpoint_jobs(run_id) if j.state == "done"}
            for horse in processes.horses("gpu"):
                sigkill(horse)
            sigkill(psutil.Process(gpu.pid))
            gpu.wait(timeout=10)
            processes.supervise("gpu")
            wait_until(lambda: ended(run_id), STALE_SECONDS + 400, "the resumed run to end")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{processes.logs()}") from exc
    run = PipelineRun.objects.get(pk=run_id)
    assert run.status == "completed", run.logs
    assert finetune().attempts == 2 and "resuming from step" in run.logs
    after = {j.key: (j.attempts, j.output) for j in checkpoint_jobs(run_id)}
    for key, kept in before.items():
        assert after[key] == kept  # scored once, kept by the resumed attempt
    assert sorted(after) == sorted(f"ckpt-{s}" for s in range(2, 13, 2))
    assert Job.objects.get(run_id=run_id, step="select").output["chosen_step"] in range(2, 13, 2)
