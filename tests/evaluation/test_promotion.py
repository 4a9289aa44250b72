"""The promotion gate: one test per rule branch, and the sentence each decision carries."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.promotion import decide_promotion
from evaluation.significance import PairedComparison, Verdict, compare_metrics


def comparison(delta: float, low: float, high: float, verdict: Verdict, *, p: float = 0.003, n: int = 50) -> PairedComparison:
    return PairedComparison(n_pairs=n, n_excluded=0, base_mean=0.3, finetuned_mean=0.3 + delta, delta=delta,
                            ci_low=low, ci_high=high, p_value=p, p_adjusted=p, verdict=verdict)


BETTER = comparison(0.051, 0.012, 0.087, Verdict.BETTER)
NOT_SIGNIFICANT = comparison(0.029, -0.004, 0.060, Verdict.NO_SIGNIFICANT_DIFFERENCE, p=0.09)
FLAT = comparison(0.001, -0.010, 0.012, Verdict.NO_SIGNIFICANT_DIFFERENCE, p=0.8)
WORSE = comparison(-0.040, -0.070, -0.012, Verdict.WORSE, p=0.01)


def decide(comparisons, *, champion=None, datasets="all", min_delta=0.0, metric="rouge_score"):
    return decide_promotion(comparisons=comparisons, gate_metric=metric, gate_datasets=datasets,
                            min_delta=min_delta, champion_comparisons=champion)


def test_a_significant_gain_with_no_champion_is_promoted():
    decision = decide({"ragas_eval": {"rouge_score": BETTER, "semantic_similarity": FLAT}})
    assert decision.promote
    assert decision.reason == "promoted: rouge_score +0.051 [+0.012, +0.087] on ragas_eval (Holm-adjusted p=0.003); no champion yet"


def test_a_gain_that_is_not_significant_is_rejected_with_its_interval():
    decision = decide({"ragas_eval": {"rouge_score": NOT_SIGNIFICANT}})
    assert not decision.promote
    assert decision.reason.startswith("rejected: rouge_score +0.029 [-0.004, +0.060] on ragas_eval is not significant")


def test_a_gate_metric_worse_than_the_base_is_rejected():
    decision = decide({"ragas_eval": {"rouge_score": WORSE}})
    assert not decision.promote
    assert "rouge_score -0.040 [-0.070, -0.012] on ragas_eval is worse than the base" in decision.reason


def test_too_few_pairs_on_the_gate_metric_is_rejected():
    few = PairedComparison(n_pairs=7, n_excluded=43, base_mean=0.3, finetuned_mean=0.4, delta=0.1, ci_low=0.02,
                           ci_high=0.2, p_value=0.02, verdict=Verdict.TOO_FEW_PAIRS)
    decision = decide({"ragas_eval": {"rouge_score": few}})
    assert not decision.promote
    assert decision.reason == "rejected: rouge_score on ragas_eval has too few pairs (7 measured for both)"


def test_a_significant_gain_below_min_delta_is_rejected():
    decision = decide({"ragas_eval": {"rouge_score": BETTER}}, min_delta=0.06)
    assert not decision.promote
    assert "is below the minimum gain +0.060" in decision.reason


def test_another_metric_worse_than_the_base_blocks_the_promotion():
    decision = decide({"ragas_eval": {"rouge_score": BETTER, "semantic_similarity": WORSE}})
    assert not decision.promote
    assert decision.reason == (
        "rejected: semantic_similarity -0.040 [-0.070, -0.012] on ragas_eval is worse than the base (Holm-adjusted p=0.010)"
    )


def test_significantly_worse_than_the_champion_is_rejected():
    decision = decide({"ragas_eval": {"rouge_score": BETTER}}, champion={"ragas_eval": {"rouge_score": WORSE}})
    assert not decision.promote
    assert "on ragas_eval is worse than the champion" in decision.reason


def test_not_worse_than_the_champion_is_promoted():
    champion = {"ragas_eval": {"rouge_score": FLAT, "faithfulness": comparison(0.2, 0.1, 0.3, Verdict.TOO_FEW_PAIRS, n=4)}}
    decision = decide({"ragas_eval": {"rouge_score": BETTER}}, champion=champion)
    assert decision.promote
    assert decision.reason.endswith("; not significantly worse than the champion")


def test_a_champion_without_shared_scores_does_not_block_and_says_so():
    decision = decide({"ragas_eval": {"rouge_score": BETTER}}, champion={})
    assert decision.promote
    assert decision.reason.endswith("; the champion has no per-sample scores on the same eval data")


def test_every_gated_dataset_must_pass():
    comparisons = {"ragas_eval": {"rouge_score": BETTER}, "medical_ragas_eval": {"rouge_score": NOT_SIGNIFICANT}}
    assert not decide(comparisons).promote
    assert "on medical_ragas_eval is not significant" in decide(comparisons).reason
    only_ragas = decide(comparisons, datasets=["ragas_eval"])
    assert only_ragas.promote
    assert "medical_ragas_eval" not in only_ragas.reason


def test_a_dataset_outside_the_gate_does_not_block():
    comparisons = {"ragas_eval": {"rouge_score": BETTER}, "legal_ragas_eval": {"rouge_score": WORSE}}
    champion = {"legal_ragas_eval": {"rouge_score": WORSE}}
    assert decide(comparisons, datasets=["ragas_eval"], champion=champion).promote


def test_a_gated_dataset_without_the_gate_metric_is_rejected():
    decision = decide({"ragas_eval": {"semantic_similarity": BETTER}}, datasets=["ragas_eval", "legal_ragas_eval"])
    assert not decision.promote
    assert "rouge_score was not measured for both base and fine-tuned on ragas_eval" in decision.reason
    assert "rouge_score was not measured for both base and fine-tuned on legal_ragas_eval" in decision.reason


def test_no_compared_dataset_is_rejected():
    decision = decide({})
    assert not decision.promote
    assert decision.reason == "rejected: no eval dataset compares base and fine-tuned"


def test_every_failure_is_named():
    decision = decide(
        {"ragas_eval": {"rouge_score": NOT_SIGNIFICANT, "bleu_score": WORSE}},
        champion={"ragas_eval": {"semantic_similarity": WORSE}},
    )
    assert not decision.promote
    parts = decision.reason.removeprefix("rejected: ").split("; ")
    assert len(parts) == 3
    assert parts[0].startswith("rouge_score +0.029 [-0.004, +0.060] on ragas_eval is not significant")
    assert parts[1].startswith("bleu_score -0.040")
    assert parts[2].startswith("semantic_similarity -0.040") and "champion" in parts[2]


def test_a_comparison_without_a_verdict_is_a_programming_error():
    raw = PairedComparison(n_pairs=30, n_excluded=0, base_mean=0.3, finetuned_mean=0.4, delta=0.1, ci_low=0.05,
                           ci_high=0.15, p_value=0.001)
    with pytest.raises(ValueError, match="no verdict"):
        decide({"ragas_eval": {"rouge_score": raw}})


def test_the_gate_reads_what_compare_metrics_computes():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.5, 40)
    computed = compare_metrics({
        "rouge_score": (base.tolist(), (base + 0.05 + rng.normal(0, 0.02, 40)).tolist()),
        "semantic_similarity": (base.tolist(), (base + rng.normal(0, 0.02, 40)).tolist()),
    })
    decision = decide({"ragas_eval": computed})
    assert computed["rouge_score"].verdict == Verdict.BETTER
    assert decision.promote
    assert decision.reason.startswith(f"promoted: rouge_score {computed['rouge_score'].interval} on ragas_eval")
