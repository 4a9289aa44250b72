"""The export check's statistics: agreement of answers and TOST verdicts (statsmodels)."""

from __future__ import annotations

import numpy as np
import pytest
from statsmodels.stats.weightstats import ttost_paired

from evaluation.equivalence import (
    EQUIVALENT,
    INCONCLUSIVE,
    NOT_EQUIVALENT,
    agreement,
    compare_scores,
    equivalence_test,
    overall_verdict,
)


def test_agreement_counts_identical_answers_and_lists_the_others():
    agreed = agreement(["a", "b", "c", "d"], ["a", "b!", "c", "e"])
    assert (agreed.rows, agreed.identical, agreed.differing, agreed.share) == (4, 2, [1, 3], 0.5)
    with pytest.raises(ValueError, match="3 reference answers but 2"):
        agreement(["a", "b", "c"], ["a", "b"])


def test_the_same_scores_are_equivalent_without_a_test():
    result = equivalence_test([0.2, 0.5, None, 0.9], [0.2, 0.5, 0.4, 0.9], margin=0.01)
    assert (result.verdict, result.n_pairs, result.n_excluded, result.delta, result.p_value) == (EQUIVALENT, 3, 1, 0.0, 0.0)
    assert "every paired difference is 0" in result.method


def test_small_noise_well_inside_the_margin_is_equivalent_and_the_p_value_is_statsmodels():
    adapter = [0.30 + 0.01 * (i % 7) for i in range(50)]
    exported = [a + (0.002 if i % 2 else -0.002) for i, a in enumerate(adapter)]
    result = equivalence_test(adapter, exported, margin=0.01)
    assert result.verdict == EQUIVALENT
    assert result.p_value == pytest.approx(ttost_paired(np.array(exported), np.array(adapter), -0.01, 0.01)[0])
    assert -0.01 < result.ci_low < result.ci_high < 0.01


def test_a_shift_beyond_the_margin_is_not_equivalent():
    adapter = [0.3 + 0.01 * (i % 5) for i in range(40)]
    exported = [a - 0.05 + 0.001 * (i % 3) for i, a in enumerate(adapter)]
    result = equivalence_test(adapter, exported, margin=0.01)
    assert result.verdict == NOT_EQUIVALENT and result.ci_high < -0.01


def test_too_much_spread_on_few_rows_is_inconclusive():
    result = equivalence_test([0.1, 0.9, 0.5, 0.3], [0.3, 0.6, 0.6, 0.2], margin=0.01)
    assert result.verdict == INCONCLUSIVE and result.ci_low < -0.01 < result.ci_high
    assert equivalence_test([0.5], [0.7]).verdict == INCONCLUSIVE
    assert equivalence_test([None, None], [0.1, 0.2]).verdict == INCONCLUSIVE


def test_the_overall_verdict_is_the_worst_one():
    assert overall_verdict([EQUIVALENT, EQUIVALENT]) == EQUIVALENT
    assert overall_verdict([EQUIVALENT, INCONCLUSIVE]) == INCONCLUSIVE
    assert overall_verdict([INCONCLUSIVE, NOT_EQUIVALENT, EQUIVALENT]) == NOT_EQUIVALENT
    assert overall_verdict([]) == INCONCLUSIVE
    compared = compare_scores({"rouge_score": [0.1, 0.2], "bleu_score": [0.3, 0.4]}, {"rouge_score": [0.1, 0.2]})
    assert list(compared) == ["rouge_score"]
