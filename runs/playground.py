"""The playground of a completed fine-tune: ask a question with contexts, get the base and fine-tuned answers.

The answers come from evaluation/playground.py (`answer_both`), with the run's
prompt format and generation settings, and the run's adapter found as the
generate step finds it (`StepContext.adapter_dir`: the run's folder, or MLflow).
Decoding is the run's (greedy, evaluation.max_new_tokens) unless the user sets
`Sampling`: a temperature above 0 samples within top_p, and max_new_tokens of
their own, bounded so the prompt keeps room in the run's max_seq_length. Each
answer says whether that token limit cut it off.

Embedded default (settings.JOBS_INLINE): generated in this process, at once.
Served mode: an RQ job `playground_job(run_id, question, contexts)` on the gpu
queue, whose return value holds the answers; the page and the API poll it by
its id (`playground-<run>-<random>`, so a job is only read through its own run).
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any

from django import forms
from django.conf import settings

from .models import PipelineRun, RunStatus, SampleResult, Variant

log = logging.getLogger(__name__)

QUEUE = "gpu"
MAX_QUESTION_CHARS = 4000
MAX_CONTEXTS = 20
MAX_CONTEXT_CHARS = 8000
JOB_TIMEOUT_SECONDS = 900
RESULT_TTL_SECONDS = 3600
PREFILL_ROWS = 50
LIMITS = {"question_chars": MAX_QUESTION_CHARS, "contexts": MAX_CONTEXTS, "context_chars": MAX_CONTEXT_CHARS}
MAX_TEMPERATURE = 2.0
# A playground answer holds a server thread (embedded) or a gpu worker while it grows.
MAX_NEW_TOKENS_CAP = 1024
# Tokens the prompt always keeps (training/pyfunc_model.prompt_token_budget's floor).
PROMPT_FLOOR_TOKENS = 16
CONTEXT_SEPARATOR = re.compile(r"\n[ \t]*\n")


class PlaygroundUnavailable(Exception):
    """The run cannot answer: it is not a completed fine-tune, or its model cannot be found."""


@dataclass(frozen=True)
class Sampling:
    """How the playground decodes. The defaults are the run's own: greedy, its evaluation.max_new_tokens."""

    temperature: float = 0.0  # 0: greedy; above 0: sampled at this temperature
    top_p: float = 1.0  # the nucleus sampled from (only when temperature > 0)
    max_new_tokens: int | None = None  # None: the run's evaluation.max_new_tokens

    def as_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens}


def max_new_tokens_limit(run: PipelineRun) -> int:
    """The most new tokens a playground answer of this run may ask for: the prompt keeps room in max_seq_length."""
    window = int((run.config.get("training") or {}).get("max_seq_length", 512))
    return max(1, min(MAX_NEW_TOKENS_CAP, window - PROMPT_FLOOR_TOKENS))


def sampling_errors(run: PipelineRun, *, temperature: float, top_p: float, max_new_tokens: int | None) -> dict[str, str]:
    """{field: what is wrong} for decoding options of this run ({} when they are fine); the form and the API share it."""
    errors: dict[str, str] = {}
    if not 0.0 <= temperature <= MAX_TEMPERATURE:
        errors["temperature"] = f"must be between 0 (greedy) and {MAX_TEMPERATURE:g}, got {temperature:g}"
    if not 0.0 < top_p <= 1.0:
        errors["top_p"] = f"must be above 0 and at most 1, got {top_p:g}"
    limit = max_new_tokens_limit(run)
    if max_new_tokens is not None and not 1 <= max_new_tokens <= limit:
        errors["max_new_tokens"] = (
            f"must be between 1 and {limit} for this run (its training.max_seq_length keeps {PROMPT_FLOOR_TOKENS} tokens "
            f"for the prompt; at most {MAX_NEW_TOKENS_CAP}), got {max_new_tokens}"
        )
    return errors


class JobNotFound(Exception):
    """No such playground job for this run (never sent, another run's, or expired)."""


@dataclass
class JobState:
    status: str  # queued, started, finished, failed
    answers: dict[str, str] | None = None
    error: str = ""


