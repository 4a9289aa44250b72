"""Training checkpoints: what a new attempt needs to continue with the same numbers.

A directory holds two checkpoints:

- `last/state.pt`: the LoRA weights, the optimizer and scheduler state, the RNG
  states (python, numpy, torch and CUDA), the position in the data order (epoch,
  next batch), the counters (step, tokens) and the validation bookkeeping (best
  loss and step, evaluations without improvement, micro-batch size after any
  out-of-memory halving). Loading it and training on gives the weights an
  uninterrupted run reaches.
- `best/state.pt`: the LoRA weights of the best validation loss, its step and loss.

Each is written to a temporary name and renamed, so a worker killed while saving
leaves the previous checkpoint whole. Django-free: the step body publishes the
directories where another worker can reach them (runs/step_io.py).
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Without training.checkpoint_every: a checkpoint after about this much training time.
DEFAULT_CHECKPOINT_SECONDS = 300.0
STATE_FILE = "state.pt"
KINDS = ("last", "best")


@dataclass
class TrainingState:
    """Where training stands; everything here goes into the `last` checkpoint."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # the next batch of `epoch` in the seeded data order
    tokens: int = 0
    micro_batch_size: int = 1
    best_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # validations since the last improvement (early stopping)
    stopped_early: str = ""
    last_loss: float = float("nan")
    seconds: float = 0.0  # training time up to this step (model loading excluded)


def has_checkpoint(directory: Path, kind: str) -> bool:
    return (Path(directory) / kind / STATE_FILE).is_file()


def checkpoint_step(directory: Path, kind: str = "last") -> int | None:
    """The step a checkpoint was taken at, or None when there is none."""
    if not has_checkpoint(directory, kind):
        return None
    payload = _load(Path(directory) / kind / STATE_FILE, device="cpu")
    return int(payload["step"])


def lora_weights(model) -> dict[str, Any]:
    """A CPU copy of the trainable (LoRA) weights."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu").clone() for k, v in get_peft_model_state_dict(model).items()}


def apply_lora_weights(model, weights: dict[str, Any], *, device: str) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, {k: v.to(device) for k, v in weights.items()})
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"checkpoint does not fit this model: unexpected keys {unexpected[:5]}")


def rng_states() -> dict[str, Any]:
    import numpy as np
    import torch

    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_last(directory: Path, *, model, optimizer, scheduler, state: TrainingState) -> Path:
    payload = {
        "step": state.step, "state": asdict(state), "lora": lora_weights(model), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "rng": rng_states(),
    }
    return _write(Path(directory) / "last", payload)


def save_best(directory: Path, *, model, step: int | None, val_loss: float | None) -> Path:
    return _write(Path(directory) / "best", {"step": step, "val_loss": val_loss, "lora": lora_weights(model)})


def load_last(directory: Path, *, model, optimizer, scheduler, device: str) -> TrainingState:
    """Weights, optimizer, scheduler and RNG states as they were at the checkpoint; returns the position."""
    payload = _load(Path(directory) / "last" / STATE_FILE, device="cpu")
    apply_lora_weights(model, payload["lora"], device=device)
    optimizer.load_state_dict(payload["optimizer"])  # moves the state onto the parameters' device
    scheduler.load_state_dict(payload["scheduler"])
    restore_rng_states(payload["rng"])
    return TrainingState(**payload["state"])


def best_weights(directory: Path) -> tuple[int | None, dict[str, Any] | None]:
    if not has_checkpoint(directory, "best"):
        return None, None
    payload = _load(Path(directory) / "best" / STATE_FILE, device="cpu")
    return payload["step"], payload["lora"]


def _write(target: Path, payload: dict[str, Any]) -> Path:
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    with open(staging / STATE_FILE, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    previous = target.with_name(f".{target.name}.old")
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        target.rename(previous)
    staging.rename(target)
    shutil.rmtree(previous, ignore_errors=True)
    return target


def _load(path: Path, *, device: str) -> dict[str, Any]:
    import torch

    # Our own files (this run's directory, or its MLflow artifacts): RNG states are numpy objects,
    # which the weights-only unpickler refuses.
    return torch.load(path, map_location=device, weights_only=False)  # noqa: S614
