"""The fine-tuning step of a pipeline run: data, LoRA training, MLflow, registry."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from datasets_app.validation import read_rows
from runs import tracking
from runs.execution import RunLog, check_not_cancelled, tolerate_db_errors
from runs.models import PipelineRun
from runs.orchestration import run_enqueue_next
from runs.reproducibility import reproducibility_record
from runs.services import run_set_registered_model, run_set_reproducibility, run_transition, run_update_progress

from .finetune import StepInfo, TrainingStopped, finetune
from .tiny_model import resolve_model_path

LIVE_UPDATE_SECONDS = 1.0
# Errors that mean "this disk or directory cannot take the adapter", whichever file hit them.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class ArtifactWriteError(Exception):
    """The run's output directory cannot take the adapter (disk full, not writable, not a directory)."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def runs_dir() -> Path:
    """Where runs write their working copies (the adapter before MLflow has it).

    settings.RUNS_DIR when a deployment sets it, else MLOPS_VAR_DIR/runs.
    """
    configured = getattr(settings, "RUNS_DIR", None)
    return Path(configured) if configured else Path(settings.VAR_DIR) / "runs"


def run_dir(run_id: int) -> Path:
    return runs_dir() / str(run_id)


def adapter_dir(run_id: int) -> Path:
    return run_dir(run_id) / "adapter"


def run_finetune(run: PipelineRun, run_log: RunLog) -> None:
    config = run.config
    training = config["training"]
    train_sets = list(run.train_datasets.order_by("name"))
    rows = []
    for dataset in train_sets:
        rows += read_rows(dataset.file.path)
    run_log(f"fine-tuning {run.base_model} on {', '.join(d.name for d in train_sets)} ({len(rows)} rows)")
    output = run_dir(run.pk)
    with artifact_writes(output):
        if output.exists():
            shutil.rmtree(output)  # A retried job starts clean.
        ensure_writable(output)  # before the model is loaded and trained, not after

    run_update_progress(run_id=run.pk, progress=1, stage="loading base model")
    base_path = resolve_model_path(run.base_model, progress=build_progress(run.pk, run.base_model))
    record = reproducibility_record(run)
    run_set_reproducibility(run_id=run.pk, record=record)
    mlflow_run_id = tracking.mlflow_start(run, tags={f"repro.{k}": v for k, v in tracking.flatten("", record).items()})
    run_log(f"MLflow run {mlflow_run_id}")

    metrics = tracking.MetricBuffer(mlflow_run_id)
    history: list[dict[str, float]] = []
    last_update = [0.0]

    def on_step(info: StepInfo) -> None:
        metrics.add({"train/loss": info.loss, "train/learning_rate": info.learning_rate, "train/epoch": info.epoch}, info.step)
        history.append({"step": info.step, "loss": round(info.loss, 5), "learning_rate": info.learning_rate, "epoch": round(info.epoch, 3)})
        now = time.monotonic()
        if now - last_update[0] >= LIVE_UPDATE_SECONDS or info.step == info.total_steps:
            last_update[0] = now
            # Training is 0-70% of a fine-tune run; generation and scoring share the rest.
            # A lost database connection must not throw away the training done so far:
            # the update is skipped and the next one (on a new connection) carries it.
            with tolerate_db_errors(f"run {run.pk}: live training update"):
                PipelineRun.objects.filter(pk=run.pk).update(
                    train_history=history, progress=2 + int(68 * info.step / info.total_steps),
                    stage=f"training step {info.step}/{info.total_steps}, epoch {info.epoch:.2f}, loss {info.loss:.4f}",
                    heartbeat_at=timezone.now(),
                )

    last_check = [0.0]

    def should_stop() -> bool:
        now = time.monotonic()
        if now - last_check[0] < LIVE_UPDATE_SECONDS:
            return False
        last_check[0] = now
        with tolerate_db_errors(f"run {run.pk}: cancel check"):
            check_not_cancelled(run.pk)
        return False

    try:
        with artifact_writes(output):
            outcome = finetune(base_model_path=base_path, rows=rows, training=training, output_dir=output, on_step=on_step, should_stop=should_stop)
    except TrainingStopped:
        metrics.flush()
        raise
    finally:
        PipelineRun.objects.filter(pk=run.pk).update(train_history=history)
    metrics.flush()
    run_log(
        f"trained {outcome.steps} steps on {outcome.device} ({outcome.dtype}) in {outcome.seconds:.1f}s: "
        f"final loss {outcome.final_loss:.4f}, {outcome.tokens / max(outcome.seconds, 1e-9):.0f} tokens/s, "
        f"{outcome.trainable_parameters}/{outcome.total_parameters} parameters trainable"
    )
    check_not_cancelled(run.pk)

    run_update_progress(run_id=run.pk, progress=71, stage="logging adapter to MLflow")
    with artifact_writes(output):
        (outcome.adapter_dir / "run_config.json").write_text(json.dumps(config, indent=2))
    tracking.log_metrics(mlflow_run_id, {
        "train/final_loss": outcome.final_loss, "train/tokens_per_second": outcome.tokens / max(outcome.seconds, 1e-9),
        "train/seconds": outcome.seconds, "train/trainable_parameters": outcome.trainable_parameters,
    }, step=outcome.steps)
    tracking.log_artifacts(mlflow_run_id, outcome.adapter_dir, "adapter")
    name = tracking.registered_model_name(base_model=run.base_model, train_datasets=[d.name for d in train_sets])
    version = tracking.register_adapter(mlflow_run_id, name=name, artifact_path="adapter", description=f"{run.name} (run #{run.pk})")
    run_set_registered_model(run_id=run.pk, name=name, version=version)
    run_log(f"registered model {name} version {version}")

    run_transition(run_id=run.pk, to="evaluating", expected="training", message="training finished")
    run_enqueue_next(run_id=run.pk, after="finetune")
    run_update_progress(run_id=run.pk, progress=72, stage="queued for answer generation")


