import io
import json
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError

from datasets_app.models import Dataset
from datasets_app.seeding import BUNDLED
from datasets_app.services import DatasetImportError, dataset_import

ROW = {"question": "What is LoRA?", "answer": "Low-rank adaptation.", "context": "LoRA adds low-rank matrices."}


def stored_files() -> set[Path]:
    return set((Path(settings.DATA_DIR) / "datasets").glob("*"))


def jsonl_bytes(*rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


@pytest.mark.django_db
def test_migrate_registers_the_six_bundled_datasets_with_counts_and_hashes():
    import hashlib

    for bundled in BUNDLED:
        dataset = Dataset.objects.get(name=bundled.name)
        source = settings.BUNDLED_DATA_DIR / bundled.relative_path
        lines = [line for line in source.read_text().splitlines() if line.strip()]
        assert dataset.kind == bundled.kind
        assert dataset.row_count == len(lines)
        assert dataset.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
        assert dataset.row_count >= (150 if dataset.kind == "train" else 40)


@pytest.mark.django_db
def test_seed_datasets_is_idempotent():
    before = Dataset.objects.count()
    call_command("seed_datasets")
    assert Dataset.objects.count() == before


@pytest.mark.django_db
def test_it_stores_the_file_under_a_generated_name(user):
    dataset = dataset_import(name="my-set", kind="train", fileobj=io.BytesIO(jsonl_bytes(ROW, ROW)), owner=user)
    assert dataset.row_count == 2
    assert Path(dataset.file.name).name.startswith("train-")
    assert "my-set" not in dataset.file.name
    assert Path(dataset.file.path).read_bytes() == jsonl_bytes(ROW, ROW)


@pytest.mark.django_db
def test_a_bad_line_stores_nothing():
    rows_before, files_before = Dataset.objects.count(), stored_files()
    data = jsonl_bytes(ROW, ROW) + b"{broken\n"
    with pytest.raises(DatasetImportError) as caught:
        dataset_import(name="broken", kind="train", fileobj=io.BytesIO(data))
    assert caught.value.field == "file"
    assert "line 3: invalid JSON" in caught.value.message
    assert Dataset.objects.count() == rows_before
    assert stored_files() == files_before


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["../etc/passwd", "Has Spaces", "", "x" * 101, "nul\x00name", "-leading"])
def test_it_refuses_bad_names(name):
    with pytest.raises(DatasetImportError) as caught:
        dataset_import(name=name, kind="train", fileobj=io.BytesIO(jsonl_bytes(ROW)))
    assert caught.value.field == "name"


@pytest.mark.django_db
def test_it_refuses_a_duplicate_name_and_an_unknown_type():
    with pytest.raises(DatasetImportError, match="already exists"):
        dataset_import(name="rag_qa_train", kind="train", fileobj=io.BytesIO(jsonl_bytes(ROW)))
    with pytest.raises(DatasetImportError) as caught:
        dataset_import(name="fresh", kind="test", fileobj=io.BytesIO(jsonl_bytes(ROW)))
    assert caught.value.field == "type"


@pytest.mark.django_db
def test_it_refuses_a_file_over_the_configured_limit(settings):
    settings.DATASET_MAX_BYTES = 100
    files_before = stored_files()
    with pytest.raises(DatasetImportError, match="limit of 100 bytes"):
        dataset_import(name="big", kind="train", fileobj=io.BytesIO(jsonl_bytes(*[ROW] * 10)))
    assert stored_files() == files_before


@pytest.mark.django_db
def test_import_dataset_command(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_bytes(jsonl_bytes(ROW))
    call_command("import_dataset", str(good), "--name", "cli-set", "--type", "train")
    assert Dataset.objects.get(name="cli-set").row_count == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl_bytes(ROW) + b"[1]\n")
    with pytest.raises(CommandError, match="line 2: expected a JSON object"):
        call_command("import_dataset", str(bad), "--name", "cli-bad", "--type", "train")
    assert not Dataset.objects.filter(name="cli-bad").exists()
