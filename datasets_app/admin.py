from __future__ import annotations

from django import forms
from django.contrib import admin
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join

from mlops_site.admin_mixins import ServiceAddFormMixin

from .models import Dataset
from .services import DatasetImportError, dataset_delete, dataset_import, dataset_update_description
from .validation import read_rows


class DatasetUploadForm(forms.ModelForm):
    """Admin add form: the same validation and storage as the upload API."""

    upload = forms.FileField(help_text="JSONL: one JSON object per line (train: question, answer, context; eval: question, answer, contexts, ground_truth).")

    class Meta:
        model = Dataset
        fields = ["name", "kind", "description"]

    def clean(self):
        cleaned = super().clean()
        if self.errors:
            return cleaned
        try:
            self.instance = dataset_import(
                name=cleaned["name"], kind=cleaned["kind"], fileobj=cleaned["upload"],
                description=cleaned.get("description", ""), owner=self.request_user,
            )
        except DatasetImportError as exc:
            field = {"type": "kind", "file": "upload"}.get(exc.field, exc.field)
            raise forms.ValidationError({field: exc.problems or [exc.message]}) from None
        return cleaned

    def validate_unique(self) -> None:
        # dataset_import already refused duplicates; the row exists by now.
        pass


@admin.register(Dataset)
class DatasetAdmin(ServiceAddFormMixin, admin.ModelAdmin):
    add_form = DatasetUploadForm
    list_display = ["name", "kind", "row_count", "sha256_prefix", "owner", "created_at"]
    list_filter = ["kind", "created_at"]
    search_fields = ["name", "description", "sha256"]
    readonly_fields = ["name", "kind", "file", "row_count", "sha256", "size_bytes", "owner", "created_at", "preview"]
    fields = ["name", "kind", "description", "row_count", "sha256", "size_bytes", "owner", "created_at", "preview"]

    def get_fields(self, request, obj=None):
        return ["name", "kind", "description", "upload"] if obj is None else self.fields

    def save_model(self, request, obj, form, change) -> None:
        if change:
            dataset_update_description(dataset_id=obj.pk, description=obj.description)
        # On add, the form's clean() stored it through dataset_import.

    def delete_model(self, request: HttpRequest, obj: Dataset) -> None:
        dataset_delete(dataset=obj)

    def delete_queryset(self, request: HttpRequest, queryset) -> None:
        for dataset in queryset:
            dataset_delete(dataset=dataset)

    @admin.display(description="sha256")
    def sha256_prefix(self, obj: Dataset) -> str:
        return obj.sha256[:12]

    @admin.display(description="preview (first 5 rows)")
    def preview(self, obj: Dataset) -> str:
        rows = read_rows(obj.file.path, limit=5)
        if not rows:
            return "-"
        columns = list(rows[0].keys())
        head = format_html_join("", "<th>{}</th>", ((c,) for c in columns))
        body = format_html_join(
            "", "<tr>{}</tr>",
            ((format_html_join("", "<td>{}</td>", ((str(row.get(c, "")),) for c in columns)),) for row in rows),
        )
        return format_html("<table><thead><tr>{}</tr></thead><tbody>{}</tbody></table>", head, body)
