"""How small a difference an eval set can see: the paired t-test's power (statsmodels), from the spread of the
per-row differences of a scored run.

The minimal detectable difference is the smallest mean paired difference that a two-sided test at `alpha` finds
with probability `power` on `n` pairs whose differences have standard deviation `sd`: statsmodels solves the
t-test's power equation for the effect size d, and the difference is d * sd. The rows needed for a target
difference solve the same equation for n.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

ALPHA = 0.05
POWER = 0.8


def difference_spread(pairs: tuple[Sequence[float | None], Sequence[float | None]]) -> tuple[int, float | None]:
    """(pairs measured in both, the standard deviation of their differences) of (base scores, fine-tuned scores)."""
    differences = [t - b for b, t in zip(*pairs, strict=True) if b is not None and t is not None and not (math.isnan(b) or math.isnan(t))]
    if len(differences) < 2:
        return len(differences), None
    mean = sum(differences) / len(differences)
    return len(differences), math.sqrt(sum((d - mean) ** 2 for d in differences) / (len(differences) - 1))


def minimal_detectable_difference(*, n: int, sd: float | None, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """The smallest mean paired difference detected with probability `power` on `n` pairs (None: too few, or no spread)."""
    from statsmodels.stats.power import TTestPower

    if sd is None or n < 2:
        return None
    if sd == 0:
        return 0.0
    effect = float(TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power, alternative="two-sided"))
    return effect * sd if math.isfinite(effect) else None


def rows_needed(*, target: float, sd: float | None, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Pairs needed to detect a mean difference of `target` with probability `power` (None without a spread)."""
    from statsmodels.stats.power import TTestPower

    if sd is None or sd == 0 or target <= 0:
        return None
    test = TTestPower()
    smallest = float(test.power(effect_size=target / sd, nobs=2, alpha=alpha, alternative="two-sided"))
    if math.isnan(smallest) or smallest >= power:
        # The differences hardly vary: two pairs already see the target (the noncentral t overflows to NaN only
        # for such huge effects), and the solver finds no root below that.
        return 2
    n = float(test.solve_power(effect_size=target / sd, nobs=None, alpha=alpha, power=power, alternative="two-sided"))
    return math.ceil(n) if math.isfinite(n) else None


def power_report(*, n: int, sd: float | None, targets: Sequence[float] = (0.01, 0.02, 0.05)) -> dict[str, Any]:
    """What a paired comparison of `n` pairs can see: {"n", "sd_difference", "mdd", "power", "alpha", "rows_for": {target: n}}."""
    return {
        "n": n, "sd_difference": sd, "mdd": minimal_detectable_difference(n=n, sd=sd), "power": POWER, "alpha": ALPHA,
        "rows_for": {f"{t:g}": rows_needed(target=t, sd=sd) for t in targets},
    }


def describe(report: dict[str, Any] | None) -> str:
    """"with 50 pairs this test detects ±0.031 or more 80% of the time", or ""."""
    if not report or report.get("mdd") is None:
        return ""
    return f"with {report['n']} pairs this test detects ±{report['mdd']:.3f} or more {report['power']:.0%} of the time"
