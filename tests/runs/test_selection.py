"""Choosing the checkpoint by scored quality (config `selection`): the rule, the config, the data check that keeps
selection rows apart from train, validation and eval rows, and a run that scores its checkpoints in-process
(the embedded default) and generates, scores and registers with the chosen one."""

from __future__ import annotations

from pathlib import Path

import pytest

from evaluation.selection import choose, early_stop, mean_interval
from runs.config import ConfigError, validate_config
from runs.models import PipelineRun
from runs.pipeline import drive_inline, inline_foreground
from runs.services import run_create
from tests.conftest import token_client
from tests.runs.factories import finetune_config

SELECTION = {"metric": "rouge_score", "every": 2, "patience": 5, "rows": 0.1, "max_rows": 6}


def point(step, mean, low=None, high=None, n=6):
    return {"step": step, "mean": mean, "ci_low": low if low is not None else mean, "ci_high": high if high is not None else mean, "n": n}


def test_the_highest_mean_is_chosen_and_a_tie_keeps_the_earlier_checkpoint():
    assert choose([point(2, 0.3), point(4, 0.5), point(6, 0.4)], metric="rouge_score")[0] == 4
    step, reason = choose([point(2, 0.5), point(4, 0.5), {"step": 6, "mean": None}], metric="rouge_score")
    assert step == 2 and "a tie: the earlier checkpoint is kept" in reason and "not scored: step(s) 6" in reason
    with pytest.raises(ValueError, match="no checkpoint could be scored"):
        choose([{"step": 2, "mean": None}], metric="rouge_score")


def test_early_stopping_counts_scored_checkpoints_that_fail_to_beat_the_best_by_min_delta():
    scores = [point(1, 0.30), point(2, 0.32), point(3, 0.325), point(4, 0.31)]
    assert early_stop(scores, patience=2, min_delta=0.01) is not None  # 0.325 and 0.31 do not beat 0.32 by more than 0.01
    assert early_stop(scores, patience=2, min_delta=0.0) is None  # 0.325 was better: one bad checkpoint since
    assert early_stop(scores, patience=None, min_delta=0.0) is None
    assert early_stop([point(3, 0.2), point(1, 0.5)], patience=1, min_delta=0.0) is not None  # in step order, whatever arrived first


def test_a_mean_interval_never_averages_unmeasured_values():
    out = mean_interval([0.2, None, 0.4, float("nan"), 0.6], seed=1)
    assert out["n"] == 3 and out["n_failed"] == 2 and out["mean"] == pytest.approx(0.4)
    assert out["ci_low"] < 0.4 < out["ci_high"]
    assert mean_interval([None]) == {"mean": None, "ci_low": None, "ci_high": None, "n": 0, "n_failed": 1}


def test_the_config_validates_selection_naming_the_field():
    config = validate_config(finetune_config(selection={}))
    assert config["selection"] == {"metric": "rouge_score", "every": "epoch", "patience": 3, "min_delta": 0.0, "rows": 0.1, "max_rows": 64}
    cases = [
        ({"metric": "faithfulness"}, "selection.metric"),  # not one of evaluation.metrics
        ({"metric": "non_llm_context_precision"}, "selection.metric"),
        ({"every": 0}, "selection.every"),
        ({"every": "weekly"}, "selection.every"),
        ({"rows": 0.9}, "selection.rows"),
        ({"rows": "rag_qa_train"}, "selection.rows"),  # also a train dataset
        ({"surprise": 1}, "selection.surprise"),
    ]
    for selection, field in cases:
        with pytest.raises(ConfigError) as refused:
            validate_config(finetune_config(evaluation={"metrics": ["rouge_score", "non_llm_context_precision"]}, selection=selection),
                            known_datasets={"rag_qa_train": "train", "ragas_eval": "eval"})
        assert any(e["field"].startswith(field) for e in refused.value.errors), (selection, refused.value.errors)
    with pytest.raises(ConfigError) as refused:
        validate_config({"name": "e", "kind": "eval_only", "datasets": {"eval": ["ragas_eval"]}, "selection": {}})
    assert refused.value.errors[0]["field"] == "selection"


@pytest.mark.django_db
def test_an_eval_dataset_as_selection_rows_is_refused_before_launch(api):
    response = api.post("/api/runs/", finetune_config(selection={"rows": "ragas_eval"}), format="json")
    assert response.status_code == 400
    assert response.json()["errors"] == [{"field": "selection.rows", "message": "dataset 'ragas_eval' is a eval dataset, not train: "
                                                                               "selection rows are never eval rows"}]
    assert not PipelineRun.objects.exists()


