from __future__ import annotations

from typing import Any

from django.db.models import Q, QuerySet

from .models import Dataset
from .validation import read_rows


def dataset_visible_to(user) -> QuerySet[Dataset]:
    """Bundled datasets (no owner) and the user's own; staff see all."""
    qs = Dataset.objects.all()
    if user.is_staff:
        return qs
    return qs.filter(Q(owner__isnull=True) | Q(owner=user))


def datasets_by_names(names: list[str]) -> dict[str, Dataset]:
    """The named datasets, by name (names that do not exist are left out)."""
    return {d.name: d for d in Dataset.objects.filter(name__in=names)}


def dataset_row_counts(names: list[str]) -> dict[str, int]:
    """{name: rows} of the named datasets (names that do not exist are left out)."""
    return dict(Dataset.objects.filter(name__in=names).values_list("name", "row_count"))


def dataset_rows(dataset: Dataset, *, limit: int | None = None) -> list[dict[str, Any]]:
    """The rows of a dataset's stored file (the first `limit` of them)."""
    return read_rows(dataset.file.path, limit=limit)
