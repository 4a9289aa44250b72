"""The step registry (runs/pipeline.py): chains per kind, moving on, completion, failure, double delivery, cancel."""

from __future__ import annotations

import pytest

from evaluation.scoring import ScoredSamples
from evaluation.steps import ScoredSet, score_step
from runs import pipeline
from runs.models import PipelineRun, RunEvent, RunResult, SampleResult
from runs.pipeline import chain_for, inline_foreground, run_step
from runs.services import run_cancel, run_create
from tests.runs.factories import eval_only_config, finetune_config, replace_step_body

pytestmark = pytest.mark.django_db(transaction=True)


def test_each_kind_has_its_chain_of_steps_and_queues():
    assert [(s.name, s.queue, s.status) for s in chain_for(kind="finetune", answers="generate")] == [
        ("finetune", "gpu", "training"), ("generate", "gpu", "evaluating"), ("score", "cpu", "evaluating"), ("compare", "cpu", "evaluating"),
    ]
    assert [(s.name, s.queue) for s in chain_for(kind="eval_only", answers="generate")] == [("generate", "gpu"), ("score", "cpu")]
    assert [(s.name, s.queue) for s in chain_for(kind="eval_only", answers="dataset")] == [("score", "cpu")]


def test_the_progress_shares_of_a_chain_rise_and_end_below_100():
    for chain in (pipeline.FINETUNE, pipeline.EVAL_GENERATE, pipeline.EVAL_STORED_ANSWERS):
        edges = [edge for step in chain for edge in step.progress]
        assert edges == sorted(edges) and edges[-1] < 100  # 100 is for `completed`


def created(user, config) -> PipelineRun:
    with inline_foreground():  # created, not driven: the test runs the steps
        return run_create(config=config, owner=user)


def test_a_finished_step_queues_the_next_one_and_moves_the_status(user, monkeypatch):
    run = created(user, finetune_config())
    replace_step_body(monkeypatch, "finetune", lambda ctx: None)
    monkeypatch.setattr(pipeline, "FINETUNE", tuple(s if s.name != "finetune" else _no_store(s) for s in pipeline.FINETUNE))
    run_step(run.pk, "finetune")
    run.refresh_from_db()
    assert (run.status, run.current_job, run.progress) == ("evaluating", "generate:queued", 70)
    assert list(run.events.values_list("from_status", "to_status")) == [("pending", "pending"), ("pending", "training"), ("training", "evaluating")]


def _no_store(step):
    import dataclasses

    return dataclasses.replace(step, store=lambda ctx, output: None)


def test_the_last_step_completes_the_run_with_its_results(user):
    run = created(user, eval_only_config())
    run_step(run.pk, "score")
    run.refresh_from_db()
    assert (run.status, run.current_job, run.progress) == ("completed", "score:done", 100)
    assert RunResult.objects.filter(run=run).count() == 2 and SampleResult.objects.filter(run=run).count() == 4
    assert run.events.last().message == "score finished"


def test_a_step_delivered_twice_runs_once(user, monkeypatch):
    run = created(user, eval_only_config())
    calls = []

    def body(ctx):
        calls.append(ctx.run_id)
        return score_step(ctx)

    replace_step_body(monkeypatch, "score", body)
    run_step(run.pk, "score")
    run_step(run.pk, "score")  # the redelivery finds the step done and does nothing
    assert calls == [run.pk]
    assert RunEvent.objects.filter(run=run, to_status="completed").count() == 1


def test_a_body_that_raises_fails_the_run_and_stores_nothing(user, monkeypatch):
    run = created(user, eval_only_config())

    def body(ctx):
        raise ValueError("the engine broke")

    replace_step_body(monkeypatch, "score", body)
    with pytest.raises(ValueError):
        run_step(run.pk, "score")
    run.refresh_from_db()
    assert run.status == "failed" and run.error == "score failed: ValueError: the engine broke"
    assert "Traceback" in run.logs and not run.results.exists()


def test_a_store_that_raises_leaves_neither_results_nor_completion(user, monkeypatch):
    """Storing a step's output and moving the run on are one transaction."""
    run = created(user, eval_only_config())
    real = pipeline.EVAL_STORED_ANSWERS[0]

    def store(ctx, output):
        real.store(ctx, output)  # the samples and results are written...
        raise RuntimeError("MLflow went away")  # ...and then rolled back with the rest

    import dataclasses

    monkeypatch.setattr(pipeline, "EVAL_STORED_ANSWERS", (dataclasses.replace(real, store=store),))
    with pytest.raises(RuntimeError):
        run_step(run.pk, "score")
    run.refresh_from_db()
    assert run.status == "failed"
    assert not RunResult.objects.filter(run=run).exists() and not SampleResult.objects.filter(run=run).exists()


def test_a_run_cancelled_while_its_step_worked_keeps_no_results(user, monkeypatch):
    run = created(user, eval_only_config())

    def body(ctx):
        produced = score_step(ctx)
        run_cancel(run_id=ctx.run_id, message="cancelled by the test")
        assert isinstance(produced[0], ScoredSet) and isinstance(produced[0].scored, ScoredSamples)
        return produced

    replace_step_body(monkeypatch, "score", body)
    run_step(run.pk, "score")
    run.refresh_from_db()
    assert run.status == "cancelled"
    assert not RunResult.objects.filter(run=run).exists() and not SampleResult.objects.filter(run=run).exists()
    assert "score stopped: run" in run.logs
