"""Exports on the run page and in the API: ask for one, watch it, read its check, download what it made.

Thin views over runs/export.py. Downloads are streamed (the GGUF as a
FileResponse, the merged folder as a tar produced piece by piece, never written
to disk) to authenticated users who may see the run, with the sha256 recorded
when the export was made in `X-Content-SHA256` and `Repr-Digest` (RFC 9530).
"""

from __future__ import annotations

import base64

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.text import slugify
from django.views.decorators.http import require_POST
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from .export import (
    GGUF_CHOICES,
    DownloadUnavailable,
    ExportBusy,
    ExportInvalid,
    ExportRefused,
    differing_rows,
    download_path,
    export_check_allowed,
    export_request,
    export_spec,
    run_exports,
    running_export,
)
from .models import ExportCheck, Job, ModelExport, PipelineRun
from .selectors import run_visible_to

STOP_POLLING = 286


# --- what the run page and the API show


def export_links(export: ModelExport) -> dict[str, str]:
    links = {}
    if export.merged and export.archive_sha256:
        links["merged"] = reverse("run-export-download", kwargs={"pk": export.run_id, "export_id": export.pk, "what": "merged"})
    if export.gguf_file:
        links["gguf"] = reverse("run-export-download", kwargs={"pk": export.run_id, "export_id": export.pk, "what": "gguf"})
    return links


def exports_box(run: PipelineRun) -> dict | None:
    """The run page's Export card (None for a run that has no model to export)."""
    if not run.spec.graph_of(run).has("export") and not run.model_exports.exists():
        return None
    try:
        export_check_allowed(run)
        refused = ""
    except ExportRefused as exc:
        refused = str(exc)
    jobs = list(Job.objects.filter(run=run, step__in=("export", "export_at_end")).order_by("id"))
    return {
        "refused": refused, "running": running_export(run), "gguf_choices": GGUF_CHOICES,
        "exports": [{"export": e, "links": export_links(e)} for e in run_exports(run)],
        "failed": [j for j in jobs if j.state in ("failed", "cancelled")],
    }


@login_required
def run_exports_fragment(request: HttpRequest, pk: int) -> HttpResponse:
    """The Export card, polled while an export runs; 286 once none does."""
    run = get_object_or_404(run_visible_to(request.user), pk=pk)
    box = exports_box(run)
    response = render(request, "runs/_export.html", {"run": run, "exports": box})
    if not (box and box["running"]):
        response.status_code = STOP_POLLING
    return response


@login_required
@require_POST
def run_export_view(request: HttpRequest, pk: int) -> HttpResponse:
    """The Export button: an export job of the run (or why not)."""
    run = get_object_or_404(run_visible_to(request.user), pk=pk)
    margin = request.POST.get("margin", "").strip()
    try:
        spec = export_spec(merged=request.POST.get("merged") in ("on", "true", "1"), gguf=request.POST.get("gguf", "none"),
                           margin=float(margin) if margin else None)
        job = export_request(run=run, spec=spec)
        messages.success(request, f"Export {job.label} queued: it answers the eval questions again with each exported form before it registers anything.")
    except ValueError as exc:  # ExportInvalid, or a margin that is not a number
        messages.error(request, f"Not exported: {exc}")
    except ExportRefused as exc:
        messages.error(request, str(exc))
    if request.htmx:
        return run_exports_fragment(request, pk)
    return redirect(reverse("run-detail", kwargs={"pk": pk}) + "#exports")


@login_required
def run_export_differences(request: HttpRequest, pk: int, export_id: int, form: str) -> HttpResponse:
    """The rows whose exported answer differs from the adapter's, side by side, with both scores."""
    run = get_object_or_404(run_visible_to(request.user), pk=pk)
    check = get_object_or_404(ExportCheck.objects.select_related("export"), export__run=run, export_id=export_id, form=form)
    rows = differing_rows(check)
    metrics = list(run.config["evaluation"]["metrics"])
    return render(request, "runs/export_differences.html", {"run": run, "check": check, "rows": rows, "metrics": metrics})


def download_response(export: ModelExport, what: str) -> HttpResponse:
    try:
        path = download_path(export, what)
    except DownloadUnavailable as exc:
        raise Http404(str(exc)) from None
    stem = slugify(f"{export.run.name}-run{export.run_id}-{export.label}") or f"run{export.run_id}"
    if what == "gguf":
        response = FileResponse(open(path, "rb"), as_attachment=True, filename=f"{stem}-{export.gguf_file}",  # noqa: SIM115
                                content_type="application/octet-stream")
        digest = export.gguf_sha256
    else:
        from training.export import archive_chunks

        response = StreamingHttpResponse(archive_chunks(path), content_type="application/x-tar")
        response["Content-Disposition"] = f'attachment; filename="{stem}-merged.tar"'
        response["Content-Length"] = str(export.archive_bytes)
        digest = export.archive_sha256
    response["X-Content-SHA256"] = digest
    response["Repr-Digest"] = f"sha-256=:{base64.b64encode(bytes.fromhex(digest)).decode()}:"
    return response


