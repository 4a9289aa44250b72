import json
from pathlib import Path

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile

from datasets_app.models import Dataset

pytestmark = pytest.mark.django_db

ROW = json.dumps({"question": "q", "answer": "a", "context": "c"}).encode() + b"\n"


@pytest.fixture
def logged_in(client, user):
    client.force_login(user)
    return client


def test_list_and_detail(logged_in):
    page = logged_in.get("/datasets/").content.decode()
    assert "rag_qa_train" in page and "legal_ragas_eval" in page
    dataset = Dataset.objects.get(name="ragas_eval")
    detail = logged_in.get(f"/datasets/{dataset.pk}/").content.decode()
    assert dataset.sha256 in detail and "ground truth" in detail


def test_upload_shows_line_numbered_errors_and_stores_nothing(logged_in):
    files_before = set((Path(settings.DATA_DIR) / "datasets").iterdir())
    response = logged_in.post("/datasets/", {"name": "bad-set", "type": "train", "file": SimpleUploadedFile("x.jsonl", ROW + ROW + b"{oops\n")})
    assert response.status_code == 400
    assert "line 3: invalid JSON" in response.content.decode()
    assert not Dataset.objects.filter(name="bad-set").exists()
    assert set((Path(settings.DATA_DIR) / "datasets").iterdir()) == files_before


def test_upload_stores_and_redirects(logged_in, user):
    response = logged_in.post("/datasets/", {"name": "good-set", "type": "train", "description": "<script>x</script>", "file": SimpleUploadedFile("x.jsonl", ROW)})
    dataset = Dataset.objects.get(name="good-set")
    assert response.status_code == 302 and response.url == f"/datasets/{dataset.pk}/"
    assert dataset.owner == user
    page = logged_in.get(f"/datasets/{dataset.pk}/").content.decode()
    assert "<script>x</script>" not in page and "&lt;script&gt;" in page


def test_login_page_and_logout(client, user):
    assert client.get("/accounts/login/").status_code == 200
    response = client.post("/accounts/login/", {"username": "alice", "password": "correct-horse-battery-staple"})
    assert response.status_code == 302
    assert client.get("/").status_code == 200
    client.post("/accounts/logout/")
    assert client.get("/").status_code == 302


def test_not_found_page_uses_the_layout(logged_in, settings):
    settings.DEBUG = False
    response = logged_in.get("/no/such/page/")
    assert response.status_code == 404 and "Back to the runs" in response.content.decode()
