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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .checkpoints import checkpoint_step
from .data import split_selection, split_validation
from .data_check import check_data
from .finetune import FinetuneOutcome, StepInfo, finetune, load_tokenizer
from .local_models import local_model_info, resolve_model_path
from .precision import pick_device

# Errors that mean "this disk or directory cannot take the adapter", whichever file hit them.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class EvalRows(Protocol):
    name: str
    rows: list[dict[str, Any]]


class DataCheckContext(Protocol):
    """What the data check needs: a fine-tune step's context has it, and so has a config not yet run (runs/data_check.py)."""

    config: dict[str, Any]
    base_model: str

    def train_rows(self) -> list[dict[str, Any]]: ...
    def validation_rows(self) -> list[dict[str, Any]] | None: ...  # training.validation_dataset's rows, or None: a split
    def selection_rows(self) -> list[dict[str, Any]] | None: ...  # selection.rows' dataset's rows, or None: a split (or no selection)
    def eval_sets(self) -> Sequence[EvalRows]: ...
    def build_progress(self) -> Callable[[int, int], None]: ...
    # tokens/s, run id and device of the last fine-tune of this base model (on `device` when given), or None
    def throughput(self, device: str | None) -> dict[str, Any] | None: ...
    # {dataset: {metric: {"sd", "run_id"}}}: the spread of an earlier comparison's paired differences (for the eval sets' power)
    def difference_spreads(self) -> dict[str, dict[str, dict[str, Any]]]: ...


class FinetuneContext(DataCheckContext, Protocol):
    """What the fine-tune step needs from the application (runs/step_io.py implements it)."""

    config: dict[str, Any]
    base_model: str
    work_dir: Path  # this run's directory on this machine

    def progress(self, fraction: float | None, stage: str) -> None: ...
    def log(self, line: str) -> None: ...
    def check_cancelled(self) -> None: ...  # raises when the run was cancelled
    def record_step(self, info: StepInfo) -> None: ...
    def build_progress(self) -> Callable[[int, int], None]: ...
    attempt: int  # 1, or more when the worker of an earlier attempt was lost

    def record_data_check(self, report: dict[str, Any]) -> None: ...
    def checkpoint_dir(self) -> Path: ...  # where checkpoints are on this machine (fetched for a resumed attempt)
    def store_checkpoint(self, kind: str, directory: Path, step: int) -> None: ...
    # checkpoint selection: a point's adapter published, a keyed job added, the points scored so far
    def store_selection_adapter(self, directory: Path, step: int) -> None: ...
    def add_job(self, step: str, key: str, payload: dict[str, Any] | None = None) -> bool: ...
    def selection_points(self) -> list[dict[str, Any]]: ...


@dataclass
class TrainedAdapter:
    outcome: FinetuneOutcome
    base_model_info: dict[str, Any]  # what a local build records of itself (SmolLM2: the GGUF's sha256)


class ArtifactWriteError(Exception):
    """The run's output directory cannot take the adapter (disk full, not writable, not a directory)."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


# A test hook (never set by the product): "STEP:TIMES,..." raises a CUDA out-of-memory error in those steps.
INJECT_OOM_ENV = "MLOPS_TEST_INJECT_OOM"


def injected_oom() -> dict[int, int] | None:
    spec = os.environ.get(INJECT_OOM_ENV, "").strip()
    if not spec:
        return None
    return {int(step): int(times) for step, _, times in (item.partition(":") for item in spec.split(","))}


class DataCheckFailed(ValueError):
    """The data check refuses the config (truncation above the limit, train/eval overlap)."""


def data_check(ctx: DataCheckContext, *, on_training_device: bool, rows: TrainingRows | None = None) -> dict[str, Any]:
    """The data check of the context's config (training/data_check.py), with the tokenizer of its base model.

    on_training_device: this process is where the fine-tune trains, so the time
    estimate uses an earlier run on this device; else the last run of the base model anywhere.
    rows: training_rows(ctx) when the caller already read them (the fine-tune step), so no file is read twice.
    """
    config = ctx.config
    training = config["training"]
    split = rows or training_rows(ctx)
    eval_sets = ctx.eval_sets()
    tokenizer = load_tokenizer(resolve_model_path(ctx.base_model, progress=ctx.build_progress()))
    device = pick_device(training.get("precision", "auto"))[0] if on_training_device else None
    selecting = config.get("selection") is not None
    report = check_data(
        tokenizer=tokenizer, train_rows=split.train, validation_rows=split.validation, eval_sets={s.name: s.rows for s in eval_sets},
        training=training, prompt_format=config["model"].get("prompt_format", "auto"),
        allow_overlap=config["evaluation"].get("allow_overlap", False), throughput=ctx.throughput(device),
        selection_rows=split.selection if selecting else None, selection_source=split.selection_source,
    )
    report["validation"] = {"rows": len(split.validation), "source": split.validation_source}
    report["power"] = eval_set_power(ctx, eval_sets)
    report["base_model"] = ctx.base_model
    return report


@dataclass
class TrainingRows:
    """The train datasets' rows cut into what trains, what validates and what chooses the checkpoint, disjoint."""

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    validation_source: str
    selection: list[dict[str, Any]]  # [] without selection
    selection_source: str


