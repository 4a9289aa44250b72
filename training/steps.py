"""The fine-tune step body: train a LoRA adapter on the run's rows and return it.

Called by the step registry (runs/pipeline.py) with a context that carries the
validated config, the rows and a few callbacks; it imports nothing from the
application. Storing what it returns (MLflow, the registry, the run's row) is
the registry's business.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .finetune import FinetuneOutcome, StepInfo, finetune
from .local_models import local_model_info, resolve_model_path

# Errors that mean "this disk or directory cannot take the adapter", whichever file hit them.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class FinetuneContext(Protocol):
    """What the fine-tune step needs from the application (runs/step_io.py implements it)."""

    config: dict[str, Any]
    base_model: str
    work_dir: Path  # this run's directory on this machine

    def train_rows(self) -> list[dict[str, Any]]: ...
    def progress(self, fraction: float | None, stage: str) -> None: ...
    def log(self, line: str) -> None: ...
    def check_cancelled(self) -> None: ...  # raises when the run was cancelled
    def record_step(self, info: StepInfo) -> None: ...
    def build_progress(self) -> Callable[[int, int], None]: ...


@dataclass
class TrainedAdapter:
    outcome: FinetuneOutcome
    base_model_info: dict[str, Any]  # what a local build records of itself (SmolLM2: the GGUF's sha256)


class ArtifactWriteError(Exception):
    """The run's output directory cannot take the adapter (disk full, not writable, not a directory)."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def finetune_step(ctx: FinetuneContext) -> TrainedAdapter:
    config = ctx.config
    rows = ctx.train_rows()
    ctx.log(f"fine-tuning {ctx.base_model} on {', '.join(config['datasets']['train'])} ({len(rows)} rows)")
    output = ctx.work_dir
    with artifact_writes(output):
        if output.exists():
            shutil.rmtree(output)  # A retried step starts clean.
        ensure_writable(output)  # before the model is loaded and trained, not after

    ctx.progress(0.0, "loading base model")
    base_path = resolve_model_path(ctx.base_model, progress=ctx.build_progress())
    with artifact_writes(output):
        outcome = finetune(
            base_model_path=base_path, rows=rows, training=config["training"], output_dir=output,
            prompt_format=config["model"].get("prompt_format", "auto"),
            on_step=ctx.record_step, check_cancelled=ctx.check_cancelled,
        )
        (outcome.adapter_dir / "run_config.json").write_text(json.dumps(config, indent=2))
    ctx.log(
        f"trained {outcome.steps} steps on {outcome.device} ({outcome.dtype}) in {outcome.seconds:.1f}s: "
        f"final loss {outcome.final_loss:.4f}, {outcome.tokens / max(outcome.seconds, 1e-9):.0f} tokens/s, "
        f"{outcome.trainable_parameters}/{outcome.total_parameters} parameters trainable"
    )
    return TrainedAdapter(outcome=outcome, base_model_info=local_model_info(base_path))


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