@pytest.fixture
def leaky_dataset(user):
    """A train dataset whose rows ask ragas_eval's questions."""
    import json

    from datasets_app.services import dataset_import_path

    eval_rows = [json.loads(line) for line in Path("data/eval/ragas_eval.jsonl").read_text().splitlines()[:5]]
    path = Path(__import__("tempfile").mkdtemp()) / "leaky.jsonl"
    path.write_text("".join(json.dumps({"question": r["question"], "answer": r["ground_truth"], "context": r["contexts"][0]}) + "\n"
                            for r in eval_rows))
    return dataset_import_path(path=path, name="leaky-selection", kind="train", owner=user)


@pytest.mark.django_db(transaction=True)
def test_selection_rows_that_ask_eval_questions_are_refused_by_the_data_check_and_the_run(user, tiny_model, leaky_dataset):
    config = finetune_config(selection={**SELECTION, "rows": "leaky-selection"})
    report = token_client(user).post("/api/runs/check/", config, format="json").json()
    assert not report["ok"] and report["selection"]["overlap"]["eval"]["rows"] == 3  # the eval rows scored: max_samples 3
    (problem,) = [p for p in report["problems"] if p["field"] == "selection.rows"]
    assert "3 selection row(s) ask a question of other rows (3 with the eval rows" in problem["message"]
    with inline_foreground():
        run = run_create(config=config, owner=user)
    with pytest.raises(Exception, match="selection.rows"):
        drive_inline(run.pk)
    run.refresh_from_db()
    assert run.status == "failed" and "selection.rows" in run.error and run.train_history == []  # refused before training


@pytest.mark.django_db(transaction=True)
def test_the_default_split_leaves_selection_rows_apart_and_the_check_says_zero_overlaps(user, tiny_model):
    report = token_client(user).post("/api/runs/check/", finetune_config(selection=SELECTION), format="json").json()
    assert report["ok"], report["problems"]
    selection = report["selection"]
    assert selection["rows"] == 6 and selection["source"].startswith("0.1 of the train rows (seed 42)")
    assert {name: o["rows"] for name, o in selection["overlap"].items()} == {"train": 0, "validation": 0, "eval": 0}


@pytest.mark.pipeline
@pytest.mark.django_db(transaction=True)
def test_inline_each_point_is_scored_in_process_and_the_chosen_adapter_is_evaluated_and_registered(user, tiny_model, client):
    config = finetune_config(training={"epochs": 1, "batch_size": 8, "max_seq_length": 512, "learning_rate": 5e-3, "max_steps": 6, "seed": 7},
                             evaluation={"metrics": ["rouge_score", "bleu_score"], "max_samples": 3, "max_new_tokens": 8},
                             selection=SELECTION)
    with inline_foreground():
        run = run_create(config=config, owner=user)
    drive_inline(run.pk)
    run.refresh_from_db()
    assert run.status == "completed", run.logs
    jobs = {j.label: j for j in run.jobs.all()}
    assert [label for label in jobs if label.startswith("score_checkpoint")] == ["score_checkpoint:ckpt-2", "score_checkpoint:ckpt-4",
                                                                              "score_checkpoint:ckpt-6"]
    for key in ("ckpt-2", "ckpt-4", "ckpt-6"):
        output = jobs[f"score_checkpoint:{key}"].output
        assert set(output["metrics"]) == {"rouge_score", "bleu_score"} and output["metrics"]["rouge_score"]["n"] == 6
        # scored while training went on: in-process, before the fine-tune finished
        assert jobs[f"score_checkpoint:{key}"].finished_at < jobs["finetune"].finished_at
    chosen = jobs["select"].output
    means = {p["step"]: p["mean"] for p in chosen["points"]}
    assert chosen["chosen_step"] == max(means, key=lambda s: (means[s], -s)) and chosen["adapter"] == f"selection/step-{chosen['chosen_step']}"
    assert f"step {chosen['chosen_step']}: the highest mean rouge_score" in chosen["reason"]

    # the API, the run page and MLflow carry the same numbers
    body = token_client(user).get(f"/api/runs/{run.pk}/").json()
    assert body["selection"]["chosen_step"] == chosen["chosen_step"]
    assert [p["mean"] for p in body["selection"]["points"]] == [means[s] for s in (2, 4, 6)]
    client.force_login(user)
    page = client.get(f"/runs/{run.pk}/status/").content.decode()
    assert 'id="selection-table"' in page and "chosen" in page and 'id="selection-data"' in page
    assert 'id="selection-chart"' in client.get(f"/runs/{run.pk}/").content.decode()
    from runs import tracking

    history = tracking.client().get_metric_history(run.mlflow_run_id, "sel/rouge_score")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [(s, round(means[s], 6)) for s in (2, 4, 6)]
    assert tracking.client().get_run(run.mlflow_run_id).data.tags["selection.chosen_step"] == str(chosen["chosen_step"])

    # generation and the registered model used the chosen checkpoint's adapter
    from runs.step_io import run_adapter_dir

    assert run_adapter_dir(run).name == f"step-{chosen['chosen_step']}"
    assert any(m.startswith(f"selection chose the checkpoint of step {chosen['chosen_step']}") for m in run.events.values_list("message", flat=True))