def eval_set_power(ctx: DataCheckContext, eval_sets: Sequence[EvalRows]) -> dict[str, dict[str, Any]]:
    """How small a difference each eval set can see, per metric, before launch: its number of pairs and the spread of
    an earlier run's paired differences on it (evaluation/power.py)."""
    from evaluation.power import power_report

    spreads = ctx.difference_spreads()
    out: dict[str, dict[str, Any]] = {}
    for eval_set in eval_sets:
        for metric in ctx.config["evaluation"]["metrics"]:
            known = spreads.get(eval_set.name, {}).get(metric)
            report = power_report(n=len(eval_set.rows), sd=known["sd"] if known else None)
            report["basis"] = (f"the spread of run #{known['run_id']}'s paired differences" if known
                               else "not estimated: no earlier run compared fine-tuned and base on this set and metric")
            out.setdefault(eval_set.name, {})[metric] = report
    return out


def training_rows(ctx: DataCheckContext) -> TrainingRows:
    """Validation first (a dataset, or a seeded share of the train rows), then selection (a dataset, or a seeded
    share of what is left): the rows that train are what remains."""
    config = ctx.config
    training, selection = config["training"], config.get("selection")
    rows = ctx.train_rows()
    validation = ctx.validation_rows()
    if validation is not None:
        validation_source = f"dataset {training['validation_dataset']}"
    else:
        rows, validation = split_validation(rows, fraction=training.get("validation_split", 0.0), seed=training["seed"])
        validation_source = f"{training.get('validation_split', 0.0):g} of the train rows (seed {training['seed']})"
    chosen: list[dict[str, Any]] = []
    selection_source = ""
    if selection is not None:
        named = ctx.selection_rows()
        if named is not None:
            chosen, selection_source = named, f"dataset {selection['rows']}"
        else:
            rows, chosen = split_selection(rows, fraction=float(selection["rows"]), seed=training["seed"])
            selection_source = f"{float(selection['rows']):g} of the train rows (seed {training['seed']})"
        if len(chosen) > selection["max_rows"]:
            selection_source += f", the first {selection['max_rows']} of {len(chosen)} (selection.max_rows)"
            chosen = chosen[: selection["max_rows"]]
    return TrainingRows(train=rows, validation=validation, validation_source=validation_source, selection=chosen,
                        selection_source=selection_source)


