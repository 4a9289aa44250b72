"""The registry's promotion gate, as a pure function of the run's comparisons.

A new version earns the `champion` alias only if, on every gated eval dataset:

1. the gate metric's verdict against its base is `better` and the mean paired
   difference reaches `min_delta`;
2. no other metric measured for both is `worse` than its base there (a style
   metric must not hide a loss in meaning);
3. it is not significantly worse than the current champion on any metric both
   were scored on there (`champion_comparisons`: new minus champion, paired by
   row; None when there is no champion yet). A comparison with too few pairs
   is no evidence either way and does not block.

Every failed check is named in the reason, so a rejection says all it found.
The caller (runs/) records the decision and mirrors it to the MLflow registry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from .significance import PairedComparison, Verdict, format_interval, format_p_value

Comparisons = Mapping[str, Mapping[str, PairedComparison]]  # {eval dataset: {metric: comparison}}


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str  # "promoted: ..." or "rejected: ...": the sentence for the version tag and the run page


def _described(metric: str, c: PairedComparison, dataset: str) -> str:
    return f"{metric} {format_interval(c.delta, c.ci_low, c.ci_high)} on {dataset}"


def _p(c: PairedComparison) -> str:
    return f"Holm-adjusted p={format_p_value(c.p_adjusted)}"


def _require_verdict(metric: str, dataset: str, c: PairedComparison) -> Verdict:
    if c.verdict is None:
        raise ValueError(f"the comparison of {metric} on {dataset} has no verdict (use compare_metrics)")
    return Verdict(c.verdict)


def decide_promotion(
    *,
    comparisons: Comparisons,
    gate_metric: str,
    gate_datasets: Sequence[str] | Literal["all"],
    min_delta: float,
    champion_comparisons: Comparisons | None,
) -> PromotionDecision:
    """Promote or not, with the sentence that says why (see the module docstring for the rule)."""
    datasets = sorted(comparisons) if gate_datasets == "all" else list(gate_datasets)
    if not datasets:
        return PromotionDecision(False, "rejected: no eval dataset compares base and fine-tuned")
    failures: list[str] = []
    passes: list[str] = []
    for dataset in datasets:
        by_metric = comparisons.get(dataset)
        gate = (by_metric or {}).get(gate_metric)
        if gate is None:
            failures.append(f"{gate_metric} was not measured for both base and fine-tuned on {dataset}")
            continue
        verdict = _require_verdict(gate_metric, dataset, gate)
        described = _described(gate_metric, gate, dataset)
        if verdict == Verdict.TOO_FEW_PAIRS:
            failures.append(f"{gate_metric} on {dataset} has too few pairs ({gate.n_pairs} measured for both)")
        elif verdict == Verdict.WORSE:
            failures.append(f"{described} is worse than the base ({_p(gate)})")
        elif verdict == Verdict.NO_SIGNIFICANT_DIFFERENCE:
            failures.append(f"{described} is not significant ({_p(gate)})")
        elif gate.delta is None or gate.delta < min_delta:
            failures.append(f"{described} is below the minimum gain {min_delta:+.3f}")
        else:
            passes.append(f"{described} ({_p(gate)})")
        for metric, other in sorted(by_metric.items()):
            if metric != gate_metric and _require_verdict(metric, dataset, other) == Verdict.WORSE:
                failures.append(f"{_described(metric, other, dataset)} is worse than the base ({_p(other)})")
        for metric, versus in sorted(((champion_comparisons or {}).get(dataset) or {}).items()):
            if _require_verdict(metric, dataset, versus) == Verdict.WORSE:
                failures.append(f"{_described(metric, versus, dataset)} is worse than the champion ({_p(versus)})")
    if failures:
        return PromotionDecision(False, "rejected: " + "; ".join(failures))
    reason = "promoted: " + "; ".join(passes)
    if champion_comparisons is None:
        reason += "; no champion yet"
    elif any((champion_comparisons.get(d) or {}) for d in datasets):
        reason += "; not significantly worse than the champion"
    else:
        reason += "; the champion has no per-sample scores on the same eval data"
    return PromotionDecision(True, reason)
