"""The fine-tune kind: train a LoRA adapter, then answer, score and compare it with its base model.

    finetune (gpu) ──> generate (gpu) ──> score (cpu) ──> compare (cpu) ──> promote (cpu)
              └──────> register (cpu) ─────────────────────┘

With `selection`, the adapter is chosen by scored quality while training goes on:

    finetune (gpu) ─┬─> score_checkpoint:ckpt-N (cpu) ...  one per selection point, added by the fine-tune
                    └──────────────────────────────────┴──> select (cpu) ──> generate, register ... as above

`register` logs the adapter as an MLflow pyfunc model and registers a version
(idempotent: a version this MLflow run already has is reused); it runs beside
generation. `compare` pairs fine-tuned and base scores and records the
promotion gate's decision; `promote` then gives MLflow that decision's alias.
A trial of a sweep (a child run) leaves registration and promotion to its
parent: its graph stops at `compare`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import model_validator

from evaluation.metric_names import RETRIEVAL_METRICS
from evaluation.steps import generate_step, score_checkpoint_step, score_step, select_step
from training.steps import finetune_step

from ..config import PromotionConfig, RunConfig, TrainingConfig
from ..export import AT_END_STEP, ON_DEMAND_STEP, export_figures, export_step, publish_export, store_export
from ..models import RunKind, RunStatus, Variant, ordered_variants
from ..promotion import compare_and_gate, promote_step, register_step
from ..step_io import (
    finetune_figures,
    publish_answers,
    publish_checkpoint_scores,
    publish_comparisons,
    publish_finetune,
    publish_scores,
    publish_selection,
    store_answers,
    store_checkpoint_scores,
    store_comparisons,
    store_finetune,
    store_registration,
    store_scores,
    store_selection,
)
from .base import CPU, GPU, RESUME, RETRY, Graph, Kind, Step

TRAINING, EVALUATING = RunStatus.TRAINING, RunStatus.EVALUATING


class FinetuneConfig(RunConfig):
    kind: Literal["finetune"]

    @model_validator(mode="after")
    def _finetune_rules(self) -> FinetuneConfig:
        if not self.datasets.train:
            raise ValueError("datasets.train: a finetune run needs at least one train dataset")
        if self.training is None:
            self.training = TrainingConfig()
        validation = self.training.validation_dataset
        if validation is not None and validation in self.datasets.train:
            raise ValueError(f"training.validation_dataset: {validation!r} is also in datasets.train; validation rows must be held out")
        if self.evaluation.answers != "generate":
            raise ValueError("evaluation.answers: a finetune run scores generated answers; use 'generate'")
        if self.sweep is not None:
            raise ValueError("sweep: applies to kind sweep only (many fine-tunes); remove it, or set kind: sweep")
        if self.selection is not None:
            self._selection_rules()
        if self.promotion is None:
            self.promotion = PromotionConfig()
        if self.promotion.metric is None:
            self.promotion.metric = self.evaluation.metrics[0]
        elif self.promotion.metric not in self.evaluation.metrics:
            raise ValueError(f"promotion.metric: {self.promotion.metric!r} is not one of evaluation.metrics ({', '.join(self.evaluation.metrics)})")
        if self.promotion.datasets != "all":
            outside = [d for d in self.promotion.datasets if d not in self.datasets.eval]
            if outside:
                raise ValueError(f"promotion.datasets: {', '.join(outside)} not in datasets.eval")
        return self

    def _selection_rules(self) -> None:
        selection = self.selection
        dependent = [m for m in self.evaluation.metrics if m not in RETRIEVAL_METRICS]
        if selection.metric is None:
            if not dependent:
                raise ValueError("selection.metric: evaluation.metrics has no metric that depends on the model to choose by")
            selection.metric = dependent[0]
        elif selection.metric not in self.evaluation.metrics:
            raise ValueError(f"selection.metric: {selection.metric!r} is not one of evaluation.metrics ({', '.join(self.evaluation.metrics)})")
        elif selection.metric in RETRIEVAL_METRICS:
            raise ValueError(f"selection.metric: {selection.metric!r} scores the retrieved contexts, the same for every checkpoint; "
                             f"choose one of {', '.join(dependent) or 'a metric that scores the answer'}")
        if isinstance(selection.rows, str):
            if selection.rows in self.datasets.train:
                raise ValueError(f"selection.rows: {selection.rows!r} is also in datasets.train; selection rows must be held out of training")
            if selection.rows == self.training.validation_dataset:
                raise ValueError(f"selection.rows: {selection.rows!r} is also training.validation_dataset; selection rows must be their own")


FINETUNE = Step("finetune", GPU, TRAINING, finetune_step, "fine-tuning", publish=publish_finetune, store=store_finetune,
                figures=finetune_figures, on_lost=RESUME, weight=70)
# selection: the fine-tune adds one scoring job per selection point; `select` waits for all of them
SCORE_CHECKPOINT = Step("score_checkpoint", CPU, EVALUATING, score_checkpoint_step, "scoring a checkpoint on the selection rows",
                        publish=publish_checkpoint_scores, store=store_checkpoint_scores, spawned_by="finetune", on_lost=RETRY,
                        tolerate_failure=True, weight=0)
SELECT = Step("select", CPU, EVALUATING, select_step, "choosing the checkpoint", publish=publish_selection, store=store_selection,
              after=("finetune", "score_checkpoint"), on_lost=RETRY, weight=1)
GENERATE = Step("generate", GPU, EVALUATING, generate_step, "answer generation", publish=publish_answers, store=store_answers,
                after=("finetune",), weight=16)
SCORE = Step("score", CPU, EVALUATING, score_step, "scoring", publish=publish_scores, store=store_scores,
             after=("generate",), on_lost=RETRY, weight=10)
PROMOTE = Step("promote", CPU, EVALUATING, promote_step, "the registry's alias", after=("compare",), on_lost=RETRY, weight=1)

# Exports (runs/export.py): on request once the run completed, or (config `export`) as the run's last step.
EXPORT = Step(ON_DEMAND_STEP, GPU, EVALUATING, export_step, "export", publish=publish_export, store=store_export, figures=export_figures,
              on_demand=True, on_lost=RETRY, weight=0)
EXPORT_AT_END = Step(AT_END_STEP, GPU, EVALUATING, export_step, "export (config)", publish=publish_export, store=store_export,
                     figures=export_figures, after=("promote",), on_lost=RETRY, weight=10)


def _graph(*, selection: bool, trial: bool, export: bool) -> Graph:
    """The fine-tune's graph: what generation and registration wait for is the adapter, the chosen one with selection.
    A sweep's trial (a child run) leaves registration, promotion and export to its parent."""
    adapter = ("select",) if selection else ("finetune",)
    steps = [FINETUNE, *((SCORE_CHECKPOINT, SELECT) if selection else ())]
    if not trial:
        steps.append(Step("register", CPU, EVALUATING, register_step, "registering the model", store=store_registration,
                          after=adapter, on_lost=RETRY, weight=2))
    steps += [dataclasses.replace(GENERATE, after=adapter), SCORE]
    steps.append(Step("compare", CPU, EVALUATING, compare_and_gate, "the comparison with the base model and the promotion gate",
                      publish=publish_comparisons, store=store_comparisons, after=("score",) if trial else ("score", "register"),
                      on_lost=RETRY, weight=1))
    if not trial:
        steps += [PROMOTE, EXPORT, *((EXPORT_AT_END,) if export else ())]
    return Graph(tuple(steps))


GRAPHS = {(selection, trial, export): _graph(selection=selection, trial=trial, export=export)
          for selection in (False, True) for trial in (False, True) for export in (False, True)}


class FinetuneKind(Kind):
    name = RunKind.FINETUNE
    label = "Fine-tune + evaluate"
    config_model = FinetuneConfig
    path = (RunStatus.PENDING, TRAINING, EVALUATING, RunStatus.COMPLETED)
    sections = frozenset({"training", "data_check", "overlap", "playground", "registry"})
    config_sections = ("name", "kind", "model", "datasets", "training", "evaluation", "selection", "promotion", "export")

    def graph(self, config: Mapping[str, Any], *, has_parent: bool = False) -> Graph:
        return GRAPHS[(config.get("selection") is not None, has_parent, bool(config.get("export")) and not has_parent)]

    def data_check_config(self, config: Mapping[str, Any]) -> dict[str, Any] | None:
        return dict(config)

    def main_variant(self, config: Mapping[str, Any]) -> str:
        return Variant.FINETUNED

    def generated_variants(self, config: Mapping[str, Any]) -> list[str]:
        return ordered_variants([Variant.FINETUNED] + ([Variant.BASE] if config["evaluation"]["compare_base"] else []))


KIND = FinetuneKind()
