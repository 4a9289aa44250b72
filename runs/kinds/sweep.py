"""The sweep kind: many fine-tunes as one experiment, a winner chosen without fooling ourselves.

    plan (cpu) ──> trial:<n> ... (child fine-tune runs, `parallel` in flight) ──> pick (cpu) ──> register ──> compare ──> promote
                     └─ each ends ──> tell:<n> (cpu): Optuna hears its selection score; the next trial starts

Trials are child runs of kind finetune (their graphs stop at `compare`: they never register or compete for
`champion`), chosen by Optuna (grid, random, TPE) over any numeric or choice field of the training config.
The objective is each child's selection score (config `selection`, required), never an eval score. The sweep
then carries the winner's answers, scores and comparisons (`pick`), registers the winner's adapter and runs the
promotion gate like a fine-tune: its claim is the winner's paired comparison with the base on the eval
datasets, which no trial was chosen on.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import ValidationError, model_validator

from ..config import PromotionConfig, RunConfig, SelectionConfig, TrainingConfig
from ..models import RunKind, RunStatus, Variant, ordered_variants
from ..promotion import compare_and_gate, promote_step, register_step
from ..step_io import publish_comparisons, store_comparisons, store_registration
from ..sweeps import field_kind, pick_step, plan_step, store_winner, tell_step, trial_config
from .base import CPU, NO_QUEUE, RETRY, Graph, Kind, Step

TRAINING, EVALUATING = RunStatus.TRAINING, RunStatus.EVALUATING


class SweepConfig(RunConfig):
    kind: Literal["sweep"]

    @model_validator(mode="after")
    def _sweep_rules(self) -> SweepConfig:
        if self.sweep is None:
            raise ValueError("sweep: a sweep needs its sweep section: {method, space, trials, parallel, seed}")
        if not self.datasets.train:
            raise ValueError("datasets.train: a sweep fine-tunes: it needs at least one train dataset")
        if self.training is None:
            self.training = TrainingConfig()
        if self.evaluation.answers != "generate":
            raise ValueError("evaluation.answers: a sweep scores generated answers; use 'generate'")
        if self.selection is None:
            raise ValueError("selection: a sweep picks its winner on the selection rows' scores, never on an eval score: "
                             "set selection (e.g. {} for the defaults)")
        if self.promotion is None:
            self.promotion = PromotionConfig()
        self._space_rules()
        # A trial is a fine-tune: its config (the sweep's, with one point of the space) passes the fine-tune's rules.
        base = _fine_tune(self.model_dump(mode="json"), {})
        self.selection = SelectionConfig.model_validate(base["selection"])
        self.promotion = PromotionConfig.model_validate(base["promotion"])
        return self

    def _space_rules(self) -> None:
        sweep = self.sweep
        for path, spec in sweep.space.items():
            field = f"sweep.space.{path}"
            if not path.startswith("training.") or path in ("training.seed", "training.max_attempts", "training.validation_dataset"):
                raise ValueError(f"{field}: a sweep varies the training config's numbers and choices (training.learning_rate, "
                                 "training.epochs, training.lora.r, ...), not this path")
            try:
                kind, _ = field_kind(path)
            except (KeyError, TypeError):
                raise ValueError(f"{field}: not a field of the training config") from None
            if isinstance(spec, list):
                values = spec
            else:
                if kind == "choice":
                    raise ValueError(f"{field}: a choice field takes a list of values, not a range")
                if sweep.method == "grid":
                    raise ValueError(f"{field}: a grid sweep takes a list of values; a range {{low, high}} needs method random or tpe")
                values = [int(spec.low), int(spec.high)] if kind == "int" else [spec.low, spec.high]
            for value in values:
                try:
                    _fine_tune(self.model_dump(mode="json", exclude={"sweep"}), {path: value})
                except ValueError as exc:
                    raise ValueError(f"{field}: the value {value!r} makes an invalid trial ({exc})") from None
        if sweep.method == "grid":
            points = len(list(itertools.product(*sweep.space.values())))
            if points > sweep.trials:
                raise ValueError(f"sweep.trials: the grid has {points} points but trials is {sweep.trials}: "
                                 f"raise sweep.trials to {points} or shrink the space")


def _fine_tune(config: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's config validated as a fine-tune; ValueError with the fine-tune's message otherwise."""
    from .finetune import FinetuneConfig

    try:
        return FinetuneConfig.model_validate(trial_config({**config, "name": config.get("name") or "sweep"}, params, 0)).model_dump(mode="json")
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}") from None


GRAPH = Graph((
    Step("plan", CPU, TRAINING, plan_step, "starting the trials", on_lost=RETRY, weight=85),
    # (the sweep's progress bar moves as trials end: tell_step sets it)
    Step("trial", NO_QUEUE, TRAINING, None, "a trial (a child fine-tune)", spawned_by="plan", tolerate_failure=True, weight=0),
    Step("tell", CPU, TRAINING, tell_step, "telling Optuna a trial's score, starting the next", follows="trial", on_lost=RETRY, weight=0),
    Step("pick", CPU, EVALUATING, pick_step, "choosing the winner", store=store_winner, after=("plan", "trial", "tell"), on_lost=RETRY, weight=2),
    Step("register", CPU, EVALUATING, register_step, "registering the winner", store=store_registration, after=("pick",), on_lost=RETRY,
         weight=5),
    Step("compare", CPU, EVALUATING, compare_and_gate, "the winner against its base and the promotion gate", publish=publish_comparisons,
         store=store_comparisons, after=("register",), on_lost=RETRY, weight=2),
    Step("promote", CPU, EVALUATING, promote_step, "the registry's alias", after=("compare",), on_lost=RETRY, weight=1),
))


class SweepKind(Kind):
    name = RunKind.SWEEP
    label = "Sweep: many fine-tunes, one winner"
    config_model = SweepConfig
    path = (RunStatus.PENDING, TRAINING, EVALUATING, RunStatus.COMPLETED)
    sections = frozenset({"sweep", "playground", "registry", "overlap"})
    config_sections = ("name", "kind", "model", "datasets", "training", "evaluation", "selection", "sweep", "promotion")

    def graph(self, config: Mapping[str, Any], *, has_parent: bool = False) -> Graph:
        return GRAPH

    def data_check_config(self, config: Mapping[str, Any]) -> dict[str, Any] | None:
        """A trial's data: the sweep's config without a point of the space (the rows do not depend on it)."""
        return trial_config(config, {}, 0)

    def main_variant(self, config: Mapping[str, Any]) -> str:
        return Variant.FINETUNED

    def generated_variants(self, config: Mapping[str, Any]) -> list[str]:
        return ordered_variants([Variant.FINETUNED] + ([Variant.BASE] if config["evaluation"]["compare_base"] else []))


KIND = SweepKind()

