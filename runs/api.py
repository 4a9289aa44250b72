"""The runs API (docs/ARCHITECTURE.md, "Contracts"). Views parse input, call a service, serialize output."""

from __future__ import annotations

from django.db.models import Prefetch, QuerySet
from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import generics, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from .api_schema import RunConfigInputSerializer, config_request_examples
from .exports import results_csv
from .models import Job, ModelExport, PipelineRun, PromotionDecision, RunResult, RunStatus, SampleResult, ScoreComparison, Variant
from .playground import MAX_CONTEXT_CHARS, MAX_CONTEXTS, MAX_NEW_TOKENS_CAP, MAX_QUESTION_CHARS, MAX_TEMPERATURE
from .selectors import run_visible_to
from .services import (
    run_append_logs,
    run_cancel,
    run_create,
    run_record_results,
    run_transition_or_raise,
)


class ResultOutputSerializer(serializers.ModelSerializer):
    dataset = serializers.CharField(source="dataset.name", default=None, allow_null=True)

    class Meta:
        model = RunResult
        fields = ["metric", "value", "dataset", "variant", "n_scored", "n_failed", "failure_reasons"]


class RunListSerializer(serializers.ModelSerializer):
    registered_model = serializers.CharField(read_only=True)

    class Meta:
        model = PipelineRun
        fields = [
            "id", "name", "kind", "status", "stage", "progress", "base_model", "error",
            "mlflow_run_id", "registered_model", "created_at", "started_at", "finished_at", "parent",
        ]


class JobOutputSerializer(serializers.ModelSerializer):
    """One job of the run's graph: its step (and key), queue, state, attempts, worker, timing and what it measured."""

    child = serializers.PrimaryKeyRelatedField(read_only=True, allow_null=True, help_text="The child run this job waits for (a sweep's trial).")

    class Meta:
        model = Job
        fields = ["id", "step", "key", "queue", "state", "attempts", "worker", "progress", "stage", "heartbeat_at", "checkpoint_step",
                  "output", "figures", "error", "child", "created_at", "started_at", "finished_at"]


class ComparisonOutputSerializer(serializers.ModelSerializer):
    dataset = serializers.CharField(source="dataset.name", default=None, allow_null=True)
    min_detectable_difference = serializers.SerializerMethodField()
    power_note = serializers.SerializerMethodField()

    class Meta:
        model = ScoreComparison
        fields = ["dataset", "metric", "n_pairs", "n_excluded", "base_mean", "finetuned_mean", "delta", "ci_low", "ci_high",
                  "p_value", "p_adjusted", "verdict", "min_detectable_difference", "power_note", "method"]

    @extend_schema_field(serializers.FloatField(allow_null=True))
    def get_min_detectable_difference(self, comparison: ScoreComparison) -> float | None:
        """The smallest mean paired difference this comparison's pairs detect 80% of the time at 5% significance
        (statsmodels' paired t-test power, from the spread of its per-row differences)."""
        return ((comparison.method or {}).get("power") or {}).get("mdd")

    def get_power_note(self, comparison: ScoreComparison) -> str:
        """"with 50 pairs this test detects ±0.031 or more 80% of the time" (empty when not measured)."""
        from evaluation.power import describe

        return describe((comparison.method or {}).get("power"))


class PromotionOutputSerializer(serializers.ModelSerializer):
    by = serializers.SerializerMethodField()

    class Meta:
        model = PromotionDecision
        fields = ["decision", "reason", "alias", "by", "at", "automatic", "model_name", "model_version"]

    def get_by(self, decision: PromotionDecision) -> str:
        return decision.by.get_username() if decision.by else "gate"


