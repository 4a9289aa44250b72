"""The data check (training/data_check.py): counts on small hand-made datasets, the same report from the
API, the New run form and `run_pipeline --check`, and a fine-tune that it refuses stops before training."""

from __future__ import annotations

import io
import json

import pytest
import yaml
from django.core.management import CommandError, call_command

from datasets_app.models import Dataset
from datasets_app.services import dataset_import
from runs.config import validate_config
from runs.data_check import check_config, summary_lines
from runs.forms import initial_from_config
from runs.models import PipelineRun
from runs.pipeline import drive_inline, inline_foreground
from runs.services import run_create
from training.data import build_example, row_lengths
from training.data_check import check_data, duplicate_report, normalise_question, overlap_report, token_report
from training.finetune import load_tokenizer

from .factories import finetune_config, make_run

pytestmark = pytest.mark.django_db


def row(question: str, answer: str = "An answer.", context: str = "Some context.") -> dict[str, str]:
    return {"question": question, "answer": answer, "context": context}


def test_questions_are_normalised_before_they_are_compared():
    assert normalise_question("  What is the  LIVER?? ") == normalise_question("what is the liver") == "what is the liver"


def test_overlap_counts_exact_and_near_duplicates_and_lists_both_texts():
    train = [
        row("What is the capital of France?"),                  # exact (after normalisation) of eval row 1
        row("What are the main functions of the liver?"),       # contained in eval row 2: near
        row("What are the effects of iodine deficiency?"),      # close in words, a different question: not listed
        row("How do vaccines train the immune system?"),
    ]
    evals = {"eval-a": [row("what is the capital of france"), row("What are the main functions of the human liver?")],
             "eval-b": [row("What are the effects of vitamin A deficiency?")]}
    report = overlap_report(train, evals)
    assert (report["train_rows"], report["exact"], report["near"]) == (2, 1, 1)
    pairs = {(p["train_row"], p["eval_dataset"], p["eval_row"], p["kind"]) for p in report["pairs"]}
    assert pairs == {(1, "eval-a", 1, "exact"), (2, "eval-a", 2, "near")}
    near = next(p for p in report["pairs"] if p["kind"] == "near")
    assert near["train_question"] == train[1]["question"] and near["eval_question"] == evals["eval-a"][1]["question"]


def test_duplicates_and_empty_answers_within_the_train_rows():
    rows = [row("What is DNA?"), row("what is dna"), row("What is RNA?", answer="  "), row("What is DNA ?")]
    report = duplicate_report(rows)
    assert report["duplicate_questions"] == 2
    assert [(d["row"], d["first_row"]) for d in report["duplicates"]] == [(2, 1), (4, 1)]
    assert (report["empty_answers"], report["empty_answer_rows"]) == (1, [3])


