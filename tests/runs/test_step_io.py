"""What a step body records about its run through the StepContext: the first-use model build as a timeline
stage, and the training history entries the live page reads."""

from __future__ import annotations

import pytest

from runs.page_data import run_live_stats, run_timeline
from training.finetune import StepInfo

from .factories import make_run, step_context

pytestmark = pytest.mark.django_db


def test_a_first_use_build_is_its_own_timeline_stage_with_a_duration(user):
    run = make_run(user, status="training")
    report = step_context(run).build_progress()
    for step in range(4):
        report(step, 3)
    timeline = run_timeline(run)
    messages = [entry["message"] for entry in timeline]
    assert messages[-2] == "building local:tiny-llama on first use"
    assert messages[-1].startswith("local:tiny-llama built in ") and messages[-1].endswith("fine-tuning goes on")
    assert timeline[-2]["seconds"] is not None and timeline[-2]["status"] == "training"
    assert "built in" in run.__class__.objects.get(pk=run.pk).logs


def test_each_training_step_records_tokens_time_and_device_for_the_live_page_and_the_job_its_peak_memory(user):
    run = make_run(user, status="training")
    ctx = step_context(run)
    for step in (1, 2):
        ctx.record_step(StepInfo(step=step, total_steps=4, epoch=step / 4, loss=2.0 / step, learning_rate=1e-4, tokens=100 * step,
                                 elapsed_seconds=2.0 * step, device="cpu", peak_memory_bytes=3 * 2**30))
    ctx.close()
    run.refresh_from_db()
    last = run.train_history[-1]
    assert {k: last[k] for k in ("tokens", "elapsed_seconds", "device", "peak_memory_bytes")} == {
        "tokens": 200, "elapsed_seconds": 4.0, "device": "cpu", "peak_memory_bytes": 3 * 2**30}
    stats = run_live_stats(run)
    assert stats["device"] == "cpu" and stats["total_steps"] == 4
    assert stats["tokens_per_second"] == pytest.approx(50.0) and stats["steps_per_second"] == pytest.approx(0.5)
    assert stats["peak_memory_bytes"] is None and "peak memory (measured when the training job ends)" in stats["not_recorded"]
    assert "step 1/4 epoch 0.25: loss 2.0000" in run.logs
    ctx.record_figures({"peak_rss_bytes": 3 * 2**30, "rss_growth_bytes": 2**30})  # what the engine's pulse measured
    stats = run_live_stats(run.__class__.objects.get(pk=run.pk))
    assert stats["peak_memory_bytes"] == 3 * 2**30 and "resident memory while the training job ran" in stats["peak_memory_basis"]
