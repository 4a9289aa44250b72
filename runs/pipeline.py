"""The step registry: the one place a run's chain of steps is declared and driven.

    finetune:                 finetune (gpu) -> generate (gpu) -> score (cpu) -> compare (cpu)
    eval_only, generate:      generate (gpu) -> score (cpu)
    eval_only, dataset:       score (cpu)

A step is data: its name, its queue, the run's status while it runs, the body
that does the work (an engine function in training/ or evaluation/), the
function that stores what the body returned, and its share of the progress bar.
`run_step(run_id, step)` runs any step: claim it (compare-and-swap on
`current_job`), move the run's status in, keep a heartbeat, call the body,
then store its output and move the run on (`run_advance`: the next step, or
`completed`) in one transaction. MLflow is finished here and only here.

Served mode: each step is an RQ job `run_step(run_id, step)` on the step's
queue, sent after the transaction that queued it commits. The embedded
default (no REDIS_URL) has no queues: `drive_inline` runs the queued steps one
after another in this process, in the foreground (`run_pipeline`) or in a
background thread (a web request).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import Error as DatabaseError
from django.db import close_old_connections, connection, transaction

from evaluation.steps import compare_step, generate_step, score_step
from training.steps import finetune_step

from . import queues, tracking
from .config import check_model_reference
from .execution import RunCancelled, RunLog, drop_broken_connection, failure_reason, heartbeat, run_fail
from .models import TERMINAL_STATUSES, PipelineRun, RunKind, RunStatus
from .services import run_advance, run_claim_step, run_transition, run_update_progress
from .step_io import StepContext, start_tracking, store_answers, store_comparisons, store_finetune, store_scores

log = logging.getLogger(__name__)
GPU, CPU = "gpu", "cpu"
TRAINING, EVALUATING = RunStatus.TRAINING, RunStatus.EVALUATING


@dataclass(frozen=True)
class Step:
    name: str
    queue: str
    status: str  # the run's status while this step runs
    body: Callable[[StepContext], Any]
    store: Callable[[StepContext, Any], None]
    progress: tuple[int, int]  # the share of the run's progress bar, in percent
    label: str


FINETUNE = (
    Step("finetune", GPU, TRAINING, finetune_step, store_finetune, (1, 70), "fine-tuning"),
    Step("generate", GPU, EVALUATING, generate_step, store_answers, (72, 88), "answer generation"),
    Step("score", CPU, EVALUATING, score_step, store_scores, (88, 98), "scoring"),
    Step("compare", CPU, EVALUATING, compare_step, store_comparisons, (98, 99), "the comparison with the base model and the promotion gate"),
)
EVAL_GENERATE = (
    Step("generate", GPU, EVALUATING, generate_step, store_answers, (2, 50), "answer generation"),
    Step("score", CPU, EVALUATING, score_step, store_scores, (50, 99), "scoring"),
)
EVAL_STORED_ANSWERS = (
    Step("score", CPU, EVALUATING, score_step, store_scores, (2, 99), "scoring"),
)
QUEUES = {step.name: step.queue for chain in (FINETUNE, EVAL_GENERATE, EVAL_STORED_ANSWERS) for step in chain}


def chain_for(*, kind: str, answers: str) -> tuple[Step, ...]:
    if kind == RunKind.FINETUNE:
        return FINETUNE
    return EVAL_GENERATE if answers == "generate" else EVAL_STORED_ANSWERS


def chain_of(run: PipelineRun) -> tuple[Step, ...]:
    return chain_for(kind=run.kind, answers=run.config["evaluation"]["answers"])


def run_step(run_id: int, step_name: str) -> None:
    """The job function of every step (the RQ job `run_step(run_id, step)`, or called inline)."""
    if not run_claim_step(run_id=run_id, step=step_name):
        log.info("run %s: %s step not claimed (already taken, or the run ended); skipping", run_id, step_name)
        return
    ctx: StepContext | None = None
    try:
        run = PipelineRun.objects.get(pk=run_id)
        chain = chain_of(run)
        position = [s.name for s in chain].index(step_name)
        step, following = chain[position], chain[position + 1] if position + 1 < len(chain) else None
        if run.status != step.status and not run_transition(run_id=run_id, to=step.status, expected=run.status, message=f"{step.name} started"):
            raise RunCancelled(f"run {run_id} changed status before {step.name} started")
        run.refresh_from_db()
        # The worker applies the same rule as validation: known local: builds, paths only under MLOPS_MODEL_PATHS.
        check_model_reference(run.base_model)
        ctx = StepContext(run, step)
        with heartbeat(run_id):
            start_tracking(ctx)
            output = step.body(ctx)
            ctx.check_cancelled(now=True)
            _store_and_advance(ctx, step, following, output)
    except RunCancelled as exc:
        _log(run_id, f"{step_name} stopped: {exc}")
        _finish_mlflow(run_id, "KILLED")
    except BaseException as exc:
        if isinstance(exc, DatabaseError):
            drop_broken_connection()  # else recording the failure fails the same way
        _log(run_id, f"{step_name} failed:\n{traceback.format_exc()}")
        run_fail(run_id=run_id, reason=failure_reason(step_name, exc))
        _finish_mlflow(run_id, "FAILED")
        raise
    finally:
        if ctx is not None:
            ctx.close()


def _store_and_advance(ctx: StepContext, step: Step, following: Step | None, output: Any) -> None:
    """The step's output stored and the run moved on, together or not at all (a cancel in between keeps neither)."""
    with transaction.atomic():
        step.store(ctx, output)
        if following is None:
            # MLflow first: whoever sees the run `completed` also finds its MLflow run finished.
            tracking.mlflow_finish(ctx.run.mlflow_run_id, "FINISHED")
        next_status = following.status if following else RunStatus.COMPLETED
        if not run_advance(run_id=ctx.run_id, step=step.name, next_step=following.name if following else None, next_status=next_status):
            raise RunCancelled(f"run {ctx.run_id} ended while {step.name} was storing its output")
        if following is not None:
            run_update_progress(run_id=ctx.run_id, progress=step.progress[1], stage=f"queued for {following.label}")
            transaction.on_commit(lambda: _send(ctx.run_id, following))


