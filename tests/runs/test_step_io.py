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


def test_whether_the_token_limit_cut_an_answer_off_is_stored_and_kept_when_scored_and_copied_to_a_sweep(user):
    from types import SimpleNamespace

    from datasets_app.models import Dataset
    from evaluation.scoring import ScoredSamples
    from evaluation.steps import AnswerSet, Generated, ScoredSet
    from runs.models import SampleResult
    from runs.step_io import store_answers, store_scores
    from runs.sweeps import Winner, store_winner

    run = make_run(user, status="evaluating")
    run.eval_datasets.set([Dataset.objects.get(name="ragas_eval")])
    ctx = step_context(run, "generate")
    rows = ctx.eval_sets()[0].rows  # max_samples 3
    store_answers(ctx, Generated(answer_sets=[
        AnswerSet(dataset="ragas_eval", variant="finetuned", rows=rows, answers=["a", "b", "c"], cut_off=[True, False, True]),
        AnswerSet(dataset="ragas_eval", variant="base", rows=rows, answers=["x", "y", "z"]),  # not recorded
    ], prompt_example="", base_model_info={}))

    def stored(of=run) -> dict[str, list[bool | None]]:
        return {v: list(SampleResult.objects.filter(run=of, variant=v).order_by("index").values_list("cut_off", flat=True))
                for v in ("finetuned", "base")}

    assert stored() == {"finetuned": [True, False, True], "base": [None, None, None]}

    scoring = step_context(run, "score")
    groups = scoring.to_score()
    assert {g.variant: g.cut_off for g in groups} == {"finetuned": [True, False, True], "base": [None, None, None]}
    store_scores(scoring, [
        ScoredSet(dataset=g.dataset, variant=g.variant, indices=g.indices, samples=g.samples, cut_off=g.cut_off,
                  scored=ScoredSamples(scores=[{"rouge_score": 0.5}] * 3, reasons=[{}] * 3, metrics=["rouge_score"]))
        for g in groups
    ])
    assert stored() == {"finetuned": [True, False, True], "base": [None, None, None]}
    assert SampleResult.objects.get(run=run, variant="finetuned", index=0).scores == {"rouge_score": 0.5}

    sweep = make_run(user, status="evaluating")
    store_winner(SimpleNamespace(run_id=sweep.pk, output=None), Winner(child_id=run.pk, trial=0, params={}, score={}, reason="", trials=[]))
    assert stored(sweep) == stored()