class RunDetailSerializer(RunListSerializer):
    results = ResultOutputSerializer(many=True, read_only=True)
    comparisons = ComparisonOutputSerializer(many=True, read_only=True)
    promotion = serializers.SerializerMethodField()
    owner = serializers.CharField(source="owner.username", read_only=True)
    jobs = JobOutputSerializer(many=True, read_only=True)
    children = serializers.SerializerMethodField()
    heartbeat_at = serializers.SerializerMethodField()
    attempts = serializers.SerializerMethodField()
    checkpoint_step = serializers.SerializerMethodField()
    best_step = serializers.SerializerMethodField()
    selection = serializers.SerializerMethodField()
    sweep = serializers.SerializerMethodField()
    exports = serializers.SerializerMethodField()

    class Meta(RunListSerializer.Meta):
        fields = [
            *RunListSerializer.Meta.fields, "config", "logs", "mlflow_experiment_id",
            "registered_model_name", "registered_model_version", "reproducibility", "heartbeat_at", "owner", "results",
            "comparisons", "promotion", "attempts", "checkpoint_step", "best_step", "data_check", "jobs", "children", "selection", "sweep", "exports",
        ]

    @extend_schema_field(serializers.JSONField(allow_null=True))
    def get_sweep(self, run: PipelineRun) -> dict | None:
        """A sweep's trials ({"trial", "child", "params", "status", "score": {"mean", "ci_low", "ci_high", "n", "step"}, "seconds"}),
        the winner and why; with `?verdicts=1`, every trial's eval verdict Holm-adjusted across the trials. Null for other kinds."""
        if not run.shows.get("sweep"):
            return None
        from .sweeps import sweep_summary, trial_verdicts

        summary = sweep_summary(run)
        request = self.context.get("request")
        if summary is not None and request is not None and request.query_params.get("verdicts") in ("1", "true"):
            summary["trial_verdicts"] = trial_verdicts(run)
        return summary

    @extend_schema_field(serializers.JSONField(allow_null=True))
    def get_selection(self, run: PipelineRun) -> dict | None:
        """Checkpoint selection (config `selection`): {"metric", "every", "points": [{"step", "state", "mean", "ci_low", "ci_high",
        "n", "n_failed", "loss"}], "chosen_step", "reason", "pending"}; null without selection."""
        from .page_data import selection_summary

        return selection_summary(run)

    @extend_schema_field(serializers.ListField(child=serializers.IntegerField()))
    def get_children(self, run: PipelineRun) -> list[int]:
        """The child runs (a sweep's trials), oldest first."""
        return sorted(child.pk for child in run.children.all())

    @extend_schema_field(serializers.DateTimeField(allow_null=True))
    def get_heartbeat_at(self, run: PipelineRun):
        """The latest sign of life of any of the run's jobs."""
        beats = [j.heartbeat_at for j in run.jobs.all() if j.heartbeat_at is not None]
        return serializers.DateTimeField().to_representation(max(beats)) if beats else None

    @extend_schema_field(serializers.IntegerField(allow_null=True))
    def get_attempts(self, run: PipelineRun) -> int | None:
        """Attempts of the run's most retried job (a fine-tune resumed after a lost worker: 2); null before any started."""
        return max((j.attempts for j in run.jobs.all()), default=0) or None

    @extend_schema_field(serializers.IntegerField(allow_null=True))
    def get_checkpoint_step(self, run: PipelineRun) -> int | None:
        """The step of the last checkpoint a resumed fine-tune can start from."""
        return max((j.checkpoint_step for j in run.jobs.all() if j.checkpoint_step is not None), default=None)

    @extend_schema_field(serializers.IntegerField(allow_null=True))
    def get_best_step(self, run: PipelineRun) -> int | None:
        """The step whose adapter the fine-tune kept (null: the last step's, or not a fine-tune)."""
        return next(((j.output or {}).get("best_step") for j in run.jobs.all() if "best_step" in (j.output or {})), None)

    @extend_schema_field(serializers.ListField(child=serializers.DictField()))
    def get_exports(self, run: PipelineRun) -> list[dict]:
        """The run's model exports (runs/export.py): files, sha256s, the registered `.merged` version, and each form's check."""
        from .export_views import ModelExportOutputSerializer

        return ModelExportOutputSerializer(run.model_exports.all(), many=True).data

    @extend_schema_field(PromotionOutputSerializer(allow_null=True))
    def get_promotion(self, run: PipelineRun) -> dict | None:
        """The latest decision about the run's registered version (prefetched, newest last)."""
        decisions = list(run.promotion_decisions.all())
        return PromotionOutputSerializer(decisions[-1]).data if decisions else None


