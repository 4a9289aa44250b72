"""The LLM judge misbehaves during a whole eval-only run: too slow (past its
timeout), down (nothing listens), or answering with malformed JSON. The judged
metric is stored as not measured with the reason, the other metric is scored as
usual, and the run completes."""

from __future__ import annotations

import contextlib

import pytest
import yaml
from django.core.management import call_command

from runs.models import PipelineRun, RunResult, SampleResult
from tests.conftest import free_port, status_changes
from tests.judge_server import JudgeServer
from tests.runs.factories import eval_only_config

pytestmark = [pytest.mark.reliability, pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]

SAMPLES = 2
CASES = {
    # mode: (what the judge does, the reason each sample gets)
    "slow": ("answers after 3s; the run's judge timeout is 1s", "timeout"),
    "down": ("nothing listens on its port", "judge unreachable"),
    "malformed": ("answers 200 with content that is not JSON", "parse error"),
}


@contextlib.contextmanager
def judge_endpoint(mode: str):
    if mode == "down":
        yield f"http://127.0.0.1:{free_port()}/v1"
        return
    with JudgeServer(mode=mode, delay=3) as server:
        yield server.base_url


@pytest.mark.parametrize("mode", list(CASES))
def test_a_misbehaving_judge_leaves_its_metric_not_measured_and_the_run_completes(mode, tmp_path, monkeypatch, ledger):
    behaviour, reason = CASES[mode]
    ledger.record(
        "fault", f"judge {mode}: {behaviour}",
        f"faithfulness not measured ('{reason}') on every sample and in the aggregate; rouge_score measured; run completed",
    )
    monkeypatch.setenv("TEST_JUDGE_KEY", "test-key")
    with judge_endpoint(mode) as base_url:
        config = eval_only_config(evaluation={
            "answers": "dataset", "metrics": ["faithfulness", "rouge_score"], "max_samples": SAMPLES,
            "judge": {"base_url": base_url, "model": "test-judge", "api_key_env": "TEST_JUDGE_KEY", "timeout": 1, "max_retries": 0},
        })
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        call_command("run_pipeline", str(path))  # raises CommandError unless the run completes

    run = PipelineRun.objects.get()
    assert run.status == "completed", run.logs
    assert status_changes(run) == ["pending", "evaluating", "completed"]
    judged = RunResult.objects.get(run=run, metric="faithfulness")
    assert judged.value is None and judged.n_scored == 0 and judged.n_failed == SAMPLES
    assert len(judged.failure_reasons) == 1
    ((why, count),) = judged.failure_reasons.items()
    assert why.startswith(reason) and count == SAMPLES, judged.failure_reasons
    rouge = RunResult.objects.get(run=run, metric="rouge_score")
    assert rouge.value is not None and rouge.n_scored == SAMPLES and rouge.n_failed == 0 and rouge.failure_reasons == {}

    samples = list(SampleResult.objects.filter(run=run).order_by("index"))
    assert len(samples) == SAMPLES
    for sample in samples:
        assert sample.scores["faithfulness"] is None and sample.reasons["faithfulness"].startswith(reason)
        assert sample.scores["rouge_score"] is not None and "rouge_score" not in sample.reasons
    assert "faithfulness=not measured" in run.logs