def ensure_writable(directory: Path) -> None:
    """Create the directory and write a probe file through to the disk: OSError if it cannot take files."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / ".write-probe"
    with open(probe, "wb") as handle:
        handle.write(b"\0" * 4096)
        handle.flush()
        os.fsync(handle.fileno())
    probe.unlink()


@contextlib.contextmanager
def artifact_writes(output: Path) -> Iterator[None]:
    """Turn an OSError from writing the run's outputs into one message that says what to fix.

    An error counts when it hit a file under the output directory, or is a
    disk-full error (ENOSPC, EDQUOT, EFBIG) whatever file it hit; other
    OSErrors (a missing base model, say) pass unchanged.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS and not _is_under(exc.filename, Path(output)):
            raise
        why = exc.strerror or str(exc)
        raise ArtifactWriteError(
            f"cannot write the adapter to {Path(output) / 'adapter'}: {why} (disk full or directory not writable)",
            errno=exc.errno,
        ) from exc


def _is_under(filename: object, directory: Path) -> bool:
    if not filename:
        return False
    path = Path(str(filename))
    return path == directory or directory in path.parents


def build_progress(run_id: int, base_model: str):
    """Stage updates while a local: model is built on first use (it takes a while)."""
    last = [0.0]

    def report(step: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= LIVE_UPDATE_SECONDS or step == total:
            last[0] = now
            run_update_progress(run_id=run_id, stage=f"building {base_model} on first use: pre-training step {step}/{total}")

    return report


def ensure_adapter(run: PipelineRun) -> Path:
    """The run's adapter on this machine: local, or downloaded from MLflow (another gpu worker trained it)."""
    local = adapter_dir(run.pk)
    if (local / "adapter_config.json").exists():
        return local
    downloaded = tracking.download_artifacts(run.mlflow_run_id, "adapter", run_dir(run.pk))
    return downloaded
