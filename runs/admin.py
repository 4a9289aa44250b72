from __future__ import annotations

import json

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from mlops_site.admin_mixins import ReadOnlyAdminMixin, ServiceAddFormMixin
from mlops_site.limits import StructureLimitError, check_structure
from mlops_site.queues_page import use_queues_page_in_admin

from .config import MAX_CONFIG_BYTES, ConfigError, validate_config
from .models import TERMINAL_STATUSES, Job, PipelineRun, RunEvent, RunResult, SampleResult
from .services import InvalidTransition, RunNotDeletable, dataset_name_types, run_cancel, run_create


class RunEventInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = RunEvent
    extra = 0
    can_delete = False
    readonly_fields = ["from_status", "to_status", "message", "at"]


class JobInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = Job
    extra = 0
    can_delete = False
    fk_name = "run"
    fields = readonly_fields = ["step", "key", "queue", "state", "attempts", "worker", "heartbeat_at", "checkpoint_step",
                                "figures", "error", "child", "started_at", "finished_at"]


class RunResultInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = RunResult
    extra = 0
    can_delete = False
    readonly_fields = ["dataset", "variant", "metric", "value", "n_scored", "n_failed", "failure_reasons"]


class BoundedJSONField(forms.JSONField):
    """JSON whose size and depth are checked before the (recursive) parser sees it, as the API's parser does."""

    def to_python(self, value):
        if isinstance(value, str):
            try:
                check_structure(value, syntax="json", max_bytes=MAX_CONFIG_BYTES, source="config")
            except StructureLimitError as exc:
                raise forms.ValidationError(str(exc)) from None
        return super().to_python(value)

    def prepare_value(self, value):
        # Indented, so that a prefilled config reads like the YAML file it came from.
        if isinstance(value, forms.fields.InvalidJSONInput):
            return value
        return json.dumps(value, ensure_ascii=False, indent=2, cls=self.encoder)


class RunCreateForm(forms.ModelForm):
    """Admin add form: a config (JSON) validated like the API's, then run_create."""

    config = BoundedJSONField(
        help_text="Same schema as configs/*.yaml, as JSON; starts as configs/finetune_rag_qa.yaml.",
        widget=forms.Textarea(attrs={"rows": 32, "cols": 90, "spellcheck": "false", "class": "vLargeTextField"}),
    )

    class Meta:
        model = PipelineRun
        fields = ["config"]

    def clean_config(self):
        try:
            return validate_config(self.cleaned_data["config"], known_datasets=dataset_name_types(self.request_user))
        except ConfigError as exc:
            raise forms.ValidationError([f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in exc.errors]) from None


@admin.register(PipelineRun)
class PipelineRunAdmin(ServiceAddFormMixin, admin.ModelAdmin):
    add_form = RunCreateForm
    list_display = ["id", "name", "kind", "status", "stage", "progress", "base_model", "owner", "created_at", "finished_at"]
    list_filter = ["status", "kind", "created_at"]
    search_fields = ["name", "base_model", "mlflow_run_id", "owner__username"]
    date_hierarchy = "created_at"
    list_select_related = ["owner"]
    actions = ["cancel_runs"]
    inlines = [RunEventInline, JobInline, RunResultInline]
    readonly_fields = [
        "name", "kind", "status", "stage", "progress", "pretty_config", "base_model", "parent", "train_datasets", "eval_datasets",
        "error", "logs", "mlflow_experiment_id", "mlflow_run_id", "registered_model_name", "registered_model_version",
        "reproducibility", "data_check", "created_at", "started_at", "finished_at", "owner",
    ]
    exclude = ["config", "train_history"]

    def get_exclude(self, request, obj=None):
        return [] if obj is None else self.exclude

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        # An existing run's page is read-only, every field of it (the current job, attempts,
        # checkpoints, the data check are the pipeline's state): its status changes only
        # through the actions, which call the services.
        return obj is None and super().has_change_permission(request)

    def get_changeform_initial_data(self, request: HttpRequest) -> dict:
        """"Add pipeline run" starts from the default fine-tune (configs/finetune_rag_qa.yaml), as the New run page does."""
        from django.conf import settings

        from .config import parse_yaml

        path = settings.BASE_DIR / "configs" / "finetune_rag_qa.yaml"
        try:
            return {"config": parse_yaml(path.read_text(encoding="utf-8"), source=str(path))}
        except (OSError, ConfigError):
            return {}

    def get_inlines(self, request, obj):
        return [] if obj is None else self.inlines

    def save_model(self, request, obj, form, change) -> None:
        if change:
            return  # Every field is read-only: status changes go through the actions.
        created = run_create(config=form.cleaned_data["config"], owner=request.user)
        obj.pk = created.pk
        obj.__dict__.update(PipelineRun.objects.filter(pk=created.pk).values()[0])

    def save_related(self, request, form, formsets, change) -> None:
        if change:
            super().save_related(request, form, formsets, change)

    def delete_model(self, request: HttpRequest, obj: PipelineRun) -> None:
        """Through the one deletion service (files, checkpoints, MLflow run), never a bare database cascade."""
        from .deletion import run_delete

        try:
            run_delete(run_id=obj.pk, by=request.user)
        except RunNotDeletable as exc:
            self.message_user(request, f"Not deleted: {exc}", messages.ERROR)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[PipelineRun]) -> None:
        from .deletion import run_delete

        refused = []
        for run in queryset:
            try:
                run_delete(run_id=run.pk, by=request.user)
            except (RunNotDeletable, PipelineRun.DoesNotExist) as exc:
                refused.append(f"#{run.pk}: {exc}")
        if refused:
            self.message_user(request, "Not deleted: " + "; ".join(refused), messages.ERROR)

    @admin.display(description="config")
    def pretty_config(self, obj: PipelineRun) -> str:
        return format_html("<pre>{}</pre>", json.dumps(obj.config, indent=2))

    @admin.action(description="Cancel selected runs (through the status machine)")
    def cancel_runs(self, request: HttpRequest, queryset: QuerySet[PipelineRun]) -> None:
        cancelled, refused = 0, []
        for run in queryset:
            if run.status in TERMINAL_STATUSES:
                refused.append(f"#{run.pk} is {run.status}")
                continue
            try:
                run_cancel(run_id=run.pk, message=f"cancelled by {request.user.get_username()} (admin)")
                cancelled += 1
            except InvalidTransition as exc:
                refused.append(str(exc))
        if cancelled:
            self.message_user(request, f"Cancelled {cancelled} run(s).", messages.SUCCESS)
        if refused:
            self.message_user(request, "Not cancelled: " + "; ".join(refused), messages.WARNING)


@admin.register(RunEvent)
class RunEventAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["run", "from_status", "to_status", "message", "at"]
    list_filter = ["to_status", "from_status"]
    search_fields = ["run__name", "message"]
    list_select_related = ["run"]



@admin.register(RunResult)
class RunResultAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["run", "dataset", "variant", "metric", "value", "n_scored", "n_failed"]
    list_filter = ["variant", "metric"]
    search_fields = ["run__name", "metric"]
    list_select_related = ["run", "dataset"]



@admin.register(SampleResult)
class SampleResultAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["run", "dataset", "variant", "index", "short_question", "scores"]
    list_filter = ["variant"]
    search_fields = ["run__name", "question", "answer"]
    list_select_related = ["run", "dataset"]


    @admin.display(description="question")
    def short_question(self, obj: SampleResult) -> str:
        return obj.question[:80]


use_queues_page_in_admin(admin.site)
