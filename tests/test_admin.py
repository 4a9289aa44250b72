import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from datasets_app.models import Dataset
from runs.models import PipelineRun

from .runs.factories import eval_only_config, make_run

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client, staff_user):
    client.force_login(staff_user)
    return client


def test_every_admin_page_loads(admin_client, user):
    run = make_run(user)
    dataset = Dataset.objects.get(name="ragas_eval")
    for path in [
        "/admin/", "/admin/runs/pipelinerun/", f"/admin/runs/pipelinerun/{run.pk}/change/", "/admin/runs/pipelinerun/add/",
        "/admin/runs/runevent/", "/admin/runs/runresult/", "/admin/runs/sampleresult/",
        "/admin/datasets_app/dataset/", f"/admin/datasets_app/dataset/{dataset.pk}/change/", "/admin/datasets_app/dataset/add/",
        "/admin/runs/pipelinerun/?status__exact=pending&kind__exact=finetune", "/admin/datasets_app/dataset/?kind__exact=eval&q=rag",
    ]:
        assert admin_client.get(path).status_code == 200, path
    page = admin_client.get(f"/admin/datasets_app/dataset/{dataset.pk}/change/").content.decode()
    assert "preview" in page and "ground_truth" in page


def test_admin_cancel_goes_through_the_status_machine(admin_client, user):
    pending, done = make_run(user), make_run(user, status="completed")
    admin_client.post("/admin/runs/pipelinerun/", {"action": "cancel_runs", "_selected_action": [pending.pk, done.pk]})
    pending.refresh_from_db()
    done.refresh_from_db()
    assert pending.status == "cancelled" and pending.events.last().to_status == "cancelled"
    assert done.status == "completed"


def test_admin_creates_a_run_from_a_validated_config(admin_client):
    response = admin_client.post("/admin/runs/pipelinerun/add/", {"config": json.dumps(eval_only_config())})
    assert response.status_code == 302
    assert PipelineRun.objects.get().status == "pending"
    response = admin_client.post("/admin/runs/pipelinerun/add/", {"config": json.dumps(eval_only_config(kind="nope"))})
    assert response.status_code == 200 and b"kind" in response.content
    assert PipelineRun.objects.count() == 1


def test_admin_dataset_upload_uses_the_same_validation(admin_client):
    row = json.dumps({"question": "q", "answer": "a", "context": "c"}).encode() + b"\n"
    response = admin_client.post("/admin/datasets_app/dataset/add/", {
        "name": "admin-set", "kind": "train", "description": "", "upload": SimpleUploadedFile("x.jsonl", row + b"{bad\n"),
    })
    assert response.status_code == 200 and b"line 2" in response.content
    assert not Dataset.objects.filter(name="admin-set").exists()
    response = admin_client.post("/admin/datasets_app/dataset/add/", {
        "name": "admin-set", "kind": "train", "description": "", "upload": SimpleUploadedFile("x.jsonl", row),
    })
    assert response.status_code == 302
    assert Dataset.objects.get(name="admin-set").row_count == 1
