"""What a paired comparison can see (evaluation/power.py): the minimal detectable difference and the rows needed,
checked against statsmodels' own power function, including differences that hardly vary (a sweep trial's compare
failed on them with `cannot convert float NaN to integer`)."""

from __future__ import annotations

import math
import warnings

import pytest
from statsmodels.stats.power import TTestPower

from evaluation.power import describe, difference_spread, minimal_detectable_difference, power_report, rows_needed


def power_at(*, difference: float, sd: float, n: int) -> float:
    return float(TTestPower().power(effect_size=difference / sd, nobs=n, alpha=0.05, alternative="two-sided"))


def test_the_minimal_detectable_difference_is_found_80_percent_of_the_time():
    mdd = minimal_detectable_difference(n=50, sd=0.1)
    assert mdd == pytest.approx(0.0404, abs=1e-3)
    assert power_at(difference=mdd, sd=0.1, n=50) == pytest.approx(0.8, abs=1e-6)
    assert describe(power_report(n=50, sd=0.1)) == "with 50 pairs this test detects ±0.040 or more 80% of the time"


@pytest.mark.parametrize("sd", [0.006, 0.05, 0.1, 0.3])
def test_rows_needed_is_the_smallest_n_with_80_percent_power(sd):
    n = rows_needed(target=0.02, sd=sd)
    assert power_at(difference=0.02, sd=sd, n=n) >= 0.8
    assert n == 2 or power_at(difference=0.02, sd=sd, n=n - 1) < 0.8


def test_differences_that_hardly_vary_need_two_rows_and_never_raise():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels says its root finder did not converge: that is the case handled
        report = power_report(n=10, sd=0.0003)
    assert report["rows_for"] == {"0.01": 2, "0.02": 2, "0.05": 2}
    assert report["mdd"] is not None and math.isfinite(report["mdd"]) and report["mdd"] < 0.001


def test_no_spread_or_too_few_pairs_say_so():
    assert minimal_detectable_difference(n=1, sd=0.1) is None
    assert minimal_detectable_difference(n=10, sd=None) is None
    assert minimal_detectable_difference(n=10, sd=0.0) == 0.0
    assert rows_needed(target=0.01, sd=0.0) is None and rows_needed(target=0.0, sd=0.1) is None
    assert describe(power_report(n=1, sd=None)) == ""
    assert difference_spread(([0.1, None, 0.3], [0.2, 0.5, float("nan")])) == (1, None)
    n, sd = difference_spread(([0.1, 0.2, 0.3], [0.2, 0.2, 0.5]))
    assert n == 3 and sd == pytest.approx(0.1)
