"""The promotion gate of the MLflow registry: who holds `champion`, decided and recorded.

After a fine-tune is compared with its base (the `compare` step), its new model
version gets the `champion` alias only if evaluation/promotion.py's rule says
so; otherwise no alias. Either way the version carries tags with the decision
and its reason, and a PromotionDecision row records it (who, why, when).
Staff can promote or demote a version by hand (run page, API); that is recorded
the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import tracking
from .models import PipelineRun, PromotionDecision, RunStatus
from .selectors import run_sample_scores
from .services import run_record_promotion

if TYPE_CHECKING:  # numpy and scipy: the worker has them, the web image need not (manual promotion needs neither)
    from evaluation.significance import PairedComparison


class PromotionRefused(Exception):
    """A manual promotion or demotion that cannot apply to this run (HTTP 409)."""


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


def decide_after_comparison(*, run: PipelineRun, comparisons: dict[str, dict[str, PairedComparison]]) -> PromotionDecision:
    """The gate, for the run's new registered version: alias (or not), version tags, the decision recorded."""
    from evaluation.promotion import decide_promotion

    gate = run.config["promotion"]
    gated = sorted(comparisons) if gate["datasets"] == "all" else list(gate["datasets"])
    decision = decide_promotion(
        comparisons=comparisons, gate_metric=gate["metric"], gate_datasets=gate["datasets"], min_delta=gate["min_delta"],
        champion_comparisons=champion_comparisons(run, gated),
    )
    name, version = run.registered_model_name, run.registered_model_version
    if decision.promote:
        tracking.set_champion(name, version)
    return _record(run, PromotionDecision.Decision.PROMOTED if decision.promote else PromotionDecision.Decision.REJECTED,
                   reason=decision.reason, automatic=True, by=None)


def promote_by_hand(*, run: PipelineRun, user, reason: str) -> PromotionDecision:
    _check_manual(run, reason)
    tracking.set_champion(run.registered_model_name, run.registered_model_version)
    return _record(run, PromotionDecision.Decision.PROMOTED, reason=f"promoted by {user.get_username()}: {reason}", automatic=False, by=user)


def demote_by_hand(*, run: PipelineRun, user, reason: str) -> PromotionDecision:
    _check_manual(run, reason)
    champion = tracking.champion_version(run.registered_model_name)
    if champion is None or champion[0] != run.registered_model_version:
        raise PromotionRefused(f"{run.registered_model} is not the champion; nothing to demote")
    tracking.remove_champion(run.registered_model_name)
    return _record(run, PromotionDecision.Decision.DEMOTED, reason=f"demoted by {user.get_username()}: {reason}", automatic=False, by=user)


def _check_manual(run: PipelineRun, reason: str) -> None:
    if not run.registered_model_name:
        raise PromotionRefused(f"run {run.pk} has no registered model version")
    if run.status != RunStatus.COMPLETED:
        raise PromotionRefused(f"run {run.pk} is '{run.status}': only a completed run's version can be promoted or demoted")
    if not reason.strip():
        raise PromotionRefused("say why (reason)")


def _record(run: PipelineRun, decision: str, *, reason: str, automatic: bool, by) -> PromotionDecision:
    champion = tracking.champion_version(run.registered_model_name)
    alias = tracking.CHAMPION if champion and champion[0] == run.registered_model_version else ""
    tags: dict[str, Any] = {"promotion": reason, "promotion.decision": decision, "promotion.by": by.get_username() if by else "gate"}
    tracking.set_version_tags(run.registered_model_name, run.registered_model_version, tags)
    return run_record_promotion(
        run_id=run.pk, model_name=run.registered_model_name, model_version=run.registered_model_version,
        decision=decision, alias=alias, reason=reason, automatic=automatic, by=by,
    )