# Large JSON/text columns a list row never shows: with a long history, reading and
# decoding them for every row of a page was most of the list's time (bench/README.md).
LIST_DEFERRED_FIELDS = ("config", "logs", "train_history", "reproducibility")


def _detail_queryset(user) -> QuerySet[PipelineRun]:
    # train_history (the loss curve, one entry per step) is not part of the detail either.
    return run_visible_to(user).defer("train_history").select_related("owner").prefetch_related(
        Prefetch("results", queryset=RunResult.objects.select_related("dataset")),
        Prefetch("comparisons", queryset=ScoreComparison.objects.select_related("dataset")),
        Prefetch("promotion_decisions", queryset=PromotionDecision.objects.select_related("by").order_by("at", "id")),
        Prefetch("jobs", queryset=Job.objects.order_by("id")),
        Prefetch("children", queryset=PipelineRun.objects.only("pk", "parent_id")),
        Prefetch("model_exports", queryset=ModelExport.objects.prefetch_related("checks").order_by("created_at", "id")),
    )


class RunListCreateApi(generics.ListAPIView):
    serializer_class = RunListSerializer

    def get_queryset(self) -> QuerySet[PipelineRun]:
        qs = run_visible_to(self.request.user).defer(*LIST_DEFERRED_FIELDS)
        wanted = self.request.query_params.get("status")
        if wanted:
            qs = qs.filter(status__in=wanted.split(","))
        return qs

    @extend_schema(parameters=[OpenApiParameter("status", OpenApiTypes.STR, description="one status, or several comma-separated")])
    def get(self, request: Request, *args, **kwargs) -> Response:
        wanted = request.query_params.get("status")
        if wanted:
            unknown = [s for s in wanted.split(",") if s not in RunStatus.values]
            if unknown:
                message = f"unknown status {', '.join(unknown)}; one of {', '.join(RunStatus.values)}"
                return Response({"detail": f"status: {message}", "errors": [{"field": "status", "message": message}]}, status=400)
        return super().get(request, *args, **kwargs)

    @extend_schema(
        request=RunConfigInputSerializer,
        examples=config_request_examples(),
        responses={201: RunDetailSerializer},
        description="Create a run from a config (the YAML schema as JSON, the `RunConfig` schema below: every field "
                    "with its type, range and default). Stored as `pending` and queued.",
    )
    def post(self, request: Request) -> Response:
        run = run_create(config=request.data, owner=request.user)
        return Response(RunDetailSerializer(_detail_queryset(request.user).get(pk=run.pk)).data, status=status.HTTP_201_CREATED)


class RunCheckApi(APIView):
    @extend_schema(
        request=RunConfigInputSerializer,
        examples=config_request_examples(),
        responses={200: OpenApiTypes.OBJECT, 400: OpenApiTypes.OBJECT, 503: OpenApiTypes.OBJECT},
        description="Check a config's data before creating a run (training/data_check.py): token lengths of prompt and answer "
                    "under the base model's tokenizer and prompt format, rows `max_seq_length` would cut (refused above "
                    "`training.max_truncated_fraction`), train questions that duplicate an eval question (refused unless "
                    "`evaluation.allow_overlap`), duplicates, empty answers, and the steps and training time the config implies; "
                    "`run_estimate`: the whole run's time on this machine, stage by stage, each at a pace an earlier job measured "
                    "here (`seconds` null, and `missing` naming the stages, until one has). "
                    "`problems` lists what refuses the config (each with its field); `ok` is true when there is none. The same "
                    "check runs again, and is stored with the run (`data_check`), when a fine-tune starts. 400: the config is "
                    "invalid (as for POST /api/runs/), or its base model or a dataset could not be read (`errors` names the field); "
                    "503: in served mode no cpu worker answered in time.",
    )
    def post(self, request: Request) -> Response:
        from .data_check import DataCheckFailed, DataCheckUnavailable, check_config

        try:
            return Response(check_config(request.data, owner=request.user))
        except DataCheckFailed as exc:  # the base model or a dataset would not load: the config's problem
            return Response({"detail": str(exc), "errors": [{"field": exc.field, "message": exc.message}]}, status=status.HTTP_400_BAD_REQUEST)
        except DataCheckUnavailable as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_503_SERVICE_UNAVAILABLE)