@login_required
def run_export_download(request: HttpRequest, pk: int, export_id: int, what: str) -> HttpResponse:
    run = get_object_or_404(run_visible_to(request.user), pk=pk)
    export = get_object_or_404(ModelExport.objects.select_related("run"), pk=export_id, run=run)
    if what not in ("merged", "gguf"):
        raise Http404("download merged or gguf")
    return download_response(export, what)


# --- the API


class ExportInputSerializer(serializers.Serializer):
    merged = serializers.BooleanField(default=True, help_text="The merged Transformers folder (registered as <model>.merged).")
    gguf = serializers.ChoiceField(choices=GGUF_CHOICES, default="none", help_text="A GGUF of the merged weights (Llama family).")
    margin = serializers.FloatField(required=False, min_value=1e-9, max_value=1.0, help_text="The check's equivalence margin (default 0.01).")


class ExportQueuedSerializer(serializers.Serializer):
    job = serializers.IntegerField()
    label = serializers.CharField()
    state = serializers.CharField()
    run = serializers.CharField(help_text="The run detail to poll: its jobs[] and exports[].")


class ExportCheckOutputSerializer(serializers.ModelSerializer):
    identical_share = serializers.FloatField(allow_null=True)
    differences = serializers.SerializerMethodField()

    class Meta:
        model = ExportCheck
        fields = ["form", "label", "rows", "identical", "identical_share", "verdict", "comparisons", "seconds", "device", "differences"]

    @extend_schema_field(serializers.CharField())
    def get_differences(self, check: ExportCheck) -> str:
        """The page that shows the rows whose answer differs, side by side."""
        return reverse("run-export-differences", kwargs={"pk": check.export.run_id, "export_id": check.export_id, "form": check.form})


class ModelExportOutputSerializer(serializers.ModelSerializer):
    job = serializers.IntegerField(source="job_id", allow_null=True)
    checks = ExportCheckOutputSerializer(many=True, read_only=True)
    downloads = serializers.SerializerMethodField()

    class Meta:
        model = ModelExport
        fields = [
            "id", "job", "label", "merged", "gguf", "margin", "verdict", "merged_dtype", "merged_bytes", "archive_sha256", "archive_bytes",
            "gguf_file", "gguf_sha256", "gguf_bytes", "gguf_message", "registered_model_name", "registered_model_version",
            "figures", "created_at", "checks", "downloads",
        ]

    @extend_schema_field(serializers.DictField(child=serializers.CharField()))
    def get_downloads(self, export: ModelExport) -> dict[str, str]:
        """Authenticated, streamed: the merged folder as a tar, the GGUF file."""
        return {what: reverse("api-run-export-download", kwargs={"pk": export.run_id, "export_id": export.pk, "what": what})
                for what in export_links(export)}


class RunModelExportApi(APIView):
    @extend_schema(
        request=ExportInputSerializer,
        responses={202: ExportQueuedSerializer, 400: OpenApiTypes.OBJECT, 409: OpenApiTypes.OBJECT},
        description="Export a completed fine-tune: merged weights (`merged`) and/or a GGUF (`gguf`: f16, q8_0), each asked the "
                    "eval questions again and compared with the adapter (identical answers, TOST on the metrics with `margin`), "
                    "the merged weights registered as `<model>.merged`. A job on the gpu queue: 202 with it; the run detail's "
                    "`jobs[]` and `exports[]` follow it. 409 when the run is not a completed fine-tune, or while another export "
                    "of it is queued or running (named in the message).",
    )
    def post(self, request: Request, pk: int) -> Response:
        run = get_object_or_404(run_visible_to(request.user), pk=pk)
        data = ExportInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            job = export_request(run=run, spec=export_spec(**data.validated_data))
        except ExportInvalid as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_400_BAD_REQUEST)
        except ExportBusy as exc:
            return Response({"detail": str(exc), "running": {"job": exc.job.pk, "label": exc.job.label, "state": exc.job.state}},
                            status=status.HTTP_409_CONFLICT)
        except ExportRefused as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        detail = request.build_absolute_uri(reverse("api-run-detail", kwargs={"pk": run.pk}))
        return Response({"job": job.pk, "label": job.label, "state": job.state, "run": detail}, status=status.HTTP_202_ACCEPTED)


class RunModelExportDownloadApi(APIView):
    @extend_schema(responses={(200, "application/octet-stream"): OpenApiTypes.BINARY, 404: OpenApiTypes.OBJECT},
                   description="Download an export: `merged` (the merged folder as a tar) or `gguf`, streamed; `X-Content-SHA256` "
                               "and `Repr-Digest` carry the sha256 recorded when it was made.")
    def get(self, request: Request, pk: int, export_id: int, what: str) -> HttpResponse:
        run = get_object_or_404(run_visible_to(request.user), pk=pk)
        export = get_object_or_404(ModelExport.objects.select_related("run"), pk=export_id, run=run)
        if what not in ("merged", "gguf"):
            raise Http404("download merged or gguf")
        return download_response(export, what)
