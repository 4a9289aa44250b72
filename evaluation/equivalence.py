"""Does an exported model answer like the adapter it came from? Agreement of answers, and an equivalence test of scores.

Two questions, two answers:

- **agreement**: the share of eval rows whose greedy answer is the very same
  text (the rows that differ are shown side by side);
- **equivalence** per (eval dataset, metric): the paired score differences
  (export - adapter, row by row, rows measured for both) tested with TOST, two
  one-sided t-tests against the margin (statsmodels' `ttost_paired`), at
  alpha 0.05, so its interval is the 90% t-interval of the mean difference:
  `equivalent` when that interval lies inside (-margin, +margin) (TOST p < 0.05),
  `not equivalent` when it lies wholly outside [-margin, +margin] (the
  difference is significantly larger than the margin), `inconclusive` otherwise
  (too few pairs or too much spread to tell). Rows whose scores are identical
  for both make differences of exactly zero: with every difference zero the
  verdict is `equivalent` without a test (the scores are the same numbers).

The overall verdict of a form: `not equivalent` if any metric is, `equivalent`
if every metric is, else `inconclusive`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

EQUIVALENT, NOT_EQUIVALENT, INCONCLUSIVE = "equivalent", "not equivalent", "inconclusive"
VERDICTS = (EQUIVALENT, NOT_EQUIVALENT, INCONCLUSIVE)
ALPHA = 0.05
DEFAULT_MARGIN = 0.01


@dataclass(frozen=True)
class Agreement:
    rows: int
    identical: int
    differing: list[int]  # positions (in the order given) whose answers differ

    @property
    def share(self) -> float | None:
        return self.identical / self.rows if self.rows else None


def agreement(reference: Sequence[str], exported: Sequence[str]) -> Agreement:
    """Exact-text agreement of two answer lists of the same rows."""
    if len(reference) != len(exported):
        raise ValueError(f"{len(reference)} reference answers but {len(exported)} exported ones")
    differing = [i for i, (a, b) in enumerate(zip(reference, exported, strict=True)) if a != b]
    return Agreement(rows=len(reference), identical=len(reference) - len(differing), differing=differing)


@dataclass(frozen=True)
class Equivalence:
    n_pairs: int
    n_excluded: int  # rows where either form was not measured
    adapter_mean: float | None
    export_mean: float | None
    delta: float | None  # mean of export - adapter
    ci_low: float | None  # the 90% t-interval of the mean difference (TOST's interval at alpha 0.05)
    ci_high: float | None
    p_value: float | None  # TOST: the larger of the two one-sided p-values
    margin: float
    verdict: str
    method: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite(value: float | None) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def equivalence_test(adapter: Sequence[float | None], exported: Sequence[float | None], *, margin: float = DEFAULT_MARGIN,
                     alpha: float = ALPHA) -> Equivalence:
    """TOST of export - adapter against (-margin, +margin), on the rows measured for both."""
    import numpy as np
    from statsmodels.stats.weightstats import DescrStatsW, ttost_paired

    pairs = [(float(a), float(e)) for a, e in zip(adapter, exported, strict=True) if _finite(a) and _finite(e)]
    excluded = len(adapter) - len(pairs)
    if not pairs:
        return Equivalence(0, excluded, None, None, None, None, None, None, margin, INCONCLUSIVE, "no row measured for both")
    base = np.array([a for a, _ in pairs])
    export = np.array([e for _, e in pairs])
    differences = export - base
    means = (float(base.mean()), float(export.mean()))
    delta = float(differences.mean())
    if not differences.any():
        return Equivalence(len(pairs), excluded, *means, 0.0, 0.0, 0.0, 0.0, margin, EQUIVALENT,
                           "every paired difference is 0: the same scores")
    if len(pairs) < 2:
        return Equivalence(len(pairs), excluded, *means, delta, None, None, None, margin, INCONCLUSIVE, "too few pairs for a test")
    p_value = float(ttost_paired(export, base, -margin, margin)[0])
    low, high = DescrStatsW(differences).tconfint_mean(alpha=2 * alpha)
    low, high = float(low), float(high)
    if p_value < alpha and -margin < low and high < margin:
        verdict = EQUIVALENT
    elif low > margin or high < -margin:
        verdict = NOT_EQUIVALENT
    else:
        verdict = INCONCLUSIVE
    return Equivalence(len(pairs), excluded, *means, delta, low, high, p_value, margin, verdict,
                       f"TOST, paired t-tests (statsmodels ttost_paired), alpha {alpha:g}; {100 * (1 - 2 * alpha):.0f}% t-interval")


def overall_verdict(verdicts: Sequence[str]) -> str:
    if not verdicts:
        return INCONCLUSIVE
    if NOT_EQUIVALENT in verdicts:
        return NOT_EQUIVALENT
    return EQUIVALENT if all(v == EQUIVALENT for v in verdicts) else INCONCLUSIVE


def compare_scores(adapter: Mapping[str, Sequence[float | None]], exported: Mapping[str, Sequence[float | None]], *,
                   margin: float = DEFAULT_MARGIN) -> dict[str, Equivalence]:
    """{metric: Equivalence} for the metrics scored for both, rows in the same order."""
    return {m: equivalence_test(adapter[m], exported[m], margin=margin) for m in adapter if m in exported}