def _send(run_id: int, step: Step) -> None:
    if not settings.JOBS_INLINE:
        queues.send_job(func=run_step, queue=step.queue, run_id=run_id, step=step.name)


def start(*, run_id: int) -> None:
    """After the run's creation commits: its first step is already marked queued; send it (or run it inline)."""
    step_name = PipelineRun.objects.values_list("current_job", flat=True).get(pk=run_id).partition(":")[0]
    if not settings.JOBS_INLINE:
        queues.send_job(func=run_step, queue=QUEUES[step_name], run_id=run_id, step=step_name)
    elif not getattr(_local, "foreground", False):
        threading.Thread(target=_drive_in_thread, args=(run_id,), name=f"run-{run_id}", daemon=True).start()


def remove_queued_steps(*, run_id: int) -> None:
    """A cancelled run's waiting jobs come off the queues (a running one stops at its next check)."""
    queues.remove_queued_jobs(run_id=run_id, steps=QUEUES.items())


def resend_lost_step(*, run_id: int, step_name: str) -> str | None:
    """The reaper's hand: send again a queued step that RQ lost (see queues.resend_lost_job)."""
    return queues.resend_lost_job(func=run_step, queue=QUEUES[step_name], run_id=run_id, step=step_name)


def resend_after_lost_worker(*, run_id: int, step_name: str) -> None:
    """The reaper's hand for a step whose worker died and that goes on (a fine-tune resuming from its checkpoint)."""
    if settings.JOBS_INLINE:
        start(run_id=run_id)  # a thread of this process (the embedded server, whose pages reap)
    else:
        queues.replace_dead_job(func=run_step, queue=QUEUES[step_name], run_id=run_id, step=step_name)


def _finish_mlflow(run_id: int, status: str) -> None:
    """Best effort: the pipeline run's state is already recorded in the database."""
    try:
        mlflow_run_id = PipelineRun.objects.values_list("mlflow_run_id", flat=True).get(pk=run_id)
        if mlflow_run_id:
            tracking.mlflow_finish(mlflow_run_id, status)
    except Exception:
        log.warning("run %s: could not mark its MLflow run %s", run_id, status, exc_info=True)


def _log(run_id: int, line: str) -> None:
    try:
        RunLog(run_id)(line)
    except DatabaseError:
        log.exception("run %s: could not append to the run's logs", run_id)
        drop_broken_connection()


# --- the embedded default: no queues, steps run in this process

_local = threading.local()


@contextlib.contextmanager
def inline_foreground() -> Iterator[None]:
    """Inside this block, inline runs are left to the caller's drive_inline()."""
    previous = getattr(_local, "foreground", False)
    _local.foreground = True
    try:
        yield
    finally:
        _local.foreground = previous


def drive_inline(run_id: int) -> None:
    """Run the run's queued steps in this process until none is left (embedded default)."""
    while True:
        current_job, status = PipelineRun.objects.values_list("current_job", "status").get(pk=run_id)
        step_name, _, state = current_job.partition(":")
        if state != "queued" or status in TERMINAL_STATUSES:
            return
        run_step(run_id, step_name)


def _drive_in_thread(run_id: int) -> None:
    try:
        drive_inline(run_id)
    except Exception:  # The step already recorded the failure on the run.
        log.exception("inline run %s failed", run_id)
    finally:
        connection.close()
        close_old_connections()
