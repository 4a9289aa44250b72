"""Dataset pages: preview of every row, upload errors once, download, delete (own and unused only)."""

import json
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from datasets_app.models import Dataset
from datasets_app.services import DatasetDeleteRefused, dataset_delete, dataset_import
from runs.models import PipelineRun

pytestmark = pytest.mark.django_db

ROW = json.dumps({"question": "q", "answer": "a", "context": "c"}).encode() + b"\n"


@pytest.fixture
def logged_in(client, user):
    client.force_login(user)
    return client


def own_dataset(owner, name="mine", rows=3):
    from io import BytesIO

    return dataset_import(name=name, kind="train", fileobj=BytesIO(ROW * rows), owner=owner)


def test_the_preview_pages_through_every_row_with_reference_contexts(logged_in):
    dataset = Dataset.objects.get(name="ragas_eval")
    rows = [json.loads(line) for line in Path(dataset.file.path).read_text().splitlines() if line.strip()]
    last = logged_in.get(f"/datasets/{dataset.pk}/?page=3").content.decode()
    assert f"Rows 41–{dataset.row_count} of {dataset.row_count}" in last
    assert rows[-1]["question"].replace("'", "&#x27;") in last and rows[0]["question"].replace("'", "&#x27;") not in last
    assert "reference contexts" in last
    with_refs = next(r for r in rows if r.get("reference_contexts"))
    page = (rows.index(with_refs) // 20) + 1
    html = logged_in.get(f"/datasets/{dataset.pk}/?page={page}").content.decode()
    assert with_refs["reference_contexts"][0][:60].replace("'", "&#x27;") in html


def test_long_contexts_expand():
    from django.template.loader import render_to_string

    html = render_to_string("datasets_app/_long_text.html", {"text": "word " * 100})
    assert html.startswith('<details class="long">') and "word " * 100 in html
    assert render_to_string("datasets_app/_long_text.html", {"text": "short"}).strip() == "short"


def test_an_upload_error_is_shown_once_and_reads_well(logged_in):
    bad = ROW + b'{"question": "unterminated'  # the last line, cut short
    response = logged_in.post("/datasets/", {"name": "bad-set", "type": "train", "file": SimpleUploadedFile("x.jsonl", bad)})
    page = response.content.decode()
    assert response.status_code == 400
    assert page.count("line 2: invalid JSON") == 1
    assert "Unterminated string starting at column" in page and "at at" not in page
    assert "Nothing was stored: 1 problem in the file" in page


def test_an_htmx_upload_keeps_the_form_and_redirects_on_success(logged_in):
    bad = logged_in.post("/datasets/", {"name": "bad-set", "type": "train", "file": SimpleUploadedFile("x.jsonl", b"{oops\n")},
                         HTTP_HX_REQUEST="true")
    assert bad.status_code == 400 and 'id="upload-form"' in bad.content.decode() and 'hx-preserve="true"' in bad.content.decode()
    good = logged_in.post("/datasets/", {"name": "good-set", "type": "train", "file": SimpleUploadedFile("x.jsonl", ROW)}, HTTP_HX_REQUEST="true")
    assert good["HX-Redirect"] == f"/datasets/{Dataset.objects.get(name='good-set').pk}/"


def test_the_list_shows_size_date_and_use(logged_in, user):
    dataset = Dataset.objects.get(name="rag_qa_train")
    run = PipelineRun.objects.create(name="uses-it", kind="finetune", config={}, base_model="m", owner=user)
    run.train_datasets.set([dataset])
    page = logged_in.get("/datasets/").content.decode()
    assert "1 run" in page and "none" in page and f'href="/datasets/{dataset.pk}/download/"' in page
    detail = logged_in.get(f"/datasets/{dataset.pk}/").content.decode()
    assert "Used by 1 run" in detail and f"#{run.pk} uses-it" in detail


def test_download_gives_the_stored_file(logged_in):
    dataset = Dataset.objects.get(name="rag_qa_train")
    response = logged_in.get(f"/datasets/{dataset.pk}/download/")
    assert response.status_code == 200
    assert response["Content-Disposition"] == 'attachment; filename="rag_qa_train.jsonl"'
    assert b"".join(response.streaming_content) == Path(dataset.file.path).read_bytes()


def test_a_user_deletes_an_own_unused_dataset_and_its_file(logged_in, user, django_capture_on_commit_callbacks):
    dataset = own_dataset(user)
    path = Path(dataset.file.path)
    with django_capture_on_commit_callbacks(execute=True):
        response = logged_in.post(f"/datasets/{dataset.pk}/delete/")
    assert response.status_code == 302 and response.url == "/datasets/"
    assert not Dataset.objects.filter(pk=dataset.pk).exists() and not path.exists()


def test_a_used_dataset_is_refused_with_the_runs_named(logged_in, user):
    dataset = own_dataset(user)
    run = PipelineRun.objects.create(name="needs-it", kind="finetune", config={}, base_model="m", owner=user)
    run.train_datasets.set([dataset])
    response = logged_in.post(f"/datasets/{dataset.pk}/delete/", follow=True)
    assert f"runs use it (#{run.pk} needs-it)" in response.content.decode()
    assert Dataset.objects.filter(pk=dataset.pk).exists() and Path(dataset.file.path).exists()


def test_bundled_and_other_users_datasets_are_refused(user, other_user, client):
    bundled = Dataset.objects.get(name="ragas_eval")
    with pytest.raises(DatasetDeleteRefused, match="bundled"):
        dataset_delete(dataset=bundled, user=user)
    theirs = own_dataset(other_user, name="theirs")
    with pytest.raises(DatasetDeleteRefused, match="another user"):
        dataset_delete(dataset=theirs, user=user)
    client.force_login(user)
    assert client.post(f"/datasets/{theirs.pk}/delete/").status_code == 404  # not even visible
    assert client.get(f"/datasets/{bundled.pk}/delete/").status_code == 405
    assert Dataset.objects.filter(pk__in=[bundled.pk, theirs.pk]).count() == 2
