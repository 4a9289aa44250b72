"""The fine-tune kind (runs/kinds/finetune.py): its graph, config rules, and the registry's side effects, which
MLflow gets only after the database recorded them (a cancel or a lost worker in between leaves no version or alias
that the database does not know)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from runs import tracking
from runs.config import ConfigError, validate_config
from runs.kinds import kind_named
from runs.models import Job, PipelineRun, PromotionDecision
from runs.pipeline import drive_inline, inline_foreground, run_job
from runs.promotion import register_step
from runs.reaper import reap_stale_jobs
from runs.services import run_cancel, run_create
from tests.runs.factories import finetune_config, replace_step, step_context

KIND = kind_named("finetune")


def test_its_graph_trains_then_registers_beside_generation_and_gates_after_the_comparison():
    graph = KIND.graph(validate_config(finetune_config()))
    assert [(s.name, s.queue, s.status, s.after) for s in graph.steps] == [
        ("finetune", "gpu", "training", ()),
        ("register", "cpu", "evaluating", ("finetune",)),
        ("generate", "gpu", "evaluating", ("finetune",)),
        ("score", "cpu", "evaluating", ("generate",)),
        ("compare", "cpu", "evaluating", ("score", "register")),
        ("promote", "cpu", "evaluating", ("compare",)),
        ("export", "gpu", "evaluating", ()),  # on demand (runs/export.py): added by a request, also after completion
    ]
    assert [s.name for s in graph.ready([])] == ["finetune"]
    assert [s.name for s in graph.steps if s.on_demand] == ["export"]
    assert {s.name: type(s.on_lost).__name__ for s in graph.steps} == {
        "finetune": "ResumeFromCheckpoint", "register": "Retry", "generate": "FailRun", "score": "Retry", "compare": "Retry", "promote": "Retry",
        "export": "Retry",
    }
    exporting = KIND.graph(validate_config(finetune_config(export={"merged": True, "gguf": "q8_0"})))
    assert [(s.name, s.after, s.on_demand) for s in exporting.steps[-2:]] == [("export", (), True), ("export_at_end", ("promote",), False)]


def test_a_trial_of_a_sweep_leaves_registration_and_promotion_to_its_parent():
    trial = KIND.graph(validate_config(finetune_config()), has_parent=True)
    assert [s.name for s in trial.steps] == ["finetune", "generate", "score", "compare"]


def test_its_config_rules_name_the_field():
    with pytest.raises(ConfigError) as refused:
        validate_config(finetune_config(datasets={"train": [], "eval": ["ragas_eval"]}))
    assert refused.value.errors == [{"field": "datasets.train", "message": "a finetune run needs at least one train dataset"}]
    with pytest.raises(ConfigError) as refused:
        validate_config(finetune_config(promotion={"metric": "bleu_score"}))
    assert refused.value.errors[0]["field"] == "promotion.metric"
    config = validate_config(finetune_config())
    assert config["promotion"]["metric"] == "rouge_score" and config["training"]["lora"]["r"] == 8


def test_it_is_about_the_fine_tuned_model_and_shows_training_and_the_registry():
    config = validate_config(finetune_config())
    assert KIND.main_variant(config) == "finetuned" and KIND.generated_variants(config) == ["finetuned", "base"]
    assert KIND.generated_variants({**config, "evaluation": {**config["evaluation"], "compare_base": False}}) == ["finetuned"]
    assert set(KIND.shows()) == {"training", "data_check", "overlap", "playground", "registry"}
    assert KIND.config_applies("training.lora.r", config) and KIND.config_applies("promotion.metric", config)


def created(user, **overrides) -> PipelineRun:
    with inline_foreground():
        return run_create(config=finetune_config(**overrides), owner=user)


def versions(run: PipelineRun) -> list[str]:
    name = tracking.registered_model_name(base_model=run.base_model, train_datasets=run.config["datasets"]["train"])
    return tracking.versions_of_run(name, run.mlflow_run_id)


@pytest.mark.pipeline
@pytest.mark.django_db(transaction=True)
def test_a_fine_tune_runs_its_graph_and_records_each_jobs_figures(user, tiny_model):
    run = created(user, evaluation={"metrics": ["rouge_score"], "max_samples": 2, "max_new_tokens": 4})
    drive_inline(run.pk)
    run.refresh_from_db()
    assert run.status == "completed", run.logs
    jobs = {j.step: j for j in run.jobs.all()}
    assert list(jobs) == ["finetune", "register", "generate", "score", "compare", "promote"]
    assert all(j.state == "done" and j.attempts == 1 for j in jobs.values())
    figures = jobs["finetune"].figures
    assert figures["device"] == "cpu" and figures["steps"] == 3 and figures["tokens_per_second"] > 0 and figures["peak_rss_bytes"] > 0
    assert jobs["generate"].figures["answers"] == 4 and jobs["finetune"].output["adapter"] == "adapter"
    assert jobs["register"].output == {"model": run.registered_model_name, "version": run.registered_model_version}
    assert versions(run) == [run.registered_model_version]
    decision = PromotionDecision.objects.get(run=run)
    assert decision.applied_at is not None and jobs["promote"].output == {"applied": [decision.pk]}
    assert tracking.version_tags(run.registered_model_name, run.registered_model_version)["promotion.decision"] == decision.decision


@pytest.mark.pipeline
@pytest.mark.django_db(transaction=True)
def test_a_cancel_while_registering_leaves_no_registered_version(user, tiny_model, monkeypatch):
    def register_then_cancelled(ctx):
        registered = register_step(ctx)  # MLflow has the version now...
        assert versions(PipelineRun.objects.get(pk=ctx.run_id)) == [registered.version]
        run_cancel(run_id=ctx.run_id, message="cancelled while registering")  # ...and the run ends before it is recorded
        return registered

    replace_step(monkeypatch, "register", body=register_then_cancelled)
    run = created(user, evaluation={"metrics": ["rouge_score"], "max_samples": 2, "max_new_tokens": 4})
    drive_inline(run.pk)
    run.refresh_from_db()
    assert run.status == "cancelled" and run.registered_model_name == ""
    assert versions(run) == []  # the version the database never recorded is gone
    assert not PromotionDecision.objects.filter(run=run).exists()


@pytest.mark.pipeline
@pytest.mark.django_db(transaction=True)
def test_a_register_job_whose_worker_died_after_registering_is_sent_again_and_reuses_that_version(user, tiny_model, settings):
    # Served mode with a Redis nobody listens on: sending fails quietly, and this test is the workers.
    settings.JOBS_INLINE = False
    settings.RQ_QUEUES = {name: {**conf, "URL": "redis://127.0.0.1:1/0"} for name, conf in settings.RQ_QUEUES.items()}
    run = created(user, evaluation={"metrics": ["rouge_score"], "max_samples": 2, "max_new_tokens": 4})
    run_job(run.jobs.get(step="finetune").pk)
    register = Job.objects.get(run=run, step="register")
    run.refresh_from_db()
    ctx = step_context(run, "register")  # a worker claims the job, registers a version in MLflow...
    first = register_step(ctx)
    assert versions(run) == [first.version]
    # ...and dies before recording it: its heartbeat stops, the reaper applies the register step's policy.
    Job.objects.filter(pk=register.pk).update(heartbeat_at=timezone.now() - timedelta(minutes=10))
    ((_, outcome),) = reap_stale_jobs(stale_seconds=60)
    assert "sending the register job again (attempt 2 of 3)" in outcome
    drive_inline(run.pk)  # the workers take the queued jobs: register (attempt 2), generate, score, compare, promote
    run.refresh_from_db()
    assert run.status == "completed", run.logs
    assert Job.objects.get(pk=register.pk).attempts == 2
    assert run.registered_model_version == first.version and versions(run) == [first.version]  # reused, not registered twice
    assert "was registered from this run already; reusing it" in run.logs
