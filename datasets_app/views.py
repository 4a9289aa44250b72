"""Dataset pages: list, upload (same validation as the API), preview."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render

from .forms import DatasetUploadPageForm
from .selectors import dataset_visible_to
from .services import DatasetImportError, dataset_import
from .validation import read_rows

PREVIEW_ROWS = 20


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
                summary = "the file has problems (listed below); nothing was stored" if problems else exc.message
                form.add_error(exc.field if exc.field in form.fields else None, summary)
                status = 400
            else:
                messages.success(request, f"Dataset {dataset.name} stored: {dataset.row_count} rows.")
                return redirect("dataset-detail", pk=dataset.pk)
        else:
            status = 400
    datasets = dataset_visible_to(request.user).order_by("kind", "name")
    return render(request, "datasets_app/dataset_list.html", {
        "datasets": datasets, "form": form, "problems": problems, "max_mb": settings.DATASET_MAX_BYTES // (1024 * 1024),
    }, status=status)


@login_required
def dataset_detail(request: HttpRequest, pk: int) -> HttpResponse:
    dataset = get_object_or_404(dataset_visible_to(request.user), pk=pk)
    rows = read_rows(dataset.file.path, limit=PREVIEW_ROWS)
    return render(request, "datasets_app/dataset_detail.html", {"dataset": dataset, "rows": rows})
