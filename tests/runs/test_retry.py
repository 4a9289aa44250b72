"""POST /api/runs/{id}/retry/ (runs.services.run_retry): a failed or cancelled
run starts again as a new run from the same config."""

import pytest

from runs.models import PipelineRun, RunEvent
from runs.services import RunNotRetryable, run_retry

from .factories import make_run

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_it_retries_a_failed_or_cancelled_run_as_a_new_pending_run(api, user, status):
    run = make_run(user, status=status)
    response = api.post(f"/api/runs/{run.pk}/retry/")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["id"] != run.pk and body["status"] == "pending"
    assert body["name"] == f"test-finetune (retry of #{run.pk})"
    assert body["config"] == {**run.config, "name": body["name"]}
    retry = PipelineRun.objects.get(pk=body["id"])
    assert retry.owner == user and list(retry.jobs.values_list("step", "state")) == [("finetune", "queued")]
    assert [d.name for d in retry.train_datasets.all()] == ["rag_qa_train"]
    assert list(RunEvent.objects.filter(run=retry).values_list("message", flat=True)) == ["created"]
    assert f"retry of run #{run.pk}" in retry.logs
    run.refresh_from_db()
    assert run.status == status and f"retried as run #{retry.pk}" in run.logs


def test_a_retry_of_a_retry_names_the_run_it_retries_once(user):
    first = run_retry(run_id=make_run(user, status="failed").pk, owner=user)
    PipelineRun.objects.filter(pk=first.pk).update(status="failed")
    second = run_retry(run_id=first.pk, owner=user)
    assert second.name == f"test-finetune (retry of #{first.pk})"


@pytest.mark.parametrize("status", ["pending", "training", "evaluating", "completed"])
def test_it_refuses_to_retry_a_run_that_is_not_failed_or_cancelled(api, user, status):
    run = make_run(user, status=status)
    response = api.post(f"/api/runs/{run.pk}/retry/")
    assert response.status_code == 409
    assert response.json()["detail"] == f"run {run.pk} is '{status}': only a failed or cancelled run can be retried"
    assert PipelineRun.objects.count() == 1
    with pytest.raises(RunNotRetryable):
        run_retry(run_id=run.pk, owner=user)


def test_other_users_cannot_retry_a_run(other_api, user):
    run = make_run(user, status="failed")
    assert other_api.post(f"/api/runs/{run.pk}/retry/").status_code == 404
    assert PipelineRun.objects.count() == 1


def test_a_retry_validates_the_config_again(api, user):
    run = make_run(user, status="failed")
    PipelineRun.objects.filter(pk=run.pk).update(config={**run.config, "datasets": {"train": ["gone"], "eval": ["ragas_eval"]}})
    response = api.post(f"/api/runs/{run.pk}/retry/")
    assert response.status_code == 400
    assert "unknown dataset 'gone'" in response.json()["detail"]
    assert PipelineRun.objects.count() == 1