class RunDetailApi(generics.RetrieveDestroyAPIView):
    serializer_class = RunDetailSerializer

    @extend_schema(parameters=[OpenApiParameter("verdicts", OpenApiTypes.BOOL, description="a sweep: add every trial's eval verdict, "
                                                "Holm-adjusted across the trials")])
    def get(self, request: Request, *args, **kwargs) -> Response:
        return super().get(request, *args, **kwargs)

    def get_queryset(self) -> QuerySet[PipelineRun]:
        return _detail_queryset(self.request.user)

    @extend_schema(
        responses={204: None, 403: OpenApiTypes.OBJECT, 409: OpenApiTypes.OBJECT},
        description="Delete a finished run (its owner, or staff): its rows, files and checkpoints, its MLflow run and the "
                    "registered versions made from it. 409 while the run is active (cancel it first) or when its version "
                    "holds the `champion` alias (demote it first); the message says which.",
    )
    def delete(self, request: Request, pk: int) -> Response:
        from .deletion import run_delete

        run = get_object_or_404(run_visible_to(request.user), pk=pk)
        run_delete(run_id=run.pk, by=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class _RunActionApi(APIView):
    def get_run(self, request: Request, pk: int) -> PipelineRun:
        return get_object_or_404(run_visible_to(request.user), pk=pk)

    def detail(self, request: Request, pk: int, code: int = 200) -> Response:
        return Response(RunDetailSerializer(_detail_queryset(request.user).get(pk=pk)).data, status=code)


class StatusInputSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=RunStatus.choices)
    message = serializers.CharField(required=False, allow_blank=True, max_length=2000, default="")


class RunStatusApi(_RunActionApi):
    @extend_schema(request=StatusInputSerializer, responses={200: RunDetailSerializer, 409: OpenApiTypes.OBJECT})
    def patch(self, request: Request, pk: int) -> Response:
        run = self.get_run(request, pk)
        data = StatusInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        run_transition_or_raise(run_id=run.pk, to=data.validated_data["status"], message=data.validated_data["message"])
        return self.detail(request, pk)


class LogsInputSerializer(serializers.Serializer):
    logs = serializers.CharField(allow_blank=False, max_length=1_000_000, trim_whitespace=False)


class RunLogsApi(_RunActionApi):
    @extend_schema(request=LogsInputSerializer, responses={200: RunDetailSerializer})
    def patch(self, request: Request, pk: int) -> Response:
        run = self.get_run(request, pk)
        data = LogsInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        run_append_logs(run_id=run.pk, text=data.validated_data["logs"])
        return self.detail(request, pk)


class ResultInputSerializer(serializers.Serializer):
    metric = serializers.RegexField(r"^[a-z][a-z0-9_]{0,63}$", error_messages={"invalid": "must be a metric name (lowercase letters, digits, _)"})
    value = serializers.FloatField(allow_null=True)
    dataset = serializers.CharField(required=False, max_length=100)
    variant = serializers.ChoiceField(choices=Variant.choices, required=False)
    n_scored = serializers.IntegerField(required=False, min_value=0, default=0)
    n_failed = serializers.IntegerField(required=False, min_value=0, default=0)


class ResultsInputSerializer(serializers.Serializer):
    results = ResultInputSerializer(many=True, allow_empty=False, max_length=1000)


