"""Dataset pages: list, upload (same validation as the API), preview of every row, download, delete."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import Count
from django.http import FileResponse, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST
from django_htmx.http import HttpResponseClientRedirect

from .forms import DatasetUploadPageForm
from .models import Dataset
from .selectors import dataset_visible_to
from .services import DatasetDeleteRefused, DatasetImportError, dataset_delete, dataset_import

PREVIEW_ROWS = 20


class StoredRows(Sequence):
    """The rows of a stored (validated) dataset file, read only as far as the page asked for."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return self.dataset.row_count

    def __getitem__(self, index: Any) -> Any:
        if not isinstance(index, slice):
            return self[index:index + 1][0]
        start, stop, _ = index.indices(len(self))
        with open(self.dataset.file.path, encoding="utf-8-sig") as handle:
            lines = (line for line in handle if line.strip())
            return [{"number": start + i + 1, **json.loads(line)} for i, line in enumerate(itertools.islice(lines, start, stop))]


def _visible_with_usage(user):
    return dataset_visible_to(user).annotate(
        n_train_runs=Count("train_runs", distinct=True), n_eval_runs=Count("eval_runs", distinct=True),
    )


@login_required
def dataset_list(request: HttpRequest) -> HttpResponse:
    form = DatasetUploadPageForm()
    problems: list[str] = []
    status = 200
    if request.method == "POST":
        form = DatasetUploadPageForm(request.POST, request.FILES)
        if form.is_valid():
            data = form.cleaned_data
            try:
                dataset = dataset_import(
                    name=data["name"], kind=data["type"], fileobj=data["file"], description=data["description"], owner=request.user,
                )
            except DatasetImportError as exc:
                problems = exc.problems
                if not problems:  # a file's problems are listed once, under the file
                    form.add_error(exc.field if exc.field in form.fields else None, exc.message)
                status = 400
            else:
                messages.success(request, f"Dataset {dataset.name} stored: {dataset.row_count} rows.")
                url = reverse("dataset-detail", args=[dataset.pk])
                return HttpResponseClientRedirect(url) if request.htmx else redirect(url)
        else:
            status = 400
    datasets = _visible_with_usage(request.user).order_by("kind", "name")
    return render(request, "datasets_app/dataset_list.html", {
        "datasets": datasets, "form": form, "problems": problems, "max_mb": settings.DATASET_MAX_BYTES // (1024 * 1024),
    }, status=status)


@login_required
def dataset_detail(request: HttpRequest, pk: int) -> HttpResponse:
    dataset = get_object_or_404(_visible_with_usage(request.user), pk=pk)
    page = Paginator(StoredRows(dataset), PREVIEW_ROWS).get_page(request.GET.get("page"))
    runs = (dataset.train_runs.all() | dataset.eval_runs.all()).distinct().order_by("-created_at", "-id")
    if not request.user.is_staff:
        runs = runs.filter(owner=request.user)
    return render(request, "datasets_app/dataset_detail.html", {
        "dataset": dataset, "page": page, "runs": runs[:20], "n_runs": dataset.n_train_runs + dataset.n_eval_runs,
        "can_delete": dataset.owner_id == request.user.pk,
    })


@login_required
def dataset_download(request: HttpRequest, pk: int) -> FileResponse:
    dataset = get_object_or_404(dataset_visible_to(request.user), pk=pk)
    return FileResponse(dataset.file.open("rb"), as_attachment=True, filename=f"{dataset.name}.jsonl", content_type="application/jsonl")


@login_required
@require_POST
def dataset_delete_view(request: HttpRequest, pk: int) -> HttpResponse:
    dataset = get_object_or_404(dataset_visible_to(request.user), pk=pk)
    try:
        dataset_delete(dataset=dataset, user=request.user)
    except DatasetDeleteRefused as exc:
        messages.error(request, str(exc))
        return redirect("dataset-detail", pk=pk)
    messages.success(request, f"Dataset {dataset.name} deleted.")
    return redirect("dataset-list")
