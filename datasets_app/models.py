from __future__ import annotations

from django.conf import settings
from django.core.files.storage import FileSystemStorage
from django.db import models


def dataset_storage() -> FileSystemStorage:
    # A callable so tests and deployments can move MLOPS_DATA_DIR without a migration.
    return FileSystemStorage(location=settings.DATA_DIR / "datasets")


class Dataset(models.Model):
    class Kind(models.TextChoices):
        TRAIN = "train", "train"
        EVAL = "eval", "eval"

    name = models.SlugField(max_length=100, unique=True)
    kind = models.CharField(max_length=5, choices=Kind.choices, db_index=True)
    # Stored under a name generated server-side; nothing from the client reaches the path.
    file = models.FileField(storage=dataset_storage, max_length=200, editable=False)
    row_count = models.PositiveIntegerField()
    sha256 = models.CharField(max_length=64)
    size_bytes = models.PositiveBigIntegerField(default=0)
    description = models.TextField(blank=True, max_length=5000)
    # Null for the bundled datasets every user may read; otherwise the uploader.
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="datasets"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["kind", "name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.kind}, {self.row_count} rows)"
