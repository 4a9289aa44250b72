"""The fine-tune kind: train a LoRA adapter, then answer, score and compare it with its base model.

    finetune (gpu) ──> generate (gpu) ──> score (cpu) ──> compare (cpu) ──> promote (cpu)
              └──────> register (cpu) ─────────────────────┘

`register` logs the adapter as an MLflow pyfunc model and registers a version
(idempotent: a version this MLflow run already has is reused); it runs beside
generation. `compare` pairs fine-tuned and base scores and records the
promotion gate's decision; `promote` then gives MLflow that decision's alias.
A trial of a sweep (a child run) leaves registration and promotion to its
parent: its graph stops at `compare`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import model_validator

from evaluation.steps import generate_step, score_step
from training.steps import finetune_step

from ..config import PromotionConfig, RunConfig, TrainingConfig
from ..export import AT_END_STEP, ON_DEMAND_STEP, export_figures, export_step, publish_export, store_export
from ..models import RunKind, RunStatus, Variant, ordered_variants
from ..promotion import compare_and_gate, promote_step, register_step
from ..step_io import (
    finetune_figures,
    publish_answers,
    publish_comparisons,
    publish_finetune,
    publish_scores,
    store_answers,
    store_comparisons,
    store_finetune,
    store_registration,
    store_scores,
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


FINETUNE = Step("finetune", GPU, TRAINING, finetune_step, "fine-tuning", publish=publish_finetune, store=store_finetune,
                figures=finetune_figures, on_lost=RESUME, weight=70)
REGISTER = Step("register", CPU, EVALUATING, register_step, "registering the model", store=store_registration,
                after=("finetune",), on_lost=RETRY, weight=2)
GENERATE = Step("generate", GPU, EVALUATING, generate_step, "answer generation", publish=publish_answers, store=store_answers,
                after=("finetune",), weight=16)
SCORE = Step("score", CPU, EVALUATING, score_step, "scoring", publish=publish_scores, store=store_scores,
             after=("generate",), on_lost=RETRY, weight=10)


def _compare(after: tuple[str, ...]) -> Step:
    return Step("compare", CPU, EVALUATING, compare_and_gate, "the comparison with the base model and the promotion gate",
                publish=publish_comparisons, store=store_comparisons, after=after, on_lost=RETRY, weight=1)


PROMOTE = Step("promote", CPU, EVALUATING, promote_step, "the registry's alias", after=("compare",), on_lost=RETRY, weight=1)

# Exports (runs/export.py): on request once the run completed, or (config `export`) as the run's last step.
EXPORT = Step(ON_DEMAND_STEP, GPU, EVALUATING, export_step, "export", publish=publish_export, store=store_export, figures=export_figures,
              on_demand=True, on_lost=RETRY, weight=0)
EXPORT_AT_END = Step(AT_END_STEP, GPU, EVALUATING, export_step, "export (config)", publish=publish_export, store=store_export,
                     figures=export_figures, after=("promote",), on_lost=RETRY, weight=10)
GRAPH = Graph((FINETUNE, REGISTER, GENERATE, SCORE, _compare(("score", "register")), PROMOTE, EXPORT))
GRAPH_WITH_EXPORT = Graph((*GRAPH.steps, EXPORT_AT_END))
# A sweep's trial: its parent registers and promotes the winner only.
TRIAL_GRAPH = Graph((FINETUNE, GENERATE, SCORE, _compare(("score",))))


class FinetuneKind(Kind):
    name = RunKind.FINETUNE
    label = "Fine-tune + evaluate"
    config_model = FinetuneConfig
    path = (RunStatus.PENDING, TRAINING, EVALUATING, RunStatus.COMPLETED)
    sections = frozenset({"training", "data_check", "overlap", "playground", "registry"})
    config_sections = ("name", "kind", "model", "datasets", "training", "evaluation", "promotion", "export")

    def graph(self, config: Mapping[str, Any], *, has_parent: bool = False) -> Graph:
        if has_parent:
            return TRIAL_GRAPH
        return GRAPH_WITH_EXPORT if config.get("export") else GRAPH

    def main_variant(self, config: Mapping[str, Any]) -> str:
        return Variant.FINETUNED

    def generated_variants(self, config: Mapping[str, Any]) -> list[str]:
        return ordered_variants([Variant.FINETUNED] + ([Variant.BASE] if config["evaluation"]["compare_base"] else []))


KIND = FinetuneKind()
