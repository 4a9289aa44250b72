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


def test_a_run_change_page_is_entirely_read_only(admin_client, user):
    run = make_run(user, status="training", data_check={"ok": True, "problems": []},
                   jobs=({"step": "finetune", "state": "running", "attempts": 1, "checkpoint_step": 4, "output": {"best_step": 2}},))
    page = admin_client.get(f"/admin/runs/pipelinerun/{run.pk}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    # No input for any field of the run: only the CSRF token (and the admin's own hidden bits) are form fields.
    for field in ("state", "attempts", "checkpoint_step", "data_check", "status", "progress", "logs", "error"):
        assert f'name="{field}"' not in html and f'name="jobs-0-{field}"' not in html, field
    assert 'name="_save"' not in html and "finetune" in html and "running" in html  # the jobs shown, not editable
    refused = admin_client.post(f"/admin/runs/pipelinerun/{run.pk}/change/", {"jobs-0-state": "done", "jobs-0-attempts": 0, "status": "completed"})
    assert refused.status_code == 403
    run.refresh_from_db()
    job = run.jobs.get()
    assert (run.status, job.state, job.attempts, job.checkpoint_step) == ("training", "running", 1, 4)
    # The actions still change state through the services.
    admin_client.post("/admin/runs/pipelinerun/", {"action": "cancel_runs", "_selected_action": [run.pk]})
    run.refresh_from_db()
    assert run.status == "cancelled"


def test_add_pipeline_run_starts_from_the_default_config(admin_client):
    import yaml
    from django.conf import settings

    page = admin_client.get("/admin/runs/pipelinerun/add/")
    form = page.context["adminform"].form
    default = yaml.safe_load((settings.BASE_DIR / "configs" / "finetune_rag_qa.yaml").read_text())
    assert json.loads(form["config"].value()) == default
    assert "null</textarea>" not in page.content.decode()
    # Saved as it is, it is a valid run.
    created = admin_client.post("/admin/runs/pipelinerun/add/", {"config": form["config"].value()})
    assert created.status_code == 302
    assert PipelineRun.objects.get().name == default["name"]


def test_the_admin_index_queue_link_says_what_the_queues_page_says(admin_client):
    index = admin_client.get("/admin/").content.decode()
    assert 'href="/admin/django_rq/dashboard/"' in index
    page = admin_client.get("/admin/django_rq/dashboard/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "Jobs run in-process" in html and "Workers" not in html  # not RQ's dashboard with 0 workers


def test_in_served_mode_the_admin_queue_link_is_rqs_dashboard(admin_client, rq_settings):
    html = admin_client.get("/admin/django_rq/dashboard/").content.decode()
    assert "Jobs run in-process" not in html and "gpu" in html and "cpu" in html
