"""The kinds of run, each declared once in its own module: fine-tune, eval-only, sweep.

Everything that differs by kind (config rules, the graph of jobs, status path,
page sections, which config fields apply, which variant a run is about) is
asked of the kind: `kind_of(run)` or `kind_named(name)`. Code elsewhere does
not compare `run.kind` with a name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Kind
from .eval_only import KIND as EVAL_ONLY
from .finetune import KIND as FINETUNE
from .sweep import KIND as SWEEP

if TYPE_CHECKING:
    from pydantic import BaseModel

    from ..models import PipelineRun

KINDS: dict[str, Kind] = {kind.name: kind for kind in (FINETUNE, EVAL_ONLY, SWEEP)}


def kind_named(name: str) -> Kind:
    return KINDS[name]


def kind_of(run: PipelineRun) -> Kind:
    return KINDS[run.kind]


def config_model(name: object) -> type[BaseModel]:
    """The config model that validates a config of kind `name`; the whole schema (which refuses the kind) otherwise."""
    from ..config import RunConfig

    kind = KINDS.get(name) if isinstance(name, str) else None
    return kind.config_model if kind else RunConfig


def kind_choices() -> list[tuple[str, str]]:
    return [(kind.name, kind.label) for kind in KINDS.values()]