class RunResultsApi(_RunActionApi):
    @extend_schema(request=ResultsInputSerializer, responses={201: RunDetailSerializer})
    def post(self, request: Request, pk: int) -> Response:
        run = self.get_run(request, pk)
        data = ResultsInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        eval_datasets = {d.name: d.pk for d in run.eval_datasets.all()}
        first_eval = next(iter(eval_datasets.values()), None)
        items, errors = [], []
        for position, item in enumerate(data.validated_data["results"]):
            name = item.get("dataset")
            if name is not None and name not in eval_datasets:
                errors.append({"field": f"results[{position}].dataset", "message": f"{name!r} is not an eval dataset of this run"})
                continue
            items.append({
                "metric": item["metric"],
                "value": item["value"],
                "dataset_id": eval_datasets[name] if name else first_eval,
                "variant": item.get("variant") or run.main_variant,
                "n_scored": item["n_scored"] or (1 if item["value"] is not None else 0),
                "n_failed": item["n_failed"],
            })
        if errors:
            return Response({"detail": "; ".join(f"{e['field']}: {e['message']}" for e in errors), "errors": errors}, status=400)
        run_record_results(run_id=run.pk, results=items)
        return self.detail(request, pk, code=status.HTTP_201_CREATED)


class RunCancelApi(_RunActionApi):
    @extend_schema(request=None, responses={200: RunDetailSerializer, 409: OpenApiTypes.OBJECT})
    def post(self, request: Request, pk: int) -> Response:
        run = self.get_run(request, pk)
        run_cancel(run_id=run.pk, message=f"cancelled by {request.user.get_username()}")
        return self.detail(request, pk)


class SampleOutputSerializer(serializers.ModelSerializer):
    dataset = serializers.CharField(source="dataset.name", default=None, allow_null=True)
    cut_off = serializers.BooleanField(
        allow_null=True, read_only=True,
        help_text="The answer used all evaluation.max_new_tokens without reaching a stop token: it may end mid-sentence "
                  "(as base_cut_off/finetuned_cut_off in the playground). null where not recorded: answers from the dataset, runs from before.",
    )

    class Meta:
        model = SampleResult
        fields = ["index", "variant", "dataset", "question", "contexts", "ground_truth", "answer", "cut_off", "scores", "reasons"]


class RunSamplesApi(generics.ListAPIView):
    serializer_class = SampleOutputSerializer

    def get_queryset(self) -> QuerySet[SampleResult]:
        run = get_object_or_404(run_visible_to(self.request.user), pk=self.kwargs["pk"])
        qs = SampleResult.objects.filter(run=run).select_related("dataset").order_by("dataset_id", "index", "variant")
        variant = self.request.query_params.get("variant")
        if variant:
            qs = qs.filter(variant=variant)
        return qs


class RunExportCsvApi(_RunActionApi):
    @extend_schema(responses={(200, "text/csv"): OpenApiTypes.STR})
    def get(self, request: Request, pk: int) -> HttpResponse:
        run = self.get_run(request, pk)
        response = HttpResponse(results_csv(run), content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="run-{run.pk}-results.csv"'
        return response


class RunRetryApi(_RunActionApi):
    @extend_schema(
        request=None, responses={201: RunDetailSerializer, 409: OpenApiTypes.OBJECT},
        description="Start a failed or cancelled run again: a new `pending` run from the same config, named \"<name> (retry of #<id>)\".",
    )
    def post(self, request: Request, pk: int) -> Response:
        from .services import run_retry  # kept local: this view was appended to the module

        run = self.get_run(request, pk)
        retry = run_retry(run_id=run.pk, owner=request.user)
        return self.detail(request, retry.pk, code=status.HTTP_201_CREATED)


class PromotionInputSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=2000)


class _RunPromotionApi(_RunActionApi):
    """Staff move the `champion` alias by hand; the decision is recorded with who and why."""

    apply = staticmethod(lambda *, run, user, reason: None)

    @extend_schema(request=PromotionInputSerializer, responses={200: RunDetailSerializer, 403: OpenApiTypes.OBJECT, 409: OpenApiTypes.OBJECT})
    def post(self, request: Request, pk: int) -> Response:
        from .promotion import PromotionRefused

        if not request.user.is_staff:
            return Response({"detail": "only staff can promote or demote a model version"}, status=403)
        run = self.get_run(request, pk)
        data = PromotionInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            self.apply(run=run, user=request.user, reason=data.validated_data["reason"])
        except PromotionRefused as exc:
            return Response({"detail": str(exc)}, status=409)
        return self.detail(request, pk)


