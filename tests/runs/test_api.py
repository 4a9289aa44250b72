import csv
import io
import json
from pathlib import Path

import pytest
from django.conf import settings
from rest_framework.test import APIClient

from datasets_app.models import Dataset
from runs.models import PipelineRun, RunEvent, RunResult, SampleResult

from .factories import finetune_config, make_run

pytestmark = pytest.mark.django_db

ROUTES = [
    ("get", "/api/datasets/"),
    ("post", "/api/datasets/"),
    ("get", "/api/datasets/1/"),
    ("get", "/api/runs/"),
    ("post", "/api/runs/"),
    ("get", "/api/runs/1/"),
    ("patch", "/api/runs/1/status/"),
    ("patch", "/api/runs/1/logs/"),
    ("post", "/api/runs/1/results/"),
    ("post", "/api/runs/1/cancel/"),
    ("get", "/api/runs/1/samples/"),
    ("get", "/api/runs/1/export.csv"),
    ("post", "/api/runs/1/generate/"),
    ("get", "/api/schema/"),
    ("get", "/api/docs/"),
    ("get", "/api/"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_anonymous_requests_get_401_saying_how_to_authenticate(method, path):
    response = getattr(APIClient(), method)(path)
    assert response.status_code == 401, response.content
    assert response["WWW-Authenticate"] == "Token"


def test_a_wrong_token_is_401_too(user):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")
    response = client.get("/api/runs/")
    assert response.status_code == 401 and response["WWW-Authenticate"] == "Token"
    assert "token" in response.json()["detail"].lower()


def test_session_writes_still_need_the_csrf_token(user):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(user)
    assert client.get("/api/runs/").status_code == 200  # the browsable API and the docs keep working on a session
    refused = client.post("/api/runs/", finetune_config(), format="json")
    assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]


def test_datasets_list_filters_by_type(api):
    train = api.get("/api/datasets/?type=train").json()
    evals = api.get("/api/datasets/?type=eval").json()
    assert {d["name"] for d in train["results"]} == {"rag_qa_train", "medical_qa_train", "legal_qa_train"}
    assert {d["name"] for d in evals["results"]} == {"ragas_eval", "medical_ragas_eval", "legal_ragas_eval"}
    assert all(d["row_count"] >= 150 for d in train["results"])
    assert set(train["results"][0]) >= {"id", "name", "type", "row_count", "sha256", "description"}
    assert api.get("/api/datasets/?type=bogus").status_code == 400


def test_dataset_detail_has_a_preview(api):
    dataset = Dataset.objects.get(name="ragas_eval")
    body = api.get(f"/api/datasets/{dataset.pk}/").json()
    assert len(body["preview"]) == 5
    assert set(body["preview"][0]) >= {"question", "contexts", "ground_truth", "answer"}


def upload(client, name, content: bytes, kind="train"):
    return client.post("/api/datasets/", {"name": name, "type": kind, "file": io.BytesIO(content)}, format="multipart")


def test_upload_validates_and_stores(api, user):
    row = json.dumps({"question": "q", "answer": "a", "context": "c"}).encode()
    response = upload(api, "mine", row + b"\n" + row + b"\n")
    assert response.status_code == 201, response.json()
    assert response.json()["row_count"] == 2
    assert Dataset.objects.get(name="mine").owner == user


def test_upload_with_a_broken_line_3_stores_nothing(api):
    row = json.dumps({"question": "q", "answer": "a", "context": "c"}).encode()
    datasets_dir = Path(settings.DATA_DIR) / "datasets"
    files_before, count_before = set(datasets_dir.iterdir()), Dataset.objects.count()
    response = upload(api, "broken", row + b"\n" + row + b"\n{oops\n")
    assert response.status_code == 400
    body = response.json()
    assert "line 3" in body["detail"]
    assert body["errors"][0]["field"] == "file"
    assert Dataset.objects.count() == count_before
    assert set(datasets_dir.iterdir()) == files_before


def test_upload_refuses_missing_fields_by_name(api):
    response = api.post("/api/datasets/", {"name": "x"}, format="multipart")
    assert response.status_code == 400
    fields = {e["field"] for e in response.json()["errors"]}
    assert {"type", "file"} <= fields


def test_users_do_not_see_each_others_datasets(api, other_api):
    row = json.dumps({"question": "q", "answer": "a", "context": "c"}).encode() + b"\n"
    dataset_id = upload(api, "private-set", row).json()["id"]
    assert other_api.get(f"/api/datasets/{dataset_id}/").status_code == 404
    assert "private-set" not in {d["name"] for d in other_api.get("/api/datasets/").json()["results"]}


def test_create_run_stores_a_pending_validated_run(api, user):
    response = api.post("/api/runs/", finetune_config(), format="json")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["status"] == "pending"
    run = PipelineRun.objects.get(pk=body["id"])
    assert run.owner == user
    assert run.config["training"]["lora"]["r"] == 8
    assert [d.name for d in run.train_datasets.all()] == ["rag_qa_train"]
    assert list(run.jobs.values_list("step", "state", "queue")) == [("finetune", "queued", "gpu")]
    assert [(j["step"], j["state"]) for j in body["jobs"]] == [("finetune", "queued")] and body["parent"] is None


def test_create_run_refuses_a_bad_config_naming_the_field(api):
    count = PipelineRun.objects.count()
    response = api.post("/api/runs/", finetune_config(training={"epochs": -1}), format="json")
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "training.epochs"
    response = api.post("/api/runs/", finetune_config(datasets={"train": ["nope"], "eval": ["ragas_eval"]}), format="json")
    assert response.json()["errors"][0] == {"field": "datasets.train[0]", "message": "unknown dataset 'nope'"}
    assert PipelineRun.objects.count() == count


def test_a_user_cannot_use_another_users_dataset(api, other_api):
    row = json.dumps({"question": "q", "answer": "a", "context": "c"}).encode() + b"\n"
    upload(api, "alice-data", row)
    response = other_api.post("/api/runs/", finetune_config(datasets={"train": ["alice-data"], "eval": ["ragas_eval"]}), format="json")
    assert response.status_code == 400


def test_list_runs_is_paginated_filtered_and_private(api, other_api, user, other_user):
    for _ in range(3):
        make_run(user)
    make_run(user, status="completed")
    make_run(other_user)
    body = api.get("/api/runs/").json()
    assert body["count"] == 4 and "next" in body and len(body["results"]) == 4
    assert api.get("/api/runs/?status=completed").json()["count"] == 1
    assert api.get("/api/runs/?status=pending,completed").json()["count"] == 4
    assert api.get("/api/runs/?status=bogus").status_code == 400
    assert other_api.get("/api/runs/").json()["count"] == 1


def test_staff_see_every_run(staff_api, user, other_user):
    make_run(user)
    make_run(other_user)
    assert staff_api.get("/api/runs/").json()["count"] == 2


def test_run_detail_has_the_design_fields(api, user):
    run = make_run(user)
    body = api.get(f"/api/runs/{run.pk}/").json()
    for field in ["id", "name", "kind", "status", "stage", "progress", "config", "logs", "error", "mlflow_run_id",
                  "registered_model", "results", "created_at", "started_at", "finished_at"]:
        assert field in body


@pytest.mark.parametrize("action", [
    ("get", "/api/runs/{}/", None),
    ("patch", "/api/runs/{}/status/", {"status": "cancelled"}),
    ("patch", "/api/runs/{}/logs/", {"logs": "x"}),
    ("post", "/api/runs/{}/results/", {"results": [{"metric": "m", "value": 1}]}),
    ("post", "/api/runs/{}/cancel/", None),
    ("get", "/api/runs/{}/samples/", None),
    ("get", "/api/runs/{}/export.csv", None),
])
def test_a_user_cannot_touch_another_users_run(other_api, user, action):
    method, path, body = action
    run = make_run(user)
    response = getattr(other_api, method)(path.format(run.pk), body, format="json")
    assert response.status_code == 404
    run.refresh_from_db()
    assert run.status == "pending" and run.logs == "" and not run.results.exists()


def test_status_patch_follows_the_machine(api, user):
    run = make_run(user)
    response = api.patch(f"/api/runs/{run.pk}/status/", {"status": "training", "message": "claimed"}, format="json")
    assert response.status_code == 200 and response.json()["status"] == "training"
    response = api.patch(f"/api/runs/{run.pk}/status/", {"status": "completed"}, format="json")
    assert response.status_code == 409
    assert "'training'" in response.json()["detail"] and "'completed'" in response.json()["detail"]
    assert api.patch(f"/api/runs/{run.pk}/status/", {"status": "nonsense"}, format="json").status_code == 400
    assert list(RunEvent.objects.filter(run=run).values_list("to_status", flat=True)) == ["pending", "training"]


def test_logs_are_appended_never_replaced(api, user):
    run = make_run(user)
    api.patch(f"/api/runs/{run.pk}/logs/", {"logs": "first line"}, format="json")
    body = api.patch(f"/api/runs/{run.pk}/logs/", {"logs": "second line"}, format="json").json()
    assert body["logs"] == "first line\nsecond line\n"


def test_results_are_stored_per_dataset_variant_and_metric(api, user):
    run = make_run(user)
    run.eval_datasets.set([Dataset.objects.get(name="ragas_eval")])
    response = api.post(f"/api/runs/{run.pk}/results/", {"results": [
        {"metric": "rouge_score", "value": 0.5},
        {"metric": "rouge_score", "value": 0.25, "variant": "base", "dataset": "ragas_eval"},
        {"metric": "faithfulness", "value": None, "n_failed": 3},
    ]}, format="json")
    assert response.status_code == 201, response.json()
    results = {(r["metric"], r["variant"]): r for r in response.json()["results"]}
    assert results[("rouge_score", "finetuned")]["value"] == 0.5
    assert results[("rouge_score", "base")]["dataset"] == "ragas_eval"
    assert results[("faithfulness", "finetuned")] | {} == {**results[("faithfulness", "finetuned")], "value": None, "n_failed": 3}
    # Posting the same key again updates, never duplicates.
    api.post(f"/api/runs/{run.pk}/results/", {"results": [{"metric": "rouge_score", "value": 0.75}]}, format="json")
    assert RunResult.objects.filter(run=run, metric="rouge_score", variant="finetuned").get().value == 0.75
    bad = api.post(f"/api/runs/{run.pk}/results/", {"results": [{"metric": "m", "value": 1, "dataset": "legal_ragas_eval"}]}, format="json")
    assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "results[0].dataset"


def test_cancel(api, user):
    run = make_run(user, status="training")
    body = api.post(f"/api/runs/{run.pk}/cancel/").json()
    assert body["status"] == "cancelled"
    response = api.post(f"/api/runs/{run.pk}/cancel/")
    assert response.status_code == 409


def test_samples_and_csv_export(api, user):
    run = make_run(user, kind="eval_only", status="completed")
    dataset = Dataset.objects.get(name="ragas_eval")
    SampleResult.objects.create(run=run, dataset=dataset, variant="dataset", index=0, question="q", contexts=["c"],
                                ground_truth="g", answer="a", scores={"rouge_score": 0.5, "faithfulness": None},
                                reasons={"faithfulness": "timeout"})
    RunResult.objects.create(run=run, dataset=dataset, variant="dataset", metric="=HYPERLINK(\"x\")", value=0.5, n_scored=1)
    samples = api.get(f"/api/runs/{run.pk}/samples/").json()
    assert samples["count"] == 1
    sample = samples["results"][0]
    assert sample["scores"] == {"rouge_score": 0.5, "faithfulness": None}
    assert sample["dataset"] == "ragas_eval" and sample["contexts"] == ["c"]
    response = api.get(f"/api/runs/{run.pk}/export.csv")
    assert response["Content-Type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(response.content.decode())))
    assert rows[0][:5] == ["run_id", "run_name", "dataset", "variant", "metric"]
    assert rows[1][4].startswith("'=")  # neutralised against formula injection


def test_each_sample_says_whether_the_token_limit_cut_its_answer_off_and_the_schema_documents_it(api, user):
    run = make_run(user, status="completed")
    dataset = Dataset.objects.get(name="ragas_eval")
    for index, cut_off in enumerate([True, False, None]):  # None: not recorded (a run from before)
        SampleResult.objects.create(run=run, dataset=dataset, variant="finetuned", index=index, question="q", contexts=["c"],
                                    ground_truth="g", answer="an answer that goes on and", cut_off=cut_off)
    samples = api.get(f"/api/runs/{run.pk}/samples/").json()["results"]
    assert [s["cut_off"] for s in samples] == [True, False, None]
    schema = api.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    field = schema["components"]["schemas"]["SampleOutput"]["properties"]["cut_off"]
    assert field["type"] == "boolean" and field["nullable"] is True and field["readOnly"] is True
    assert "max_new_tokens" in field["description"] and "null where not recorded" in field["description"]


def test_schema_and_docs_are_served_to_users(api):
    schema = api.get("/api/schema/")
    assert schema.status_code == 200
    assert b"/api/runs/{id}/status/" in schema.content
    docs = api.get("/api/docs/")
    assert docs.status_code == 200
    assert b"cdn" not in docs.content.lower()


def test_session_authentication_works_too(client, user):
    client.force_login(user)
    assert client.get("/api/runs/").status_code == 200
