"""Runs started together on one eval dataset: every one completes, in the embedded default (jobs in threads of
the server process) and on real workers with a real MLflow server. MLflow logs a run's datasets check-then-insert,
so two runs logging the same dataset at the same moment collide on its unique key; the loser must try again
(runs/tracking.py), not fail its run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from rest_framework.authtoken.models import Token

from runs.models import PipelineRun
from tests.conftest import free_port, wait_for_port
from tests.runs.factories import eval_only_config

from . import fault_tools
from .fault_tools import wait_until
from .test_faults_concurrency import all_at_once, http_server  # noqa: F401 - the fixture

owned_redis, owned_rq_settings, processes = fault_tools.owned_redis_fixture, fault_tools.owned_rq_settings_fixture, fault_tools.processes_fixture

pytestmark = [pytest.mark.reliability, pytest.mark.django_db(transaction=True)]

TEN = 10
CONFIG = eval_only_config(evaluation={"answers": "dataset", "metrics": ["rouge_score"], "max_samples": 3})


def launch_ten(server: str, user) -> list[int]:
    headers = {"Authorization": f"Token {Token.objects.get_or_create(user=user)[0].key}"}
    responses = all_at_once(TEN, lambda i: requests.post(f"{server}/api/runs/", json={**CONFIG, "name": f"together-{i}"}, headers=headers, timeout=120))
    assert [r.status_code for r in responses] == [201] * TEN, [r.text[:300] for r in responses]
    return [r.json()["id"] for r in responses]


def assert_all_completed(ids: list[int], mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    runs = list(PipelineRun.objects.filter(pk__in=ids))
    failed = {run.pk: run.error for run in runs if run.status != "completed"}
    assert not failed, failed
    client = MlflowClient(tracking_uri=mlflow_uri)
    for run in runs:
        inputs = client.get_run(run.mlflow_run_id).inputs.dataset_inputs
        assert [i.dataset.name for i in inputs] == ["ragas_eval"]  # each run has its dataset input, logged once
        assert run.results.get(metric="rouge_score").value is not None


def test_ten_runs_on_one_dataset_launched_at_once_all_complete_in_the_embedded_default(http_server, user, settings, ledger):  # noqa: F811
    ledger.record("fault", f"{TEN} eval-only runs on one eval dataset, POSTed at once (embedded default: jobs in server threads)",
                  f"{TEN} x 201 and {TEN} completed runs, each with its MLflow dataset input")
    assert settings.JOBS_INLINE
    ids = launch_ten(http_server, user)
    wait_until(lambda: PipelineRun.objects.filter(pk__in=ids, status__in=["completed", "failed", "cancelled"]).count() == TEN, 240,
               "the ten runs to end")
    assert_all_completed(ids, settings.MLFLOW_TRACKING_URI)


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
    )
    try:
        wait_for_port(port, timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        fault_tools.kill_tree(server)


@pytest.mark.served
def test_ten_runs_on_one_dataset_launched_at_once_all_complete_on_real_workers(http_server, owned_rq_settings, processes, mlflow_server, user, ledger):  # noqa: F811
    ledger.record("fault", f"{TEN} eval-only runs on one eval dataset, POSTed at once (two cpu workers, a real mlflow server)",
                  f"{TEN} completed runs, each with its MLflow dataset input")
    owned_rq_settings.MLFLOW_TRACKING_URI = mlflow_server
    for number in (1, 2):
        processes.start(f"worker-cpu-{number}", "rqworker", "cpu", MLFLOW_TRACKING_URI=mlflow_server)
    ids = launch_ten(http_server, user)
    started = time.monotonic()
    try:
        wait_until(lambda: PipelineRun.objects.filter(pk__in=ids, status__in=["completed", "failed", "cancelled"]).count() == TEN, 300,
                   "the ten runs to end")
        assert_all_completed(ids, mlflow_server)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{processes.logs()}") from exc
    assert time.monotonic() - started < 300