class RunPromoteApi(_RunPromotionApi):
    @staticmethod
    def apply(*, run, user, reason):
        from .promotion import promote_by_hand

        promote_by_hand(run=run, user=user, reason=reason)


class RunDemoteApi(_RunPromotionApi):
    @staticmethod
    def apply(*, run, user, reason):
        from .promotion import demote_by_hand

        demote_by_hand(run=run, user=user, reason=reason)


class GenerateInputSerializer(serializers.Serializer):
    """A question, and how to decode it: the run's own decoding (greedy, its max_new_tokens) by default."""

    question = serializers.CharField(max_length=MAX_QUESTION_CHARS, trim_whitespace=True)
    contexts = serializers.ListField(
        child=serializers.CharField(max_length=MAX_CONTEXT_CHARS, allow_blank=False), max_length=MAX_CONTEXTS, default=list,
    )
    temperature = serializers.FloatField(
        min_value=0.0, max_value=MAX_TEMPERATURE, default=0.0, help_text="0: greedy (the default, as the run's evaluation); above 0: sampled.",
    )
    top_p = serializers.FloatField(
        min_value=0.0, max_value=1.0, default=1.0, help_text="Nucleus sampling: above 0, at most 1 (used only when temperature > 0).",
    )
    max_new_tokens = serializers.IntegerField(
        min_value=1, max_value=MAX_NEW_TOKENS_CAP, required=False, allow_null=True, default=None,
        help_text="Null: the run's evaluation.max_new_tokens. At most the run's training.max_seq_length less 16 (the prompt's room).",
    )

    def validate(self, attrs: dict) -> dict:
        from .playground import sampling_errors

        errors = sampling_errors(self.context["run"], temperature=attrs["temperature"], top_p=attrs["top_p"], max_new_tokens=attrs.get("max_new_tokens"))
        if errors:
            raise serializers.ValidationError({field: [message] for field, message in errors.items()})
        return attrs


class DecodingSerializer(serializers.Serializer):
    temperature = serializers.FloatField()
    top_p = serializers.FloatField()
    max_new_tokens = serializers.IntegerField()


class GenerateOutputSerializer(serializers.Serializer):
    base = serializers.CharField(help_text="The base model's answer (the run's adapter disabled).")
    finetuned = serializers.CharField(help_text="The fine-tuned model's answer.")
    prompt = serializers.CharField(help_text="Exactly what both models were asked (the run's prompt format, context cut to its budget).")
    base_cut_off = serializers.BooleanField(help_text="The base answer used all max_new_tokens without reaching a stop token: it may end mid-sentence.")
    finetuned_cut_off = serializers.BooleanField(help_text="The same for the fine-tuned answer.")
    decoding = DecodingSerializer(help_text="The decoding both answers used.")


class GenerateQueuedSerializer(serializers.Serializer):
    job_id = serializers.CharField()
    status = serializers.CharField(help_text="queued (waiting for a gpu worker) or started (generating).")
    poll = serializers.CharField(help_text="GET this URL until it answers 200.")
    gpu_workers = serializers.IntegerField(allow_null=True, help_text="Live gpu workers when the job was sent or polled.")
    message = serializers.CharField(allow_blank=True, help_text="Why the answer may not come soon (no gpu worker is live), or empty.")


class GenerateJobOutputSerializer(serializers.Serializer):
    status = serializers.CharField(help_text="finished (the answers are here) or failed (error says why).")
    base = serializers.CharField(required=False)
    finetuned = serializers.CharField(required=False)
    prompt = serializers.CharField(required=False)
    base_cut_off = serializers.BooleanField(required=False)
    finetuned_cut_off = serializers.BooleanField(required=False)
    decoding = DecodingSerializer(required=False)
    error = serializers.CharField(required=False, help_text="Why the generation failed (status failed).")


