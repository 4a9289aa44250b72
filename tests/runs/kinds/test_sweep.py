"""The sweep kind (runs/kinds/sweep.py, runs/sweeps.py): its config rules, its graph, and sweeps run in the embedded
default: trials as child fine-tunes chosen by Optuna, a winner picked on selection scores, the claim made on the
eval sets with the winner alone offered to the gate, a failing trial tolerated, a cancel that stops every trial."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection

from runs import tracking
from runs.config import ConfigError, validate_config
from runs.kinds import kind_named
from runs.models import Job, PipelineRun, PromotionDecision, ScoreComparison
from runs.pipeline import drive_inline, inline_foreground
from runs.services import run_cancel, run_create
from tests.conftest import token_client
from tests.runs.factories import replace_step

KIND = kind_named("sweep")


def sweep_config(**overrides) -> dict:
    config = {
        "name": "test-sweep", "kind": "sweep", "model": {"base": "local:tiny-llama"},
        "datasets": {"train": ["rag_qa_train"], "eval": ["ragas_eval"]},
        "training": {"epochs": 1, "max_steps": 2, "learning_rate": 5e-3, "batch_size": 8, "max_seq_length": 512, "seed": 42,
                     "lora": {"dropout": 0.0}},
        "evaluation": {"metrics": ["rouge_score"], "max_samples": 3, "max_new_tokens": 6},
        "selection": {"metric": "rouge_score", "every": 1, "rows": 0.05, "max_rows": 3},
        "sweep": {"method": "grid", "space": {"training.learning_rate": [1e-3, 1e-2], "training.lora.r": [4, 8]}, "trials": 4, "parallel": 2},
    }
    config.update(overrides)
    return config


def refused(config: dict) -> list[dict]:
    with pytest.raises(ConfigError) as error:
        validate_config(config, known_datasets={"rag_qa_train": "train", "ragas_eval": "eval"})
    return error.value.errors


def test_the_space_is_validated_naming_the_field():
    space = sweep_config()["sweep"]
    cases = [
        ({**space, "space": {}}, "sweep.space"),
        ({**space, "space": {"training.nope": [1, 2]}}, "sweep.space.training.nope"),
        ({**space, "space": {"evaluation.max_new_tokens": [8, 16]}}, "sweep.space.evaluation.max_new_tokens"),
        ({**space, "space": {"training.lora.r": [0, 8]}}, "sweep.space.training.lora.r"),
        ({**space, "space": {"training.learning_rate": {"low": 1e-3, "high": 1e-2}}}, "sweep.space.training.learning_rate"),  # grid + range
        ({**space, "method": "random", "space": {"training.precision": {"low": 1, "high": 2}}}, "sweep.space.training.precision"),
        ({**space, "trials": 3}, "sweep.trials"),  # the grid has 4 points
    ]
    for sweep, field in cases:
        errors = refused(sweep_config(sweep=sweep))
        assert any(e["field"] == field for e in errors), (sweep, errors)
    assert "raise sweep.trials to 4" in refused(sweep_config(sweep={**space, "trials": 3}))[0]["message"]
    assert refused(sweep_config(selection=None))[0]["field"] == "selection"
    assert refused({**sweep_config(), "kind": "finetune"})[0]["field"] == "sweep"  # a sweep section on a fine-tune
    config = validate_config(sweep_config(sweep={"method": "tpe", "space": {"training.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}}))
    assert config["sweep"]["trials"] == 8 and config["promotion"]["metric"] == "rouge_score"


def test_its_graph_plans_trials_tells_optuna_after_each_and_picks_the_winner():
    graph = KIND.graph(validate_config(sweep_config()))
    assert [(s.name, s.queue, s.spawned_by, s.follows, s.after) for s in graph.steps] == [
        ("plan", "cpu", "", "", ()), ("trial", "", "plan", "", ()), ("tell", "cpu", "", "trial", ()),
        ("pick", "cpu", "", "", ("plan", "trial", "tell")), ("register", "cpu", "", "", ("pick",)),
        ("compare", "cpu", "", "", ("register",)), ("promote", "cpu", "", "", ("compare",)),
    ]
    assert graph.step("trial").tolerate_failure


def created(user, config) -> PipelineRun:
    with inline_foreground():
        return run_create(config=config, owner=user)


def wait_for(condition, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not condition():
        time.sleep(0.2)
    assert condition()


@pytest.mark.pipeline
@pytest.mark.django_db(transaction=True)
def test_a_grid_sweep_from_yaml_runs_its_trials_and_makes_the_claim_with_the_winner_alone(user, tiny_model, client, tmp_path, capsys):
    import yaml
    from django.core.management import call_command

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_config()))
    call_command("run_pipeline", str(path), "--user", user.username)
    printed = capsys.readouterr().out
    assert "sweep (grid, 4 of 4 trials; objective: selection rouge_score)" in printed and "<- winner" in printed
    sweep = PipelineRun.objects.get(kind="sweep")
    assert sweep.status == "completed", sweep.logs
    children = list(PipelineRun.objects.filter(parent=sweep).order_by("pk"))
    assert len(children) == 4 and {c.status for c in children} == {"completed"}
    points = {(j.payload["params"]["training.learning_rate"], j.payload["params"]["training.lora.r"]) for j in sweep.jobs.filter(step="trial")}
    assert points == {(1e-3, 4), (1e-3, 8), (1e-2, 4), (1e-2, 8)}  # the whole grid, once each
    assert sweep.jobs.filter(step="tell", state="done").count() == 4

    pick = sweep.jobs.get(step="pick").output
    scores = {t["child"]: t["score"]["mean"] for t in pick["trials"]}
    assert scores[pick["winner"]] == max(scores.values())  # chosen on selection scores
    winner = PipelineRun.objects.get(pk=pick["winner"])
    # the claim: the winner's paired comparison on the eval sets, carried by the sweep
    mine = {(c.metric, c.delta, c.verdict) for c in ScoreComparison.objects.filter(run=sweep)}
    assert mine == {(c.metric, c.delta, c.verdict) for c in ScoreComparison.objects.filter(run=winner)} and mine
    # only the winner is offered to the gate: the sweep has the one decision, the trials none, and never register
    assert PromotionDecision.objects.filter(run=sweep).count() == 1 and not PromotionDecision.objects.filter(run__in=children).exists()
    assert all(not c.registered_model_name for c in children) and sweep.registered_model_name
    assert not Job.objects.filter(run__in=children, step__in=["register", "promote"]).exists()
    # trials nest under the sweep's MLflow run
    for child in children:
        assert tracking.client().get_run(child.mlflow_run_id).data.tags["mlflow.parentRunId"] == sweep.mlflow_run_id

    api = token_client(user)
    body = api.get(f"/api/runs/{sweep.pk}/").json()
    assert body["kind"] == "sweep" and sorted(body["children"]) == [c.pk for c in children]
    assert body["sweep"]["winner"]["winner"] == winner.pk and len(body["sweep"]["trials"]) == 4
    assert body["comparisons"][0]["min_detectable_difference"] is not None  # the power of the eval set, with the verdict
    verdicts = api.get(f"/api/runs/{sweep.pk}/?verdicts=1").json()["sweep"]["trial_verdicts"]
    assert "Holm-adjusted across the 4 trials" in verdicts["note"] and len(verdicts["datasets"]["ragas_eval"]) == 4
    client.force_login(user)
    page = client.get(f"/runs/{sweep.pk}/status/").content.decode()
    assert 'id="sweep-trials"' in page and "winner" in page and 'id="sweep-data"' in page
    assert 'id="sweep-history"' in client.get(f"/runs/{sweep.pk}/").content.decode()


@pytest.mark.pipeline
@pytest.mark.django_db(transaction=True)
def test_a_failing_trial_does_not_fail_the_sweep(user, tiny_model, monkeypatch):
    from training.steps import finetune_step

    def finetune(ctx):
        if ctx.run.name.endswith("trial 1"):
            raise RuntimeError("this trial broke")
        return finetune_step(ctx)

    replace_step(monkeypatch, "finetune", body=finetune)
    space = {"training.learning_rate": [1e-3, 1e-2, 5e-3]}
    sweep = created(user, sweep_config(sweep={"method": "grid", "space": space, "trials": 3, "parallel": 1}))
    drive_inline(sweep.pk)
    sweep.refresh_from_db()
    assert sweep.status == "completed", sweep.logs
    statuses = sorted(PipelineRun.objects.filter(parent=sweep).values_list("status", flat=True))
    assert statuses == ["completed", "completed", "failed"]
    failed = sweep.jobs.get(step="trial", state="failed")
    assert "this trial broke" in failed.error and sweep.jobs.get(step="tell", key=failed.key).output["value"] is None


@pytest.mark.pipeline
@pytest.mark.django_db(transaction=True)
def test_cancelling_a_sweep_midway_leaves_no_trial_running_or_queued(user, tiny_model, monkeypatch):
    started = threading.Event()
    from training.steps import finetune_step

    def slow(ctx):
        started.set()
        for _ in range(600):
            ctx.check_cancelled(now=True)
            time.sleep(0.05)
        return finetune_step(ctx)

    replace_step(monkeypatch, "finetune", body=slow)
    sweep = created(user, sweep_config())
    driver = threading.Thread(target=lambda: (drive_inline(sweep.pk), connection.close()))
    driver.start()
    assert started.wait(120)
    run_cancel(run_id=sweep.pk, message="cancelled by the test")
    wait_for(lambda: not PipelineRun.objects.filter(parent=sweep).exclude(status__in=["completed", "failed", "cancelled"]).exists(), 120)
    driver.join(timeout=60)
    sweep.refresh_from_db()
    assert sweep.status == "cancelled"
    assert not Job.objects.filter(run__parent=sweep, state__in=["queued", "running", "waiting"]).exists()
    assert not Job.objects.filter(run=sweep, state__in=["queued", "running", "waiting"]).exists()
    assert PipelineRun.objects.filter(parent=sweep).count() <= 2  # parallel 2: no new trial once cancelled
