from __future__ import annotations

from django.conf import settings
from django.db import models


class RunStatus(models.TextChoices):
    PENDING = "pending", "pending"
    TRAINING = "training", "training"
    EVALUATING = "evaluating", "evaluating"
    COMPLETED = "completed", "completed"
    FAILED = "failed", "failed"
    CANCELLED = "cancelled", "cancelled"


TERMINAL_STATUSES = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})
ACTIVE_STATUSES = frozenset({RunStatus.TRAINING, RunStatus.EVALUATING})
# A run that ended like this can be started again (a new run from the same config).
RETRYABLE_STATUSES = frozenset({RunStatus.FAILED, RunStatus.CANCELLED})


class RunKind(models.TextChoices):
    """The kinds' names (the database column's choices). What a kind is and does: runs/kinds/."""

    FINETUNE = "finetune", "finetune"
    EVAL_ONLY = "eval_only", "eval_only"
    SWEEP = "sweep", "sweep"


class JobState(models.TextChoices):
    WAITING = "waiting", "waiting"  # for a child run (a sweep's trial), not for a worker
    QUEUED = "queued", "queued"
    RUNNING = "running", "running"
    DONE = "done", "done"
    FAILED = "failed", "failed"
    CANCELLED = "cancelled", "cancelled"


UNFINISHED_JOB_STATES = frozenset({JobState.WAITING, JobState.QUEUED, JobState.RUNNING})


class Variant(models.TextChoices):
    BASE = "base", "base"
    FINETUNED = "finetuned", "finetuned"
    DATASET = "dataset", "dataset"


# The order variants are shown and scored in, everywhere (tables, charts, CSV, the CLI).
VARIANT_ORDER = (Variant.FINETUNED, Variant.BASE, Variant.DATASET)


def ordered_variants(variants) -> list[str]:
    return sorted(set(variants), key=VARIANT_ORDER.index)


class PipelineRun(models.Model):
    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=10, choices=RunKind.choices, db_index=True)
    # Changed only through runs.services.run_transition (compare-and-swap + RunEvent).
    status = models.CharField(max_length=12, choices=RunStatus.choices, default=RunStatus.PENDING, db_index=True)
    config = models.JSONField(help_text="The validated config (same schema as the YAML files).")
    base_model = models.CharField(max_length=500)
    train_datasets = models.ManyToManyField("datasets_app.Dataset", related_name="train_runs", blank=True)
    eval_datasets = models.ManyToManyField("datasets_app.Dataset", related_name="eval_runs", blank=True)
    progress = models.PositiveSmallIntegerField(default=0)
    stage = models.CharField(max_length=200, blank=True)
    logs = models.TextField(blank=True)
    error = models.TextField(blank=True)
    mlflow_experiment_id = models.CharField(max_length=64, blank=True)
    mlflow_run_id = models.CharField(max_length=64, blank=True)
    registered_model_name = models.CharField(max_length=300, blank=True)
    registered_model_version = models.CharField(max_length=32, blank=True)
    # Reproducibility record: dataset sha256s, seed, library versions, judge, git commit.
    reproducibility = models.JSONField(default=dict, blank=True)
    # Per-step training metrics for the live loss curve: [{"step", "loss", "learning_rate", "epoch"}].
    train_history = models.JSONField(default=list, blank=True)
    # The sweep this run is a trial of (null: a run of its own).
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.CASCADE, related_name="children")
    # The data check of the config (training/data_check.py), made when the run was created.
    data_check = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="runs")

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["owner", "-created_at"])]

    def __str__(self) -> str:
        return f"#{self.pk} {self.name} ({self.status})"

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def is_retryable(self) -> bool:
        return self.status in RETRYABLE_STATUSES

    @property
    def spec(self):
        """What this run's kind is and does (runs/kinds/)."""
        from .kinds import kind_of

        return kind_of(self)

    @property
    def main_variant(self) -> str:
        return self.spec.main_variant(self.config)

    @property
    def shows(self) -> dict[str, bool]:
        """The page sections that apply to this run's kind ({% if run.shows.training %})."""
        return self.spec.shows()

    @property
    def registered_model(self) -> str:
        if not self.registered_model_name:
            return ""
        return f"{self.registered_model_name}/{self.registered_model_version}"


