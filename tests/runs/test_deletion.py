"""Deleting a run (runs/deletion.py): the API, the run page and the admin use one service; an active run and a
champion's run are refused with the reason; otherwise the rows, the files and the MLflow run go."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from runs import tracking
from runs.models import Job, PipelineRun, RunEvent, SampleResult
from runs.pipeline import drive_inline, inline_foreground
from runs.services import run_create, run_set_mlflow_ids, run_set_registered_model
from runs.step_io import run_dir
from tests.conftest import token_client
from tests.runs.factories import eval_only_config, make_run

pytestmark = pytest.mark.django_db(transaction=True)


def completed_eval_run(user) -> PipelineRun:
    with inline_foreground():
        run = run_create(config=eval_only_config(), owner=user)
    drive_inline(run.pk)
    run.refresh_from_db()
    assert run.status == "completed"
    return run


def artifact_files(mlflow_run_id: str) -> list[str]:
    uri = tracking.client().get_run(mlflow_run_id).info.artifact_uri
    return [f.path for f in get_artifact_repository(uri).list_artifacts()]


def test_deleting_a_completed_run_removes_its_rows_files_and_mlflow_run(user):
    run = completed_eval_run(user)
    mlflow_run_id = run.mlflow_run_id
    run_dir(run.pk).mkdir(parents=True, exist_ok=True)
    (run_dir(run.pk) / "checkpoints").mkdir(exist_ok=True)
    assert artifact_files(mlflow_run_id)  # the sample CSVs
    response = token_client(user).delete(f"/api/runs/{run.pk}/")
    assert response.status_code == 204, response.content
    assert not PipelineRun.objects.filter(pk=run.pk).exists()
    assert not (Job.objects.filter(run_id=run.pk).exists() or RunEvent.objects.filter(run_id=run.pk).exists()
                or SampleResult.objects.filter(run_id=run.pk).exists())
    assert not run_dir(run.pk).exists()
    assert tracking.client().get_run(mlflow_run_id).info.lifecycle_stage == "deleted"
    assert artifact_files(mlflow_run_id) == []
    assert token_client(user).get(f"/api/runs/{run.pk}/").status_code == 404


def test_an_active_run_is_refused_with_what_to_do(user):
    run = make_run(user, status="training", jobs=({"step": "finetune", "state": "running", "attempts": 1},))
    response = token_client(user).delete(f"/api/runs/{run.pk}/")
    assert response.status_code == 409
    assert response.json()["detail"] == f"run {run.pk} is 'training': cancel it first, then delete it"
    assert PipelineRun.objects.filter(pk=run.pk).exists()


def test_the_champions_run_is_refused_and_a_demoted_one_goes_with_its_versions(user, staff_user):
    run = make_run(user, status="completed")
    experiment_id, mlflow_run_id = tracking.mlflow_start(run_id=run.pk, name=run.name, kind=run.kind, config=run.config, tags={})
    run_set_mlflow_ids(run_id=run.pk, experiment_id=experiment_id, mlflow_run_id=mlflow_run_id)
    name = f"rag-lora.test-delete-{uuid.uuid4().hex[:8]}.rag_qa_train"
    tracking.client().create_registered_model(name)
    version = tracking.client().create_model_version(name, source=f"runs:/{mlflow_run_id}/model", run_id=mlflow_run_id).version
    run_set_registered_model(run_id=run.pk, name=name, version=str(version))
    tracking.set_champion(name, str(version))

    response = token_client(user).delete(f"/api/runs/{run.pk}/")
    assert response.status_code == 409 and "holds the champion alias: demote it first" in response.json()["detail"]
    assert tracking.versions_of_run(name, mlflow_run_id) == [str(version)]

    assert token_client(staff_user).post(f"/api/runs/{run.pk}/demote/", {"reason": "to delete it"}, format="json").status_code == 200
    assert token_client(user).delete(f"/api/runs/{run.pk}/").status_code == 204
    assert tracking.versions_of_run(name, mlflow_run_id) == []


def test_another_users_run_cannot_be_deleted(user, other_user):
    run = make_run(user, status="failed")
    assert token_client(other_user).delete(f"/api/runs/{run.pk}/").status_code == 404
    assert PipelineRun.objects.filter(pk=run.pk).exists()


def test_the_run_page_deletes_after_a_confirmation_and_refuses_an_active_run(client, user):
    done = make_run(user, status="cancelled")
    active = make_run(user, status="evaluating", jobs=({"step": "generate", "state": "running", "attempts": 1},))
    client.force_login(user)
    page = client.get(f"/runs/{done.pk}/").content.decode()
    assert 'id="run-delete"' in page and "confirm(" in page
    assert 'id="run-delete"' not in client.get(f"/runs/{active.pk}/").content.decode()  # Cancel is offered instead
    response = client.post(f"/runs/{active.pk}/delete/", follow=True)
    assert "cancel it first" in response.content.decode() and PipelineRun.objects.filter(pk=active.pk).exists()
    response = client.post(f"/runs/{done.pk}/delete/", follow=True)
    assert response.redirect_chain[-1][0] == "/" and f"Run #{done.pk}" in response.content.decode()
    assert not PipelineRun.objects.filter(pk=done.pk).exists()


def test_the_admin_deletes_through_the_service(client, staff_user, user):
    run = completed_eval_run(user)
    client.force_login(staff_user)
    response = client.post(f"/admin/runs/pipelinerun/{run.pk}/delete/", {"post": "yes"}, follow=True)
    assert response.status_code == 200
    assert not PipelineRun.objects.filter(pk=run.pk).exists()
    assert tracking.client().get_run(run.mlflow_run_id).info.lifecycle_stage == "deleted"


def test_the_datasets_page_points_at_deleting_the_runs_that_use_a_dataset(client, user):


    from datasets_app.services import DatasetDeleteRefused, dataset_delete, dataset_import_path

    dataset = dataset_import_path(path=Path("data/eval/ragas_eval.jsonl"), name="mine", kind="eval", owner=user)
    run = make_run(user, status="completed")
    run.eval_datasets.add(dataset)
    with pytest.raises(DatasetDeleteRefused, match="a finished run's page has a Delete button"):
        dataset_delete(dataset=dataset, user=user)
    assert token_client(user).delete(f"/api/runs/{run.pk}/").status_code == 204
    dataset_delete(dataset=dataset, user=user)
