"""Writes for datasets. Every way a dataset is created goes through dataset_import."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import IO

from django.conf import settings
from django.core.files import File
from django.db import IntegrityError, transaction

from .models import Dataset
from .validation import validate_jsonl

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,99}$")


class DatasetImportError(Exception):
    """A dataset was refused. `field` names what is wrong (name, type, file)."""

    def __init__(self, field: str, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.problems = problems or []


def validate_dataset_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise DatasetImportError(
            "name",
            "name must be 1-100 characters of lowercase letters, digits, '-' or '_', starting with a letter or digit",
        )


def dataset_import(
    *,
    name: str,
    kind: str,
    fileobj: IO[bytes],
    description: str = "",
    owner=None,
    max_bytes: int | None = None,
) -> Dataset:
    """Validate a JSONL file and store it with a generated name, all or nothing.

    Nothing is written (no file, no row) unless every line is valid.
    """
    validate_dataset_name(name)
    if kind not in Dataset.Kind.values:
        raise DatasetImportError("type", f"type must be one of {', '.join(Dataset.Kind.values)}, got {kind!r}")
    if len(description) > 5000:
        raise DatasetImportError("description", "description must be at most 5000 characters")
    if Dataset.objects.filter(name=name).exists():
        raise DatasetImportError("name", f"a dataset named {name!r} already exists")

    limit = settings.DATASET_MAX_BYTES if max_bytes is None else max_bytes
    size = getattr(fileobj, "size", None)
    if size is not None and size > limit:
        raise DatasetImportError("file", f"file is {size} bytes, over the limit of {limit} bytes")
    fileobj.seek(0)
    report = validate_jsonl(fileobj, kind=kind, max_bytes=limit)
    if not report.ok:
        raise DatasetImportError("file", report.summary(), report.problems)

    fileobj.seek(0)
    stored_name = f"{kind}-{uuid.uuid4().hex}.jsonl"
    dataset = Dataset(
        name=name,
        kind=kind,
        row_count=report.row_count,
        sha256=report.sha256,
        size_bytes=report.size_bytes,
        description=description,
        owner=owner,
    )
    dataset.file.save(stored_name, File(fileobj), save=False)
    try:
        with transaction.atomic():
            dataset.save()
    except IntegrityError:
        dataset.file.delete(save=False)
        raise DatasetImportError("name", f"a dataset named {name!r} already exists") from None
    except BaseException:
        dataset.file.delete(save=False)
        raise
    return dataset


def dataset_import_path(*, path: Path, name: str, kind: str, description: str = "", owner=None) -> Dataset:
    with open(path, "rb") as handle:
        return dataset_import(name=name, kind=kind, fileobj=handle, description=description, owner=owner)


def dataset_update_description(*, dataset_id: int, description: str) -> None:
    Dataset.objects.filter(pk=dataset_id).update(description=description)


class DatasetDeleteRefused(Exception):
    """A user may not delete this dataset; the message says why (and names the runs that use it)."""


def _runs_using(dataset: Dataset):
    """The runs that train on or score with a dataset, newest first (through the runs' own relations)."""
    return (dataset.train_runs.all() | dataset.eval_runs.all()).distinct().order_by("-created_at", "-id")


def dataset_delete(*, dataset: Dataset, user=None) -> None:
    """Delete a dataset row and its stored file.

    With `user` (the pages): only a dataset that user uploaded, and only while no
    run uses it, since a run's config, results and retry name its datasets;
    refused with DatasetDeleteRefused otherwise. Without (the admin site, where
    Django's permissions decide) it deletes what it is given.
    """
    if user is not None:
        if dataset.owner_id is None or dataset.owner_id != user.pk:
            who = "it is bundled with the platform" if dataset.owner_id is None else "it belongs to another user"
            raise DatasetDeleteRefused(f"dataset {dataset.name} cannot be deleted: {who}")
        runs = list(_runs_using(dataset)[:6])
        if runs:
            named = ", ".join(f"#{run.pk} {run.name}" for run in runs[:5])
            more = _runs_using(dataset).count() - 5
            raise DatasetDeleteRefused(
                f"dataset {dataset.name} cannot be deleted: runs use it ({named}{f' and {more} more' if more > 0 else ''}); "
                "delete those runs first (a finished run's page has a Delete button; DELETE /api/runs/{id}/)"
            )
    stored = dataset.file
    with transaction.atomic():
        dataset.delete()
        # The file goes once the row is gone for good: a failed delete keeps both.
        transaction.on_commit(lambda: stored.delete(save=False))