def _local_adapter(run: PipelineRun) -> bool:
    from .step_io import run_dir

    return (run_dir(run.pk) / "adapter" / "adapter_config.json").exists()


def playground_check(run: PipelineRun) -> None:
    if not run.shows.get("playground"):
        raise PlaygroundUnavailable(f"run {run.pk} is {run.kind}: only a fine-tune has a fine-tuned model to ask")
    if run.status != RunStatus.COMPLETED:
        raise PlaygroundUnavailable(f"run {run.pk} is {run.status}: the playground opens once the fine-tune has completed")
    # A completed row without its adapter: results recorded through the API, or a run whose
    # folder was removed and that MLflow never tracked. Nothing to load: say so, not a 500.
    if not run.mlflow_run_id and not _local_adapter(run):
        raise PlaygroundUnavailable(
            f"run {run.pk} has no fine-tuned adapter to ask: none in its folder on this machine and no MLflow run to fetch it "
            "from (its results were recorded without a fine-tune here, or its files were deleted)"
        )


def generation_settings(run: PipelineRun, sampling: Sampling | None = None) -> dict[str, Any]:
    """The run's own prompt format and generation settings (as its generate step used them), with the user's decoding."""
    config = run.config
    evaluation, training = config["evaluation"], config.get("training") or {}
    sampling = sampling or Sampling()
    return {
        "prompt_format": config["model"].get("prompt_format", "auto"),
        "max_new_tokens": sampling.max_new_tokens or evaluation["max_new_tokens"],
        "max_seq_length": training.get("max_seq_length", 512), "batch_size": 1, "precision": training.get("precision", "auto"),
        "temperature": sampling.temperature, "top_p": sampling.top_p,
    }


def _adapter_dir(run: PipelineRun):
    from mlflow.exceptions import MlflowException

    from .step_io import run_adapter_dir

    try:
        return run_adapter_dir(run)
    except (MlflowException, OSError) as exc:
        raise PlaygroundUnavailable(f"run {run.pk}'s adapter cannot be fetched from MLflow run {run.mlflow_run_id}: {exc}") from None


def playground_answer(*, run: PipelineRun, question: str, contexts: list[str], sampling: Sampling | None = None) -> dict[str, Any]:
    """{"base", "finetuned", "prompt", "base_cut_off", "finetuned_cut_off", "decoding"} for one question,
    generated here (the server process, or a gpu worker)."""
    from evaluation.playground import answer_both
    from training.local_models import resolve_model_path

    playground_check(run)
    adapter_dir = _adapter_dir(run)
    settings_used = generation_settings(run, sampling)
    try:
        base_path = resolve_model_path(run.base_model)
    except OSError as exc:
        raise PlaygroundUnavailable(f"run {run.pk}'s base model {run.base_model} cannot be found: {exc}") from None
    [answers] = answer_both(base_path, adapter_dir, [{"question": question, "contexts": contexts}], settings_used)
    answers["decoding"] = {key: settings_used[key] for key in ("temperature", "top_p", "max_new_tokens")}
    return answers


def playground_job(run_id: int, question: str, contexts: list[str], sampling: dict[str, Any] | None = None) -> dict[str, Any]:
    """The gpu queue's job: its return value is the answers."""
    return playground_answer(
        run=PipelineRun.objects.get(pk=run_id), question=question, contexts=contexts, sampling=Sampling(**(sampling or {})),
    )


def _queue():
    import django_rq

    return django_rq.get_queue(QUEUE)


def playground_enqueue(*, run: PipelineRun, question: str, contexts: list[str], sampling: Sampling | None = None) -> str:
    """Send the question to the gpu queue; the job's id. Raises redis.RedisError when Redis is unreachable."""
    playground_check(run)
    job_id = f"playground-{run.pk}-{uuid.uuid4().hex[:16]}"
    _queue().enqueue_call(
        playground_job, args=(run.pk, question, contexts, (sampling or Sampling()).as_dict()), job_id=job_id, timeout=JOB_TIMEOUT_SECONDS,
        result_ttl=RESULT_TTL_SECONDS, failure_ttl=RESULT_TTL_SECONDS,
    )
    return job_id


