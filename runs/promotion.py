"""The MLflow registry: a fine-tune's version registered, the promotion gate's decision, the `champion` alias.

Three jobs of the fine-tune graph (runs/kinds/finetune.py) and the staff's
hand, each recorded in the database before MLflow hears of it:

- `register_step` logs the adapter as a pyfunc model and registers a version.
  Idempotent: a version made from this MLflow run already is reused, so a job
  sent again after a lost worker does not register twice. If the run ended
  meanwhile, the engine deletes any version of the run the database does not
  record (`forget_unrecorded_versions`).
- `compare_and_gate` (the compare step's body) pairs fine-tuned with base scores
  and decides whether the new version becomes `champion` (evaluation/promotion.py's
  rule); the decision is stored with the comparisons, in one transaction.
- `promote_step` applies recorded decisions to MLflow (alias, version tags) and
  marks them applied; it is idempotent, and the reaper applies what a lost job left.

Staff promote or demote by hand (run page, API): the decision is recorded, then
applied after commit the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.db import transaction

from . import tracking
from .models import PipelineRun, PromotionDecision, RunStatus
from .selectors import run_sample_scores
from .services import run_mark_decisions_applied, run_record_promotion

if TYPE_CHECKING:  # numpy and scipy: the worker has them, the web image need not (manual promotion needs neither)
    from evaluation.significance import PairedComparison

    from .step_io import StepContext

log = logging.getLogger(__name__)


class PromotionRefused(Exception):
    """A manual promotion or demotion that cannot apply to this run (HTTP 409)."""


# --- register


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    reused: bool


def register_step(ctx: StepContext) -> Registered:
    """The fine-tuned model as an MLflow pyfunc model and a new version of its registered model (or the one it has)."""
    from .step_io import example_rows

    run = ctx.run
    name = tracking.registered_model_name(base_model=run.base_model, train_datasets=run.config["datasets"]["train"])
    existing = tracking.versions_of_run(name, run.mlflow_run_id)
    if existing:
        ctx.log(f"registry: version {existing[0]} of {name} was registered from this run already; reusing it")
        return Registered(name=name, version=existing[0], reused=True)
    ctx.progress(0.1, "logging the fine-tuned model to MLflow (pyfunc) and registering it")
    model_uri = tracking.log_answer_model(run, adapter_dir=ctx.adapter_dir(), example_rows=example_rows(ctx))
    version = tracking.register_model(name=name, model_uri=model_uri, mlflow_run_id=run.mlflow_run_id, description=f"{run.name} (run #{run.pk})")
    return Registered(name=name, version=version, reused=False)


def forget_unrecorded_versions(run_id: int) -> list[str]:
    """Delete the registered versions made from this run that the database does not record (a run that ended
    while its register job worked); returns them. Never the champion."""
    run = PipelineRun.objects.only("mlflow_run_id", "base_model", "config", "registered_model_version", "status").get(pk=run_id)
    if not run.mlflow_run_id or "train" not in run.config.get("datasets", {}):
        return []
    name = tracking.registered_model_name(base_model=run.base_model, train_datasets=run.config["datasets"]["train"] or [])
    champion = tracking.champion_version(name)
    stray = [v for v in tracking.versions_of_run(name, run.mlflow_run_id)
             if v != run.registered_model_version and not (champion and champion[0] == v)]
    for version in stray:
        tracking.delete_version(name, version)
        log.info("run %s ended: deleted %s version %s, which the database does not record", run_id, name, version)
    return stray


# --- compare and decide


@dataclass(frozen=True)
class GateDecision:
    model_name: str
    model_version: str
    decision: str
    alias: str
    reason: str


@dataclass(frozen=True)
class Compared:
    comparisons: dict[str, dict[str, PairedComparison]]
    decision: GateDecision | None
    power: dict[str, dict[str, dict[str, Any]]]  # {dataset: {metric: evaluation.power.power_report}}


def compare_and_gate(ctx: StepContext) -> Compared:
    """The compare step: fine-tuned vs base (evaluation/steps.py), then the gate's decision for the new version."""
    from evaluation.power import difference_spread, power_report
    from evaluation.steps import compare_step

    comparisons = compare_step(ctx)
    power = {dataset: {metric: power_report(n=n, sd=sd) for metric, (n, sd) in
                       ((m, difference_spread(pairs)) for m, pairs in by_metric.items())}
             for dataset, by_metric in ctx.paired_scores().items()}
    run = ctx.run
    run.refresh_from_db(fields=["registered_model_name", "registered_model_version"])
    gated = bool(run.registered_model_name and run.config.get("promotion") and run.parent_id is None)
    return Compared(comparisons=comparisons, decision=gate_decision(run=run, comparisons=comparisons) if gated else None, power=power)


def champion_comparisons(run: PipelineRun, datasets: list[str]) -> dict[str, dict[str, PairedComparison]] | None:
    """This run's fine-tuned scores vs the current champion's, paired by row, where both scored the same eval data.

    None when the registered model has no champion (or this run's version is it).
    """
    from evaluation.significance import compare_metrics, pair_by_index

    champion = tracking.champion_version(run.registered_model_name)
    if champion is None or champion[1] == run.mlflow_run_id:
        return None
    holder = PipelineRun.objects.filter(mlflow_run_id=champion[1]).first()
    if holder is None:
        return {}
    seed = (run.config.get("training") or {}).get("seed", 0)
    out: dict[str, dict[str, PairedComparison]] = {}
    for dataset in datasets:
        same_data = (run.reproducibility.get("datasets") or {}).get(dataset) == (holder.reproducibility.get("datasets") or {}).get(dataset)
        mine, theirs = run_sample_scores(run, dataset_name=dataset, variant="finetuned"), run_sample_scores(holder, dataset_name=dataset, variant="finetuned")
        metrics = sorted(set(mine) & set(theirs))
        if same_data and metrics:
            out[dataset] = compare_metrics({m: pair_by_index(theirs[m], mine[m]) for m in metrics}, seed=seed)
    return out


