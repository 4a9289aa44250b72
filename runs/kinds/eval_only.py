"""The eval-only kind: score a model's answers, or the answers stored in the eval file.

    generate (gpu) ──> score (cpu)        evaluation.answers: generate
                       score (cpu)        evaluation.answers: dataset
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import model_validator

from evaluation.steps import generate_step, score_step

from ..config import RunConfig
from ..models import RunKind, RunStatus, Variant
from ..step_io import publish_answers, publish_scores, store_answers, store_scores
from .base import CPU, GPU, RETRY, Graph, Kind, Step

EVALUATING = RunStatus.EVALUATING


class EvalOnlyConfig(RunConfig):
    kind: Literal["eval_only"]

    @model_validator(mode="after")
    def _eval_only_rules(self) -> EvalOnlyConfig:
        if self.promotion is not None:
            raise ValueError("promotion: applies to kind finetune only (it gates the fine-tuned model); remove it for eval_only")
        if self.training is not None:
            raise ValueError("training: applies to kind finetune only; remove it for eval_only")
        if self.sweep is not None:
            raise ValueError("sweep: applies to kind sweep only; remove it for eval_only")
        if self.selection is not None:
            raise ValueError("selection: applies to kind finetune only (it chooses a checkpoint of the training); remove it for eval_only")
        if self.datasets.train:
            raise ValueError("datasets.train: applies to kind finetune only; remove it for eval_only")
        if self.export is not None:
            raise ValueError("export: applies to kind finetune only (it exports the fine-tuned model); remove it for eval_only")
        return self


GENERATE = Step("generate", GPU, EVALUATING, generate_step, "answer generation", publish=publish_answers, store=store_answers, weight=50)
SCORE_GENERATED = Step("score", CPU, EVALUATING, score_step, "scoring", publish=publish_scores, store=store_scores,
                       after=("generate",), on_lost=RETRY, weight=50)
SCORE_STORED = Step("score", CPU, EVALUATING, score_step, "scoring", publish=publish_scores, store=store_scores, on_lost=RETRY, weight=100)

GENERATED_ANSWERS = Graph((GENERATE, SCORE_GENERATED))
STORED_ANSWERS = Graph((SCORE_STORED,))


def _stored(config: Mapping[str, Any]) -> bool:
    return config["evaluation"]["answers"] == "dataset"


class EvalOnlyKind(Kind):
    name = RunKind.EVAL_ONLY
    label = "Evaluate only"
    config_model = EvalOnlyConfig
    path = (RunStatus.PENDING, EVALUATING, RunStatus.COMPLETED)
    sections = frozenset()

    def graph(self, config: Mapping[str, Any], *, has_parent: bool = False) -> Graph:
        return STORED_ANSWERS if _stored(config) else GENERATED_ANSWERS

    def main_variant(self, config: Mapping[str, Any]) -> str:
        return Variant.DATASET if _stored(config) else Variant.BASE

    def generated_variants(self, config: Mapping[str, Any]) -> list[str]:
        return [] if _stored(config) else [Variant.BASE]

    def model_label(self, config: Mapping[str, Any], base_model: str) -> str:
        return "stored answers" if _stored(config) else base_model

    def config_applies(self, field: str, config: Mapping[str, Any]) -> bool:
        generation = field.startswith(("model", "evaluation.max_new_tokens", "evaluation.batch_size", "evaluation.compare_base"))
        return super().config_applies(field, config) and not (_stored(config) and generation)


KIND = EvalOnlyKind()