def finetune_step(ctx: FinetuneContext) -> TrainedAdapter:
    config = ctx.config
    split = training_rows(ctx)
    rows, validation = split.train, split.validation
    ctx.log(
        f"fine-tuning {ctx.base_model} on {', '.join(config['datasets']['train'])} ({len(rows)} rows; "
        f"validation: {len(validation)} rows, {split.validation_source}"
        + (f"; selection: {len(split.selection)} rows, {split.selection_source}" if config.get("selection") else "") + ")"
    )
    output = ctx.work_dir
    resume = ctx.attempt > 1
    with artifact_writes(output):
        if output.exists():
            # A retried step starts clean; a resumed attempt keeps its checkpoints.
            for child in output.iterdir():
                if not (resume and child.name in ("checkpoints", "selection")):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        ensure_writable(output)  # before the model is loaded and trained, not after
    ctx.progress(0.0, "checking the data")
    report = data_check(ctx, on_training_device=True, rows=split)
    ctx.record_data_check(report)
    if report["problems"]:
        raise DataCheckFailed("the data check refuses this config: " + "; ".join(f"{p['field']}: {p['message']}" for p in report["problems"]))
    checkpoint_dir = ctx.checkpoint_dir() if resume else output / "checkpoints"
    start_step = checkpoint_step(checkpoint_dir) if resume else None
    if resume:
        ctx.log(
            f"attempt {ctx.attempt}: resumed from step {start_step} after the worker was lost" if start_step is not None
            else f"attempt {ctx.attempt}: no checkpoint found after the worker was lost; training from the start"
        )

    ctx.progress(0.0, "loading base model")
    base_path = resolve_model_path(ctx.base_model, progress=ctx.build_progress())
    with artifact_writes(output):
        outcome = finetune(
            base_model_path=base_path, rows=rows, training=config["training"], output_dir=output,
            prompt_format=config["model"].get("prompt_format", "auto"),
            on_step=ctx.record_step, check_cancelled=ctx.check_cancelled,
            validation_rows=validation, checkpoint_dir=checkpoint_dir, on_checkpoint=ctx.store_checkpoint,
            resume=start_step is not None, log=ctx.log, inject_oom=injected_oom(),
            **selection_hook(ctx, split.selection),
        )
        (outcome.adapter_dir / "run_config.json").write_text(json.dumps(config, indent=2))
    ctx.log(
        f"trained {outcome.steps} steps on {outcome.device} ({outcome.dtype}) in {outcome.seconds:.1f}s: "
        f"final loss {outcome.final_loss:.4f}, {outcome.tokens / max(outcome.seconds, 1e-9):.0f} tokens/s, "
        f"{outcome.trainable_parameters}/{outcome.total_parameters} parameters trainable"
        + (f", peak memory {outcome.peak_memory_bytes / 2**20:.0f} MiB" if outcome.peak_memory_bytes else "")
        + (f"; adapter of step {outcome.best_step} (best validation loss {outcome.best_val_loss:.4f})" if outcome.best_step else "")
    )
    return TrainedAdapter(outcome=outcome, base_model_info=local_model_info(base_path))


def selection_rows_as_eval_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Train rows (question, context, answer) as the eval rows generation and scoring take (contexts, ground truth)."""
    return [{"question": r["question"], "contexts": [r["context"]], "ground_truth": r["answer"]} for r in rows]


def selection_hook(ctx: FinetuneContext, selection_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """finetune()'s selection arguments: at each point the adapter is saved (and published), the selection rows
    answered with the current weights on this device, a scoring job added for the cpu queue; training goes on,
    stopping early on the scores that have arrived (never waiting for the others)."""
    from evaluation.generation import encode_eval_prompts, generate_answers
    from evaluation.selection import early_stop

    selection = ctx.config.get("selection")
    if not selection or not selection_rows:
        return {}
    evaluation, training = ctx.config["evaluation"], ctx.config["training"]
    prompt_format = ctx.config["model"].get("prompt_format", "auto")
    rows = selection_rows_as_eval_rows(selection_rows)

    def at_point(step: int, model, tokenizer) -> str | None:
        import torch

        adapter = ctx.work_dir / "selection" / f"step-{step}"
        model.save_pretrained(adapter)
        ctx.store_selection_adapter(adapter, step)
        max_prompt = max(16, min(training["max_seq_length"], getattr(model.config, "max_position_embeddings", training["max_seq_length"]))
                         - evaluation["max_new_tokens"])
        prompts = encode_eval_prompts(tokenizer, rows, max_prompt_tokens=max_prompt, prompt_format=prompt_format)
        ctx.progress(None, f"selection point at step {step}: answering {len(rows)} selection rows")
        with torch.no_grad():
            answers = generate_answers(model, tokenizer, prompts, batch_size=evaluation["batch_size"],
                                       max_new_tokens=evaluation["max_new_tokens"], prompt_format=prompt_format)
        samples = [{**row, "index": i, "answer": answer} for i, (row, answer) in enumerate(zip(rows, answers, strict=True))]
        ctx.add_job("score_checkpoint", f"ckpt-{step}", {"step": step, "samples": samples})
        ctx.log(f"selection point at step {step}: {len(samples)} answers sent to be scored on {selection['metric']}")
        return early_stop(ctx.selection_points(), patience=selection["patience"], min_delta=selection["min_delta"])

    return {"selection_every": selection["every"], "on_selection_point": at_point}


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