def gate_decision(*, run: PipelineRun, comparisons: dict[str, dict[str, PairedComparison]]) -> GateDecision:
    """The gate, for the run's new registered version (reads only: the decision is stored, then applied)."""
    from evaluation.promotion import decide_promotion

    gate = run.config["promotion"]
    gated = sorted(comparisons) if gate["datasets"] == "all" else list(gate["datasets"])
    decision = decide_promotion(
        comparisons=comparisons, gate_metric=gate["metric"], gate_datasets=gate["datasets"], min_delta=gate["min_delta"],
        champion_comparisons=champion_comparisons(run, gated),
    )
    promoted = PromotionDecision.Decision.PROMOTED if decision.promote else PromotionDecision.Decision.REJECTED
    return GateDecision(model_name=run.registered_model_name, model_version=run.registered_model_version, decision=promoted,
                        alias=tracking.CHAMPION if decision.promote else "", reason=decision.reason)


# --- apply decisions to MLflow


def promote_step(ctx: StepContext) -> dict[str, Any]:
    """The promote job: MLflow gets the run's recorded decisions (alias, version tags)."""
    applied = apply_decisions(run_id=ctx.run_id)
    return {"applied": applied}


def apply_decisions(*, run_id: int) -> list[int]:
    """Apply the run's recorded, not yet applied decisions to MLflow, oldest first; mark them applied.

    Idempotent. A decision older than one already applied to the same registered
    model does not move the alias back (its tags are still written).
    """
    applied = []
    for decision in PromotionDecision.objects.filter(run_id=run_id, applied_at__isnull=True).select_related("by").order_by("at", "id"):
        newer = PromotionDecision.objects.filter(model_name=decision.model_name, applied_at__isnull=False, at__gt=decision.at).exists()
        if not newer:
            if decision.alias == tracking.CHAMPION:
                tracking.set_champion(decision.model_name, decision.model_version)
            elif decision.decision == PromotionDecision.Decision.DEMOTED:
                champion = tracking.champion_version(decision.model_name)
                if champion and champion[0] == decision.model_version:
                    tracking.remove_champion(decision.model_name)
        tracking.set_version_tags(decision.model_name, decision.model_version, {
            "promotion": decision.reason, "promotion.decision": decision.decision,
            "promotion.by": decision.by.get_username() if decision.by else "gate",
        })
        run_mark_decisions_applied(decision_ids=[decision.pk])
        applied.append(decision.pk)
    return applied


def apply_pending_decisions() -> list[int]:
    """The reaper's pass: decisions recorded but not applied (MLflow was down, the applying process died)."""
    from datetime import timedelta

    from django.utils import timezone

    pending = PromotionDecision.objects.filter(applied_at__isnull=True, at__lt=timezone.now() - timedelta(seconds=30))
    done: list[int] = []
    for run_id in pending.values_list("run_id", flat=True).distinct():
        try:
            done += apply_decisions(run_id=run_id)
        except Exception:  # MLflow still unreachable: the next pass tries again.
            log.warning("run %s: could not apply its promotion decisions to MLflow yet", run_id, exc_info=True)
    return done


# --- by hand


def promote_by_hand(*, run: PipelineRun, user, reason: str) -> PromotionDecision:
    _check_manual(run, reason)
    return _record_and_apply(run, PromotionDecision.Decision.PROMOTED, alias=tracking.CHAMPION,
                             reason=f"promoted by {user.get_username()}: {reason}", by=user)


def demote_by_hand(*, run: PipelineRun, user, reason: str) -> PromotionDecision:
    _check_manual(run, reason)
    champion = tracking.champion_version(run.registered_model_name)
    if champion is None or champion[0] != run.registered_model_version:
        raise PromotionRefused(f"{run.registered_model} is not the champion; nothing to demote")
    return _record_and_apply(run, PromotionDecision.Decision.DEMOTED, alias="", reason=f"demoted by {user.get_username()}: {reason}", by=user)


def _check_manual(run: PipelineRun, reason: str) -> None:
    if not run.registered_model_name:
        raise PromotionRefused(f"run {run.pk} has no registered model version")
    if run.status != RunStatus.COMPLETED:
        raise PromotionRefused(f"run {run.pk} is '{run.status}': only a completed run's version can be promoted or demoted")
    if not reason.strip():
        raise PromotionRefused("say why (reason)")


def _record_and_apply(run: PipelineRun, decision: str, *, alias: str, reason: str, by) -> PromotionDecision:
    """Recorded first; MLflow gets it after commit (and, if MLflow is down then, from the reaper's next pass)."""
    with transaction.atomic():
        row = run_record_promotion(
            run_id=run.pk, model_name=run.registered_model_name, model_version=run.registered_model_version,
            decision=decision, alias=alias, reason=reason, automatic=False, by=by,
        )
    try:
        apply_decisions(run_id=run.pk)
    except Exception:
        log.warning("run %s: the decision is recorded; MLflow gets it on the reaper's next pass", run.pk, exc_info=True)
    row.refresh_from_db()
    return row