def test_truncation_counts_say_which_part_is_cut_as_build_example_cuts_it(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    short = row("Short?", answer="Yes.", context="A short context.")
    long_context = row("Long context?", answer="Yes.", context=" ".join(["word"] * 600))
    long_answer = row("Long answer?", answer=" ".join(["answer"] * 200), context="Brief.")
    rows = [short, long_context, long_answer]
    report = token_report(tokenizer, rows, max_seq_length=128, prompt_format="plain")
    truncated = report["truncated"]
    assert (truncated["rows"], truncated["context_cut"], truncated["answer_cut"]) == (2, 1, 1)
    assert [r["row"] for r in truncated["listed"]] == [2, 3]
    assert report["longest"]["row"] == 2
    # The counts agree with what training does to each row: a cut row comes out shorter than its full length.
    for number, r in enumerate(rows, 1):
        example = build_example(tokenizer, max_seq_length=128, prompt_format="plain", **r)
        full = row_lengths(tokenizer, max_seq_length=128, prompt_format="plain", **r)
        assert example.n_tokens <= 128
        assert (example.n_tokens < full.total) == (number in (2, 3))
    assert report["prompt_tokens"]["max"] > 400 and report["answer_tokens"]["max"] > 200


def test_a_config_above_the_limits_lists_each_problem_with_its_field(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    rows = [row("What is the capital of France?", context=" ".join(["word"] * 300)), row("Short?")]
    report = check_data(
        tokenizer=tokenizer, train_rows=rows, validation_rows=[], eval_sets={"e": [row("What is the capital of France?")]},
        training={"max_seq_length": 128, "max_truncated_fraction": 0.1, "batch_size": 1, "epochs": 2}, prompt_format="plain",
    )
    assert not report["ok"]
    fields = [p["field"] for p in report["problems"]]
    assert fields == ["training.max_truncated_fraction", "evaluation.allow_overlap"]
    assert "cut 1 of 2 train rows" in report["problems"][0]["message"] and "row 1" in report["problems"][0]["message"]
    assert "What is the capital of France?" in report["problems"][1]["message"]
    assert report["estimate"]["steps"] == 4 and report["estimate"]["seconds"] is None
    allowed = check_data(
        tokenizer=tokenizer, train_rows=rows, validation_rows=[], eval_sets={"e": [row("What is the capital of France?")]},
        training={"max_seq_length": 1024, "max_truncated_fraction": 0.1, "batch_size": 1, "epochs": 2}, prompt_format="plain",
        allow_overlap=True, throughput={"tokens_per_second": 100.0, "run_id": 7, "device": "cpu"},
    )
    assert allowed["ok"] and allowed["overlap"]["train_rows"] == 1
    assert allowed["estimate"]["seconds"] == pytest.approx(allowed["estimate"]["tokens"] / 100.0)
    assert "run #7 on cpu" in allowed["estimate"]["basis"]


def test_the_estimate_uses_the_last_run_of_the_same_base_model_on_the_same_device(user, tiny_model):
    measured = {"step": "finetune", "state": "done", "figures": {"tokens_per_second": 100.0, "device": "cpu", "steps": 2}}
    earlier = make_run(user, status="completed", jobs=(measured,))
    report = check_config(finetune_config(), owner=user)
    assert report["estimate"]["seconds"] == pytest.approx(report["estimate"]["tokens"] / 100.0)
    assert f"run #{earlier.pk} on cpu" in report["estimate"]["basis"]


def test_the_check_says_how_long_the_whole_run_takes_here_from_measured_paces(api, client, user, tiny_model, tmp_path):
    from .test_estimates import measured_run

    before = api.post("/api/runs/check/", finetune_config(), format="json").json()["run_estimate"]
    assert before["seconds"] is None and before["basis"].startswith("no estimate yet") and "fine-tuning" in before["missing"]
    earlier = measured_run(user)
    estimate = api.post("/api/runs/check/", finetune_config(), format="json").json()["run_estimate"]
    assert estimate["seconds"] == pytest.approx(16.5 + 3 + 4.5 + 5 + 1 + 1) and estimate["work"]["optimizer_steps"] == 3
    assert f"measured by run #{earlier.pk} on cpu" in estimate["stages"][0]["basis"]

    client.force_login(user)
    post = {k: ("on" if v is True else v) for k, v in initial_from_config(validate_config(finetune_config())).items() if v not in (None, False)}
    html = client.post("/runs/new/", {**post, "action": "check"}, HTTP_HX_REQUEST="true").content.decode()
    assert "How long this run takes here" in html and "About 31 s on this machine" in html and f"measured by run #{earlier.pk}" in html

    config_file = tmp_path / "check.yaml"
    config_file.write_text(yaml.safe_dump(finetune_config()))
    out = io.StringIO()
    call_command("run_pipeline", str(config_file), "--check", "--user", user.username, stdout=out)
    assert "the whole run on this machine: about 0.5 min (each stage at a pace measured here)" in out.getvalue().splitlines()


@pytest.fixture
def overlapping_train_set(user):
    """A train dataset of the user's whose first question is a ragas_eval question."""
    eval_rows = [json.loads(line) for line in Dataset.objects.get(name="ragas_eval").file.open("rb").read().decode().splitlines()[:2]]
    rows = [row(eval_rows[0]["question"]), row(eval_rows[1]["question"].upper()), row("Why is the sky blue?")]
    content = "\n".join(json.dumps(r) for r in rows).encode()
    return dataset_import(name="overlapping-train", kind="train", fileobj=io.BytesIO(content), owner=user)


def test_the_api_the_form_and_the_command_give_the_same_report(api, client, user, overlapping_train_set):
    config = finetune_config(datasets={"train": ["overlapping-train"], "eval": ["ragas_eval"]})
    expected = check_config(config, owner=user)
    assert not expected["ok"] and expected["overlap"]["train_rows"] == 2

    response = api.post("/api/runs/check/", config, format="json")
    assert response.status_code == 200, response.content
    assert response.json() == json.loads(json.dumps(expected))

    client.force_login(user)
    initial = initial_from_config(validate_config(config))
    post = {k: ("on" if v is True else v) for k, v in initial.items() if v not in (None, False)}
    post["action"] = "check"
    page = client.post("/runs/new/", post, HTTP_HX_REQUEST="true")
    assert page.status_code == 200
    html = page.content.decode()
    assert "The data check refuses this config" in html and "evaluation.allow_overlap" in html
    assert f"{expected['overlap']['train_rows']} train rows ({expected['overlap']['exact']} exact, {expected['overlap']['near']} near" in html
    assert not PipelineRun.objects.exists(), "checking creates nothing"

    config_file = overlapping_train_set.file.path + ".yaml"
    with open(config_file, "w") as handle:
        yaml.safe_dump(config, handle)
    out = io.StringIO()
    with pytest.raises(CommandError, match="evaluation.allow_overlap"):
        call_command("run_pipeline", config_file, "--check", "--user", user.username, stdout=out)
    assert out.getvalue().splitlines() == summary_lines(expected)


def test_a_refused_fine_tune_stops_before_training_with_the_report_stored(user, overlapping_train_set, settings, tmp_path):
    settings.MLFLOW_TRACKING_URI = f"sqlite:///{tmp_path}/mlflow.db"
    config = finetune_config(datasets={"train": ["overlapping-train"], "eval": ["ragas_eval"]})
    with inline_foreground():
        run = run_create(config=config, owner=user)
    with pytest.raises(Exception, match="data check refuses"):
        drive_inline(run.pk)
    run.refresh_from_db()
    assert run.status == "failed" and "evaluation.allow_overlap" in run.error
    assert run.data_check["overlap"]["train_rows"] == 2 and not run.data_check["ok"]
    assert run.train_history == [] and "data check:" in run.logs


@pytest.fixture
def cpu_worker(rq_settings, redis_url):
    import signal
    import subprocess
    import sys

    import psutil

    from tests.conftest import ROOT, worker_env

    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "rqworker", "cpu"], env=worker_env(redis_url), cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    yield proc
    for child in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
        child.kill()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.mark.django_db(transaction=True)
def test_in_served_mode_a_cpu_worker_checks_the_data_and_the_api_waits_for_it(api, user, cpu_worker, tiny_model):
    config = finetune_config()
    response = api.post("/api/runs/check/", config, format="json")
    assert response.status_code == 200, response.content
    report = response.json()
    assert report["ok"] and report["tokens"]["rows"] == 149 and report["validation"]["rows"] == 17
    assert report["estimate"]["steps"] == 3  # max_steps


@pytest.mark.django_db(transaction=True)
def test_in_served_mode_without_a_cpu_worker_the_check_answers_503_naming_what_to_start(api, rq_settings, monkeypatch):
    monkeypatch.setattr("runs.data_check.CHECK_TIMEOUT_SECONDS", 1)
    response = api.post("/api/runs/check/", finetune_config(), format="json")
    assert response.status_code == 503
    assert "no cpu worker answered the data check within 1s" in response.json()["detail"]
    assert "rqworker cpu" in response.json()["detail"]


def test_a_base_model_that_validates_but_will_not_load_is_a_400_naming_model_base(api, client, user, hf_cache):
    """Config and weights in the cache, no tokenizer: valid, yet the check cannot read it. Never a 500."""
    hf_cache("org/weights-without-tokenizer")
    config = finetune_config(model={"base": "org/weights-without-tokenizer"})
    response = api.post("/api/runs/check/", config, format="json")
    assert response.status_code == 400, response.content
    error = response.json()["errors"][0]
    assert error["field"] == "model.base"
    assert error["message"].startswith("the base model 'org/weights-without-tokenizer' could not be read to check the data: ")

    client.force_login(user)
    initial = initial_from_config(validate_config(config))
    post = {k: ("on" if v is True else v) for k, v in initial.items() if v not in (None, False)}
    page = client.post("/runs/new/", {**post, "action": "check"}, HTTP_HX_REQUEST="true")
    assert page.status_code == 200
    assert page.context["form"].errors["base_model"][0].startswith("the base model 'org/weights-without-tokenizer' could not be read")
    assert "The data could not be checked" in page.content.decode()
    assert not PipelineRun.objects.exists()


def test_a_dataset_whose_file_is_gone_is_a_400_naming_it(api, overlapping_train_set):
    import os

    os.remove(overlapping_train_set.file.path)
    response = api.post("/api/runs/check/", finetune_config(datasets={"train": ["overlapping-train"], "eval": ["ragas_eval"]}), format="json")
    assert response.status_code == 400, response.content
    assert response.json()["errors"][0]["field"] == "datasets.train"
    assert "the rows of this dataset could not be read to check the data: FileNotFoundError" in response.json()["detail"]


def test_on_a_cpu_worker_the_same_failure_comes_back_as_the_jobs_answer(hf_cache):
    """The job returns it (a failed job would read as 'no worker' to the web); check_config raises it again there."""
    from runs.data_check import data_check_job

    hf_cache("org/weights-without-tokenizer")
    answer = data_check_job(validate_config(finetune_config(model={"base": "org/weights-without-tokenizer"})))
    assert answer["check_failed"]["field"] == "model.base" and "could not be read" in answer["check_failed"]["message"]