def playground_job_state(*, run: PipelineRun, job_id: str) -> JobState:
    """Where a playground job of this run is. Raises JobNotFound; redis.RedisError when Redis is unreachable."""
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    if not job_id.startswith(f"playground-{run.pk}-"):
        raise JobNotFound(job_id)
    try:
        job = Job.fetch(job_id, connection=_queue().connection)
    except NoSuchJobError:
        raise JobNotFound(job_id) from None
    state = job.get_status(refresh=True)
    status = str(getattr(state, "value", state))  # JobStatus is a str enum
    if status == "finished":
        return JobState(status="finished", answers=job.return_value())
    if status in ("failed", "stopped", "canceled"):
        lines = [line for line in (job.exc_info or "").strip().splitlines() if line.strip()]
        return JobState(status="failed", error=lines[-1][:500] if lines else f"the job ended {status}")
    return JobState(status="started" if status == "started" else "queued")


def live_gpu_workers() -> int | None:
    """Live workers on the gpu queue (as /healthz counts them), None when Redis cannot be reached."""
    from mlops_site.health import live_workers

    counts = live_workers((QUEUE,))
    return None if counts is None else counts.get(QUEUE, 0)


def no_worker_message(count: int | None) -> str:
    """What to tell a user whose question waits for a gpu worker ("" when one is live)."""
    if count is None:
        return "Redis cannot be reached: the question cannot reach a gpu worker."
    if count == 0:
        return ("No gpu worker is live: the question waits on the gpu queue until one starts "
                "(`python manage.py rqworker gpu`, or the worker service of docker-compose.yml).")
    return ""


def prefill_rows(run: PipelineRun, limit: int = PREFILL_ROWS) -> list[SampleResult]:
    """Eval rows of the run to start from (its fine-tuned samples: question, contexts and the run's answer)."""
    return list(SampleResult.objects.filter(run=run, variant=Variant.FINETUNED).select_related("dataset").order_by("dataset_id", "index")[:limit])


def jobs_inline() -> bool:
    return bool(settings.JOBS_INLINE)


class PlaygroundForm(forms.Form):
    """The page's question: contexts typed one per paragraph (a blank line between two contexts), and how to decode."""

    question = forms.CharField(max_length=MAX_QUESTION_CHARS, strip=True)
    contexts = forms.CharField(required=False, strip=True, widget=forms.Textarea)
    # Blank: the run's own decoding (greedy, its evaluation.max_new_tokens).
    temperature = forms.FloatField(required=False, min_value=0.0, max_value=MAX_TEMPERATURE)
    top_p = forms.FloatField(required=False, max_value=1.0)
    max_new_tokens = forms.IntegerField(required=False, min_value=1)

    def __init__(self, *args, run: PipelineRun, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.run = run

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        wanted = {"temperature": data.get("temperature"), "top_p": data.get("top_p"), "max_new_tokens": data.get("max_new_tokens")}
        errors = sampling_errors(
            self.run, temperature=wanted["temperature"] or 0.0, top_p=1.0 if wanted["top_p"] is None else wanted["top_p"],
            max_new_tokens=wanted["max_new_tokens"],
        )
        for field, message in errors.items():
            if field not in self.errors:
                self.add_error(field, message)
        return data

    @property
    def sampling(self) -> Sampling:
        data = self.cleaned_data
        return Sampling(
            temperature=data.get("temperature") or 0.0, top_p=1.0 if data.get("top_p") is None else data["top_p"],
            max_new_tokens=data.get("max_new_tokens"),
        )

    def clean_contexts(self) -> list[str]:
        contexts = [c.strip() for c in CONTEXT_SEPARATOR.split(self.cleaned_data["contexts"].replace("\r\n", "\n")) if c.strip()]
        if len(contexts) > MAX_CONTEXTS:
            raise forms.ValidationError(f"at most {MAX_CONTEXTS} contexts (got {len(contexts)})")
        long = [n for n, c in enumerate(contexts, 1) if len(c) > MAX_CONTEXT_CHARS]
        if long:
            raise forms.ValidationError(f"context {long[0]} is longer than {MAX_CONTEXT_CHARS} characters")
        return contexts