class Job(models.Model):
    """One job of a run's graph (runs/kinds/): a step, and a key when the step has several (a checkpoint, a trial).

    Changed only through runs/services.py: claimed with a compare-and-swap on
    (state, attempts), so a job delivered twice runs once and a lost worker's
    late writes are refused once the reaper has sent the job again.
    """

    run = models.ForeignKey(PipelineRun, on_delete=models.CASCADE, related_name="jobs")
    step = models.CharField(max_length=32)
    key = models.CharField(max_length=64, blank=True, default="")
    queue = models.CharField(max_length=16, blank=True)
    state = models.CharField(max_length=10, choices=JobState.choices, default=JobState.QUEUED, db_index=True)
    # Claims so far: the attempt a worker holds; a write of an older attempt is refused.
    attempts = models.PositiveSmallIntegerField(default=0)
    # The last sign of life of the running attempt; while queued, since when it waits.
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True, help_text="host:pid of the attempt that holds or held it.")
    payload = models.JSONField(default=dict, blank=True, help_text="What the job works on (a checkpoint, a trial's parameters).")
    progress = models.FloatField(default=0.0, help_text="0-1 within the step.")
    stage = models.CharField(max_length=200, blank=True)
    # The step of the last checkpoint a new attempt can resume from (a fine-tune).
    checkpoint_step = models.PositiveIntegerField(null=True, blank=True)
    output = models.JSONField(default=dict, blank=True, help_text="What the job produced, by reference (the adapter's step, a version).")
    # Measured by the step that ran: device, dtype, tokens/s, peak memory, seconds... (never parsed from a log line).
    figures = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    child = models.ForeignKey(PipelineRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="parent_jobs")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["run", "step", "key"], name="unique_job_per_run_step_key")]
        indexes = [models.Index(fields=["state", "heartbeat_at"])]

    def __str__(self) -> str:
        return f"{self.label} of run {self.run_id} ({self.state})"

    @property
    def label(self) -> str:
        return f"{self.step}:{self.key}" if self.key else self.step


class RunEvent(models.Model):
    run = models.ForeignKey(PipelineRun, on_delete=models.CASCADE, related_name="events")
    from_status = models.CharField(max_length=12, choices=RunStatus.choices)
    to_status = models.CharField(max_length=12, choices=RunStatus.choices)
    message = models.TextField(blank=True)
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["at", "id"]

    def __str__(self) -> str:
        return f"{self.from_status} -> {self.to_status}"


