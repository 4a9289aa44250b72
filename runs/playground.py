"""The playground of a completed fine-tune: ask a question with contexts, get the base and fine-tuned answers.

The answers come from evaluation/playground.py (`answer_both`), with the run's
prompt format and generation settings, and the run's adapter found as the
generate step finds it (`StepContext.adapter_dir`: the run's folder, or MLflow).

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
CONTEXT_SEPARATOR = re.compile(r"\n[ \t]*\n")


class PlaygroundUnavailable(Exception):
    """The run cannot answer: it is not a completed fine-tune."""


class JobNotFound(Exception):
    """No such playground job for this run (never sent, another run's, or expired)."""


@dataclass
class JobState:
    status: str  # queued, started, finished, failed
    answers: dict[str, str] | None = None
    error: str = ""


def playground_check(run: PipelineRun) -> None:
    if not run.shows.get("playground"):
        raise PlaygroundUnavailable(f"run {run.pk} is {run.kind}: only a fine-tune has a fine-tuned model to ask")
    if run.status != RunStatus.COMPLETED:
        raise PlaygroundUnavailable(f"run {run.pk} is {run.status}: the playground opens once the fine-tune has completed")


def generation_settings(run: PipelineRun) -> dict[str, Any]:
    """The run's own prompt format and generation settings (as its generate step used them)."""
    config = run.config
    evaluation, training = config["evaluation"], config.get("training") or {}
    return {
        "prompt_format": config["model"].get("prompt_format", "auto"), "max_new_tokens": evaluation["max_new_tokens"],
        "max_seq_length": training.get("max_seq_length", 512), "batch_size": 1, "precision": training.get("precision", "auto"),
    }


def playground_answer(*, run: PipelineRun, question: str, contexts: list[str]) -> dict[str, str]:
    """{"base", "finetuned", "prompt"} for one question, generated here (the server process, or a gpu worker)."""
    from evaluation.playground import answer_both
    from training.local_models import resolve_model_path

    from .step_io import run_adapter_dir

    playground_check(run)
    adapter_dir = run_adapter_dir(run)
    [answers] = answer_both(resolve_model_path(run.base_model), adapter_dir, [{"question": question, "contexts": contexts}], generation_settings(run))
    return answers


def playground_job(run_id: int, question: str, contexts: list[str]) -> dict[str, str]:
    """The gpu queue's job: its return value is the answers."""
    return playground_answer(run=PipelineRun.objects.get(pk=run_id), question=question, contexts=contexts)


def _queue():
    import django_rq

    return django_rq.get_queue(QUEUE)


def playground_enqueue(*, run: PipelineRun, question: str, contexts: list[str]) -> str:
    """Send the question to the gpu queue; the job's id. Raises redis.RedisError when Redis is unreachable."""
    playground_check(run)
    job_id = f"playground-{run.pk}-{uuid.uuid4().hex[:16]}"
    _queue().enqueue_call(
        playground_job, args=(run.pk, question, contexts), job_id=job_id, timeout=JOB_TIMEOUT_SECONDS,
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
    """The page's question: contexts typed one per paragraph (a blank line between two contexts)."""

    question = forms.CharField(max_length=MAX_QUESTION_CHARS, strip=True)
    contexts = forms.CharField(required=False, strip=True, widget=forms.Textarea)

    def clean_contexts(self) -> list[str]:
        contexts = [c.strip() for c in CONTEXT_SEPARATOR.split(self.cleaned_data["contexts"].replace("\r\n", "\n")) if c.strip()]
        if len(contexts) > MAX_CONTEXTS:
            raise forms.ValidationError(f"at most {MAX_CONTEXTS} contexts (got {len(contexts)})")
        long = [n for n, c in enumerate(contexts, 1) if len(c) > MAX_CONTEXT_CHARS]
        if long:
            raise forms.ValidationError(f"context {long[0]} is longer than {MAX_CONTEXT_CHARS} characters")
        return contexts