def _queued_body(request: Request, run: PipelineRun, job_id: str, status_name: str) -> dict:
    from .playground import live_gpu_workers, no_worker_message

    workers = live_gpu_workers()
    from django.urls import reverse

    poll = request.build_absolute_uri(reverse("api-run-generate-job", kwargs={"pk": run.pk, "job_id": job_id}))
    return {"job_id": job_id, "status": status_name, "poll": poll,
            "gpu_workers": workers, "message": no_worker_message(workers)}


class RunGenerateApi(_RunActionApi):
    @extend_schema(
        request=GenerateInputSerializer,
        responses={200: GenerateOutputSerializer, 202: GenerateQueuedSerializer, 409: OpenApiTypes.OBJECT, 503: OpenApiTypes.OBJECT},
        description="Ask a completed fine-tune a question with its contexts: the base and fine-tuned answers, generated with the "
                    "run's prompt format and generation settings; greedy with the run's max_new_tokens unless `temperature`, "
                    "`top_p` or `max_new_tokens` say otherwise. Each answer says whether the token limit cut it off. Embedded "
                    "default: 200 with the answers. Served mode: 202 with a job on the gpu queue; poll "
                    "`GET /api/runs/{id}/generate/{job_id}/`. 409 for a run that is not a completed fine-tune or whose "
                    "fine-tuned adapter cannot be found; 503 when the gpu queue cannot be reached.",
    )
    def post(self, request: Request, pk: int) -> Response:
        from redis.exceptions import RedisError

        from .playground import PlaygroundUnavailable, Sampling, jobs_inline, playground_answer, playground_check, playground_enqueue

        run = self.get_run(request, pk)
        data = GenerateInputSerializer(data=request.data, context={"run": run})
        data.is_valid(raise_exception=True)
        question, contexts = data.validated_data["question"], list(data.validated_data["contexts"])
        sampling = Sampling(
            temperature=data.validated_data["temperature"], top_p=data.validated_data["top_p"],
            max_new_tokens=data.validated_data.get("max_new_tokens"),
        )
        try:
            playground_check(run)
            if jobs_inline():
                return Response(playground_answer(run=run, question=question, contexts=contexts, sampling=sampling))
            job_id = playground_enqueue(run=run, question=question, contexts=contexts, sampling=sampling)
        except PlaygroundUnavailable as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        except RedisError as exc:
            return Response({"detail": f"the gpu queue cannot be reached ({type(exc).__name__})"}, status=status.HTTP_503_SERVICE_UNAVAILABLE)
        return Response(_queued_body(request, run, job_id, "queued"), status=status.HTTP_202_ACCEPTED)


class RunGenerateJobApi(_RunActionApi):
    @extend_schema(
        responses={200: GenerateJobOutputSerializer, 202: GenerateQueuedSerializer, 404: OpenApiTypes.OBJECT, 503: OpenApiTypes.OBJECT},
        description="A playground job of the run: 202 while it waits or works, 200 with the answers (or why it failed) once it ended.",
    )
    def get(self, request: Request, pk: int, job_id: str) -> Response:
        from redis.exceptions import RedisError

        from .playground import JobNotFound, playground_job_state

        run = self.get_run(request, pk)
        try:
            state = playground_job_state(run=run, job_id=job_id)
        except JobNotFound:
            return Response({"detail": f"no playground job {job_id} for run {run.pk} (or its answer has expired)"}, status=404)
        except RedisError as exc:
            return Response({"detail": f"the gpu queue cannot be reached ({type(exc).__name__})"}, status=status.HTTP_503_SERVICE_UNAVAILABLE)
        if state.status == "finished":
            return Response({"status": "finished", **(state.answers or {})})
        if state.status == "failed":
            return Response({"status": "failed", "error": state.error})
        return Response(_queued_body(request, run, job_id, state.status), status=status.HTTP_202_ACCEPTED)