class RunResult(models.Model):
    run = models.ForeignKey(PipelineRun, on_delete=models.CASCADE, related_name="results")
    dataset = models.ForeignKey("datasets_app.Dataset", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    variant = models.CharField(max_length=10, choices=Variant.choices)
    metric = models.CharField(max_length=64)
    # Null when nothing could be measured; never an average that hides NaN.
    value = models.FloatField(null=True, blank=True)
    n_scored = models.PositiveIntegerField(default=0)
    n_failed = models.PositiveIntegerField(default=0)
    # Why samples were not measured, e.g. {"timeout": 3, "judge unreachable": 2}.
    failure_reasons = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["dataset_id", "metric", "variant"]
        constraints = [
            models.UniqueConstraint(fields=["run", "dataset", "variant", "metric"], name="unique_result_per_run_dataset_variant_metric"),
        ]

    def __str__(self) -> str:
        return f"{self.metric}[{self.variant}] = {self.value}"


class SampleResult(models.Model):
    run = models.ForeignKey(PipelineRun, on_delete=models.CASCADE, related_name="samples")
    dataset = models.ForeignKey("datasets_app.Dataset", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    variant = models.CharField(max_length=10, choices=Variant.choices)
    index = models.PositiveIntegerField(help_text="Row index in the eval dataset.")
    question = models.TextField()
    contexts = models.JSONField(default=list)
    ground_truth = models.TextField(blank=True)
    answer = models.TextField(blank=True)
    cut_off = models.BooleanField(
        null=True, blank=True,
        help_text="The answer used all evaluation.max_new_tokens without reaching a stop token, so it may end mid-sentence; "
                  "null where not recorded (answers from the dataset, runs from before).",
    )
    # {metric: value or null}; reasons holds {metric: why} for every null.
    scores = models.JSONField(default=dict)
    reasons = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["dataset_id", "index", "variant"]
        constraints = [
            models.UniqueConstraint(fields=["run", "dataset", "variant", "index"], name="unique_sample_per_run_dataset_variant_index"),
        ]

    def __str__(self) -> str:
        return f"sample {self.index} [{self.variant}]"


class Verdict(models.TextChoices):
    BETTER = "better", "better"
    WORSE = "worse", "worse"
    NO_DIFFERENCE = "no significant difference", "no significant difference"
    TOO_FEW_PAIRS = "too few pairs", "too few pairs"


class ScoreComparison(models.Model):
    """Fine-tuned vs base on the same samples of one eval dataset, for one metric (evaluation/significance.py)."""

    run = models.ForeignKey(PipelineRun, on_delete=models.CASCADE, related_name="comparisons")
    dataset = models.ForeignKey("datasets_app.Dataset", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    metric = models.CharField(max_length=64)
    n_pairs = models.PositiveIntegerField(help_text="Samples measured for both variants.")
    n_excluded = models.PositiveIntegerField(default=0, help_text="Samples left out: a variant not measured.")
    base_mean = models.FloatField(null=True, blank=True)
    finetuned_mean = models.FloatField(null=True, blank=True)
    delta = models.FloatField(null=True, blank=True, help_text="Mean paired difference, fine-tuned - base.")
    ci_low = models.FloatField(null=True, blank=True)
    ci_high = models.FloatField(null=True, blank=True)
    p_value = models.FloatField(null=True, blank=True)
    p_adjusted = models.FloatField(null=True, blank=True, help_text="Holm, across the metrics of this dataset.")
    verdict = models.CharField(max_length=32, choices=Verdict.choices)
    method = models.JSONField(default=dict, blank=True, help_text="How: interval, test, resamples, seed, confidence.")

    class Meta:
        ordering = ["dataset_id", "metric"]
        constraints = [models.UniqueConstraint(fields=["run", "dataset", "metric"], name="unique_comparison_per_run_dataset_metric")]

    def __str__(self) -> str:
        return f"{self.metric}: {self.delta} [{self.ci_low}, {self.ci_high}] {self.verdict}"


class PromotionDecision(models.Model):
    """A decision about a registered model version: the automatic gate, or staff by hand."""

    class Decision(models.TextChoices):
        PROMOTED = "promoted", "promoted"
        REJECTED = "rejected", "rejected"
        DEMOTED = "demoted", "demoted"

    run = models.ForeignKey(PipelineRun, on_delete=models.CASCADE, related_name="promotion_decisions")
    model_name = models.CharField(max_length=300)
    model_version = models.CharField(max_length=32)
    decision = models.CharField(max_length=10, choices=Decision.choices)
    alias = models.CharField(max_length=64, blank=True, help_text="The alias the version holds after the decision.")
    reason = models.TextField()
    automatic = models.BooleanField(default=True)
    by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    at = models.DateTimeField(auto_now_add=True)
    # When MLflow got the decision's alias and version tags: recorded first, applied after commit (null: not yet).
    applied_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["at", "id"]

    def __str__(self) -> str:
        return f"{self.model_name}/{self.model_version}: {self.decision}"


class ModelExport(models.Model):
    """An export of a completed fine-tune's model (runs/export.py): the merged weights, a GGUF, and the check of each form.

    Written once, by the export job that made it (in the transaction that finishes
    the job); the job row says whether an export is queued, running or failed.
    """

    run = models.ForeignKey(PipelineRun, on_delete=models.CASCADE, related_name="model_exports")
    job = models.OneToOneField(Job, null=True, blank=True, on_delete=models.SET_NULL, related_name="model_export")
    label = models.CharField(max_length=100, help_text="The job that made it (export:2).")
    merged = models.BooleanField(help_text="The merged Transformers folder was asked for (kept, registered, downloadable).")
    gguf = models.CharField(max_length=8, blank=True, help_text="The GGUF type asked for (f16, q8_0), or blank.")
    margin = models.FloatField(help_text="The equivalence margin of the check (a metric difference within it counts as none).")
    folder = models.CharField(max_length=1000, help_text="Where the worker wrote the files (under the run's directory).")
    merged_dtype = models.CharField(max_length=16, blank=True)
    merged_bytes = models.BigIntegerField(null=True, blank=True)
    archive_sha256 = models.CharField(max_length=64, blank=True, help_text="sha256 of the merged folder's download (a tar).")
    archive_bytes = models.BigIntegerField(null=True, blank=True)
    gguf_file = models.CharField(max_length=200, blank=True)
    gguf_sha256 = models.CharField(max_length=64, blank=True)
    gguf_bytes = models.BigIntegerField(null=True, blank=True)
    gguf_message = models.TextField(blank=True, help_text="Why no GGUF was written (an architecture without a GGUF writer).")
    registered_model_name = models.CharField(max_length=300, blank=True)
    registered_model_version = models.CharField(max_length=32, blank=True)
    mlflow_model_uri = models.CharField(max_length=500, blank=True, help_text="The logged transformers model (models:/<id>).")
    verdict = models.CharField(max_length=16, blank=True, help_text="The check's verdict over every form.")
    figures = models.JSONField(default=dict, blank=True, help_text="Seconds of each part, sizes, tensor types.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.label} of run {self.run_id}"

    @property
    def registered_model(self) -> str:
        return f"{self.registered_model_name}/{self.registered_model_version}" if self.registered_model_name else ""


class ExportCheck(models.Model):
    """One exported form (merged, or GGUF) asked the eval questions again: agreement with the adapter, and TOST per metric."""

    export = models.ForeignKey(ModelExport, on_delete=models.CASCADE, related_name="checks")
    form = models.CharField(max_length=8, help_text="merged or gguf")
    label = models.CharField(max_length=64, help_text="merged (float32), GGUF q8_0")
    rows = models.PositiveIntegerField()
    identical = models.PositiveIntegerField(help_text="Rows whose greedy answer is the adapter's, to the character.")
    verdict = models.CharField(max_length=16)
    # [{"dataset", "metric", "n_pairs", "n_excluded", "adapter_mean", "export_mean", "delta", "ci_low", "ci_high",
    #   "p_value", "margin", "verdict", "method"}]
    comparisons = models.JSONField(default=list)
    # [{"dataset", "index", "answer", "scores"}]: every row's answer from this form, in row order.
    answers = models.JSONField(default=list)
    seconds = models.FloatField(null=True, blank=True)
    device = models.CharField(max_length=32, blank=True)

    class Meta:
        ordering = ["export_id", "id"]
        constraints = [models.UniqueConstraint(fields=["export", "form"], name="unique_check_per_export_form")]

    def __str__(self) -> str:
        return f"{self.label}: {self.identical}/{self.rows} identical, {self.verdict}"

    @property
    def identical_share(self) -> float | None:
        return self.identical / self.rows if self.rows else None
