"""Paired significance: hand-checked small cases, exclusions, Holm, reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.significance import (
    PairedComparison,
    Verdict,
    compare_metrics,
    compare_paired,
    compare_runs,
    format_interval,
    format_p_value,
    holm_adjust,
    pair_by_index,
    verdict_for,
)


def scores(n: int, seed: int, low: float = 0.2, high: float = 0.6) -> list[float]:
    return np.random.default_rng(seed).uniform(low, high, n).tolist()


def test_identical_scores_give_a_zero_interval_and_no_significant_difference():
    base = scores(30, seed=1)
    result = compare_metrics({"rouge_score": (base, list(base))})["rouge_score"]
    assert (result.delta, result.ci_low, result.ci_high) == (0.0, 0.0, 0.0)
    assert result.p_value == 1.0
    assert result.p_adjusted == 1.0
    assert result.verdict == Verdict.NO_SIGNIFICANT_DIFFERENCE
    assert result.ci_method == "degenerate"
    assert result.interval == "+0.000 [+0.000, +0.000]"


def test_a_clear_shift_over_30_pairs_is_better():
    base = scores(30, seed=2)
    noise = np.random.default_rng(3).normal(0.0, 0.02, 30)
    finetuned = (np.array(base) + 0.1 + noise).tolist()
    result = compare_metrics({"rouge_score": (base, finetuned)})["rouge_score"]
    assert result.n_pairs == 30 and result.n_excluded == 0
    assert result.delta == pytest.approx(float(np.mean(np.array(finetuned) - np.array(base))))
    assert result.base_mean == pytest.approx(float(np.mean(base)))
    assert result.finetuned_mean == pytest.approx(float(np.mean(finetuned)))
    assert 0 < result.ci_low < result.delta < result.ci_high
    assert result.p_adjusted < 0.001
    assert result.verdict == Verdict.BETTER


def test_a_clear_drop_is_worse():
    base = scores(30, seed=4)
    finetuned = [b - 0.15 + 0.01 * (i % 3) for i, b in enumerate(base)]
    result = compare_metrics({"semantic_similarity": (base, finetuned)})["semantic_similarity"]
    assert result.ci_high < 0
    assert result.verdict == Verdict.WORSE


def test_unmeasured_pairs_are_excluded_and_counted():
    base = [0.1, None, 0.3, 0.4, float("nan"), 0.5]
    finetuned = [0.2, 0.5, None, 0.6, 0.7, 0.9]
    result = compare_paired(base, finetuned)
    assert result.n_pairs == 3  # rows 0, 3 and 5 have both scores
    assert result.n_excluded == 3
    assert result.base_mean == pytest.approx((0.1 + 0.4 + 0.5) / 3)
    assert result.finetuned_mean == pytest.approx((0.2 + 0.6 + 0.9) / 3)
    assert result.delta == pytest.approx((0.1 + 0.2 + 0.4) / 3)
    assert not any(isinstance(v, float) and math.isnan(v) for v in result.as_dict().values())


def test_fewer_than_ten_pairs_is_too_few_and_stays_out_of_the_holm_family():
    base, finetuned = scores(9, seed=5), [s + 0.3 for s in scores(9, seed=5)]
    big_base = scores(30, seed=6)
    results = compare_metrics({
        "rouge_score": (base, finetuned),
        "bleu_score": (big_base, [b + 0.2 for b in big_base]),
    })
    assert results["rouge_score"].verdict == Verdict.TOO_FEW_PAIRS
    assert results["rouge_score"].p_adjusted is None
    assert results["rouge_score"].p_value is not None  # computed, just not judged
    # A family of one: the other metric's p-value is not made stricter by the unjudged one.
    assert results["bleu_score"].p_adjusted == results["bleu_score"].p_value


def test_no_pair_at_all_is_too_few_pairs_without_numbers():
    result = compare_metrics({"faithfulness": ([None, None], [0.5, None])})["faithfulness"]
    assert (result.n_pairs, result.n_excluded) == (0, 2)
    assert result.delta is None and result.ci_low is None and result.p_value is None
    assert result.verdict == Verdict.TOO_FEW_PAIRS
    assert result.interval == "n/a"


def test_the_same_seed_gives_the_same_interval_and_p_value():
    base = scores(40, seed=7)
    finetuned = scores(40, seed=8)
    first = compare_paired(base, finetuned, seed=11)
    assert compare_paired(base, finetuned, seed=11) == first
    other = compare_paired(base, finetuned, seed=12)
    assert (other.ci_low, other.ci_high) != (first.ci_low, first.ci_high)


def test_the_permutation_p_value_is_exact_for_ten_pairs():
    # Ten distinct positive differences: of the 2**10 sign patterns only all-plus and
    # all-minus have a mean as far from 0 as the observed one.
    base = [0.0] * 10
    finetuned = [0.01 * (i + 1) for i in range(10)]
    result = compare_paired(base, finetuned)
    assert result.p_value == pytest.approx(2 / 2**10)


def test_holm_adjustment_matches_the_hand_computation():
    # Sorted: 0.01 * 3 = 0.03; 0.03 * 2 = 0.06; 0.04 * 1 = 0.04 -> raised to 0.06 (monotone).
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjust([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm_adjust([]) == []


def test_compare_metrics_holm_adjusts_across_the_metrics_of_a_dataset():
    rng = np.random.default_rng(9)
    base = rng.uniform(0.2, 0.6, (3, 30))
    shifts = [0.08, 0.03, 0.0]
    pairs = {f"m{i}": (base[i].tolist(), (base[i] + shifts[i] + rng.normal(0, 0.08, 30)).tolist()) for i in range(3)}
    results = compare_metrics(pairs)
    raw = [results[m].p_value for m in pairs]
    assert [results[m].p_adjusted for m in pairs] == pytest.approx(holm_adjust(raw))
    assert all(results[m].p_adjusted >= results[m].p_value for m in pairs)


def test_a_small_p_value_with_an_interval_across_zero_is_not_a_verdict():
    comparison = PairedComparison(n_pairs=30, n_excluded=0, base_mean=0.5, finetuned_mean=0.52, delta=0.02,
                                  ci_low=-0.001, ci_high=0.04, p_value=0.01)
    assert verdict_for(comparison, p_adjusted=0.01) == Verdict.NO_SIGNIFICANT_DIFFERENCE
    assert verdict_for(comparison, p_adjusted=0.01, min_pairs=31) == Verdict.TOO_FEW_PAIRS


def test_unequal_lengths_are_refused():
    with pytest.raises(ValueError, match="equal lengths"):
        compare_paired([0.1, 0.2], [0.1])


def test_compare_runs_pairs_by_row_index():
    a = {i: 0.3 + 0.01 * (i % 5) for i in range(35)}
    b = {i: 0.4 + 0.01 * (i % 5) for i in range(5, 40)}  # rows 0-4 only in a, 35-39 only in b
    a[10] = None
    result = compare_runs(a, b)
    assert result.n_pairs == 29  # rows 5..34 except 10
    assert result.n_excluded == 11
    assert result.delta == pytest.approx(0.1)
    assert result.verdict == Verdict.BETTER
    assert result.p_adjusted == result.p_value
    assert pair_by_index({1: 0.5, 0: 0.1}, {2: 0.7, 1: 0.6}) == ([0.1, 0.5, None], [None, 0.6, 0.7])


def test_format_interval_writes_signed_numbers_in_brackets():
    assert format_interval(0.029, -0.004, 0.060) == "+0.029 [-0.004, +0.060]"
    assert format_interval(-0.0001, -0.0004, 0.0) == "+0.000 [+0.000, +0.000]"  # no "-0.000"
    assert format_interval(0.1234, None, None) == "+0.123 [n/a]"
    assert format_interval(None, None, None) == "n/a"
    assert format_p_value(0.0004) == "<0.001"
    assert format_p_value(0.0312) == "0.031"
