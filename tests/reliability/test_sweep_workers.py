"""A sweep on real workers: two gpu workers train two trials at the same time (the trials' fine-tune jobs overlap in
time, as their rows record), Optuna's study lives in the project's PostgreSQL or SQLite, and the sweep completes
with its winner registered."""

from __future__ import annotations

import pytest

from runs.models import Job, PipelineRun
from tests.conftest import token_client
from tests.runs.kinds.test_sweep import sweep_config

from . import fault_tools
from .fault_tools import wait_until

owned_redis, owned_rq_settings, processes = fault_tools.owned_redis_fixture, fault_tools.owned_rq_settings_fixture, fault_tools.processes_fixture

pytestmark = [pytest.mark.reliability, pytest.mark.pipeline, pytest.mark.served, pytest.mark.django_db(transaction=True)]


def test_two_gpu_workers_train_two_trials_at_once_and_the_sweep_completes(owned_rq_settings, processes, user, ledger):
    ledger.record("fault", "a sweep of 4 trials, parallel 2, on two gpu workers and one cpu worker",
                  "two trials' fine-tune jobs overlap in time; every trial completes; the winner is registered")
    for number in (1, 2):
        processes.start(f"worker-gpu-{number}", "rqworker", "gpu")
    processes.worker("cpu")
    config = sweep_config(training={**sweep_config()["training"], "max_steps": 4})
    response = token_client(user).post("/api/runs/", config, format="json")
    assert response.status_code == 201, response.content
    sweep_id = response.json()["id"]
    try:
        wait_until(lambda: PipelineRun.objects.get(pk=sweep_id).is_terminal, 900, "the sweep to end", every=1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{processes.logs()}") from exc
    sweep = PipelineRun.objects.get(pk=sweep_id)
    assert sweep.status == "completed", sweep.logs
    trainings = list(Job.objects.filter(run__parent=sweep, step="finetune").order_by("started_at"))
    assert len(trainings) == 4 and all(j.state == "done" for j in trainings)
    overlapping = [(a, b) for a in trainings for b in trainings if a.pk < b.pk and a.started_at < b.finished_at and b.started_at < a.finished_at]
    assert overlapping, [(j.run_id, j.started_at, j.finished_at, j.worker) for j in trainings]
    a, b = overlapping[0]
    assert a.worker != b.worker  # two workers, at the same time
    assert sweep.registered_model_name and Job.objects.get(run=sweep, step="pick").output["winner"]
