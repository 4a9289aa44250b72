"""Paired significance of a score difference between two models on the same samples.

Free of Django: runs/ stores what these functions return (ScoreComparison) and
shows it; the CLI, the pages, the CSV and the promotion gate read the same numbers.

For every metric, with d_i = finetuned_i - base_i over the samples measured for
both (a sample either model could not be scored on is excluded and counted):

- the estimate is the mean paired difference;
- its confidence interval is a paired bootstrap over samples
  (`scipy.stats.bootstrap` on the differences, percentile method, seeded,
  vectorised): resampling the differences resamples whole samples, pairs kept.
  Percentile rather than BCa: BCa's acceleration is a jackknife estimate that
  on a few dozen bounded, discrete scores swings wildly (one exact-match gain
  in 12 samples gave a BCa upper bound of 0.42 where no plausible resample
  mean exceeds 0.25), it is undefined when the differences barely vary, and
  it costs O(n^2); the percentile interval is defined for any data and is
  the plain paired bootstrap interval. When all
  differences are equal (identical answers, say) every resample has the same
  mean, so the interval is exactly that value on both sides;
- its p-value is a two-sided paired permutation test of the same statistic
  (`scipy.stats.permutation_test`, permutation_type="samples": under the null
  hypothesis the two scores of a sample are exchangeable, so each pair is
  swapped or not, i.e. each difference keeps or flips its sign). It tests the
  mean difference the interval is about, rather than a rank statistic such as
  Wilcoxon's, whose zero-difference handling and tie corrections matter a lot
  for scores that are often exactly equal; exact (every sign pattern) while
  2**n_pairs <= resamples (13 pairs at 10,000), else Monte Carlo with `resamples` draws;
- the p-values of the metrics of one eval dataset are Holm-adjusted together,
  and a verdict is given: `better` / `worse` when the adjusted p-value is under
  alpha AND the interval excludes 0 on that side, `too few pairs` under
  `min_pairs`, otherwise `no significant difference`.

All metrics here are higher-is-better (every ragas score used is), so `better`
means the fine-tuned (or second) model scored higher.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 10_000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_ALPHA = 0.05
DEFAULT_MIN_PAIRS = 10
TEST_NAME = "paired permutation test of the mean difference (two-sided)"
# Resamples computed at once: bounds memory to about _BATCH x n_pairs floats on large eval sets.
_BATCH = 1000


class Verdict(StrEnum):
    BETTER = "better"
    WORSE = "worse"
    NO_SIGNIFICANT_DIFFERENCE = "no significant difference"
    TOO_FEW_PAIRS = "too few pairs"


@dataclass(frozen=True)
class PairedComparison:
    """base vs finetuned on the same samples; delta = mean(finetuned - base).

    Numbers are None when they cannot be computed (no pair at all, or a single
    pair for the interval and the test); p_adjusted and verdict are None until
    a verdict is given (compare_metrics, compare_runs, with_verdict).
    """

    n_pairs: int
    n_excluded: int
    base_mean: float | None
    finetuned_mean: float | None
    delta: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    p_adjusted: float | None = None
    verdict: Verdict | None = None
    confidence: float = DEFAULT_CONFIDENCE
    resamples: int = DEFAULT_RESAMPLES
    seed: int = 0
    ci_method: str = "percentile"  # or "degenerate" (all differences equal), "none" (fewer than 2 pairs)

    @property
    def interval(self) -> str:
        return format_interval(self.delta, self.ci_low, self.ci_high)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (verdict as its string)."""
        data = asdict(self)
        data["verdict"] = str(self.verdict) if self.verdict is not None else None
        return data


def _as_floats(values: Sequence[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=float)


def _mean_difference(finetuned: np.ndarray, base: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(finetuned - base, axis=axis)


def _mean(sample: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(sample, axis=axis)


def compare_paired(
    base: Sequence[float | None],
    finetuned: Sequence[float | None],
    *,
    seed: int = 0,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
) -> PairedComparison:
    """Mean paired difference, its bootstrap interval and a permutation p-value (no verdict yet).

    base[i] and finetuned[i] are the two scores of sample i; None or NaN on
    either side excludes the pair (counted in n_excluded).
    """
    from scipy import stats

    if len(base) != len(finetuned):
        raise ValueError(f"paired scores need equal lengths, got {len(base)} base and {len(finetuned)} fine-tuned")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError("resamples must be positive and confidence between 0 and 1")
    b, f = _as_floats(base), _as_floats(finetuned)
    measured = np.isfinite(b) & np.isfinite(f)
    b, f = b[measured], f[measured]
    n_pairs = int(measured.sum())
    common = {"n_pairs": n_pairs, "n_excluded": len(measured) - n_pairs, "confidence": confidence, "resamples": resamples, "seed": seed}
    if n_pairs == 0:
        return PairedComparison(base_mean=None, finetuned_mean=None, delta=None, ci_low=None, ci_high=None, p_value=None, ci_method="none", **common)
    differences = f - b
    delta = float(differences.mean())
    means = {"base_mean": float(b.mean()), "finetuned_mean": float(f.mean()), "delta": delta}
    if n_pairs == 1:
        return PairedComparison(ci_low=None, ci_high=None, p_value=None, ci_method="none", **means, **common)
    if np.ptp(differences) == 0:
        # Every resample of equal differences has the same mean: the interval is that point.
        # Every sign pattern of all-zero differences has mean 0: p = 1.
        p_value = 1.0 if delta == 0 else _permutation_p_value(f, b, seed=seed, resamples=resamples)
        return PairedComparison(ci_low=delta, ci_high=delta, p_value=p_value, ci_method="degenerate", **means, **common)

    result = stats.bootstrap(
        (differences,), _mean, n_resamples=resamples, batch=_BATCH, vectorized=True, confidence_level=confidence,
        method="percentile", rng=np.random.default_rng(seed),
    )
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    p_value = _permutation_p_value(f, b, seed=seed, resamples=resamples)
    return PairedComparison(ci_low=low, ci_high=high, p_value=p_value, ci_method="percentile", **means, **common)


def _permutation_p_value(finetuned: np.ndarray, base: np.ndarray, *, seed: int, resamples: int) -> float:
    from scipy import stats

    result = stats.permutation_test(
        (finetuned, base), _mean_difference, permutation_type="samples", vectorized=True,
        n_resamples=resamples, batch=_BATCH, alternative="two-sided", rng=np.random.default_rng(seed),
    )
    return min(1.0, float(result.pvalue))


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (controls the family-wise error rate), in the input order."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order]))
    adjusted = np.empty_like(p)
    adjusted[order] = stepped
    return adjusted.tolist()


def verdict_for(comparison: PairedComparison, *, p_adjusted: float | None, alpha: float = DEFAULT_ALPHA, min_pairs: int = DEFAULT_MIN_PAIRS) -> Verdict:
    if comparison.n_pairs < min_pairs or comparison.p_value is None:
        return Verdict.TOO_FEW_PAIRS
    if p_adjusted is None:
        raise ValueError("a comparison with a p-value needs its adjusted p-value for a verdict")
    if p_adjusted < alpha and comparison.ci_low > 0:
        return Verdict.BETTER
    if p_adjusted < alpha and comparison.ci_high < 0:
        return Verdict.WORSE
    return Verdict.NO_SIGNIFICANT_DIFFERENCE


def with_verdict(comparison: PairedComparison, *, p_adjusted: float | None, alpha: float = DEFAULT_ALPHA, min_pairs: int = DEFAULT_MIN_PAIRS) -> PairedComparison:
    return replace(comparison, p_adjusted=p_adjusted, verdict=verdict_for(comparison, p_adjusted=p_adjusted, alpha=alpha, min_pairs=min_pairs))


def compare_metrics(
    pairs_by_metric: Mapping[str, tuple[Sequence[float | None], Sequence[float | None]]],
    *,
    seed: int = 0,
    alpha: float = DEFAULT_ALPHA,
    min_pairs: int = DEFAULT_MIN_PAIRS,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, PairedComparison]:
    """Every metric of one eval dataset: {metric: (base scores, fine-tuned scores)} -> verdicts.

    The Holm family is the metrics with at least min_pairs pairs (the others
    get `too few pairs` and p_adjusted None): a metric that cannot be judged
    does not make the others' correction stricter.
    """
    raw = {
        metric: compare_paired(base, finetuned, seed=seed, resamples=resamples, confidence=confidence)
        for metric, (base, finetuned) in pairs_by_metric.items()
    }
    family = [m for m, c in raw.items() if c.n_pairs >= min_pairs and c.p_value is not None]
    adjusted = dict(zip(family, holm_adjust([raw[m].p_value for m in family]), strict=True))
    return {m: with_verdict(c, p_adjusted=adjusted.get(m), alpha=alpha, min_pairs=min_pairs) for m, c in raw.items()}


def pair_by_index(a: Mapping[int, float | None], b: Mapping[int, float | None]) -> tuple[list[float | None], list[float | None]]:
    """Two runs' per-sample scores keyed by eval row index -> aligned lists (a row only one run has pairs with None)."""
    indices = sorted(set(a) | set(b))
    return [a.get(i) for i in indices], [b.get(i) for i in indices]


def compare_runs(
    a: Mapping[int, float | None],
    b: Mapping[int, float | None],
    *,
    seed: int = 0,
    alpha: float = DEFAULT_ALPHA,
    min_pairs: int = DEFAULT_MIN_PAIRS,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
) -> PairedComparison:
    """One metric of two runs on the same eval data, paired by row index: delta = mean(b - a).

    `base_mean` is a's, `finetuned_mean` is b's; `better` means b scored higher.
    A single test, so p_adjusted is p_value; for several metrics at once use
    compare_metrics({m: pair_by_index(a[m], b[m]) for m in metrics}) to get Holm.
    """
    base, finetuned = pair_by_index(a, b)
    comparison = compare_paired(base, finetuned, seed=seed, resamples=resamples, confidence=confidence)
    return with_verdict(comparison, p_adjusted=comparison.p_value, alpha=alpha, min_pairs=min_pairs)


def _signed(value: float, digits: int) -> str:
    text = f"{value:+.{digits}f}"
    return "+" + text[1:] if float(text) == 0 else text  # never "-0.000"


def format_interval(delta: float | None, low: float | None, high: float | None, *, digits: int = 3) -> str:
    """'+0.029 [-0.004, +0.060]': the one way a difference and its interval are written."""
    if delta is None or (isinstance(delta, float) and math.isnan(delta)):
        return "n/a"
    if low is None or high is None:
        return f"{_signed(delta, digits)} [n/a]"
    return f"{_signed(delta, digits)} [{_signed(low, digits)}, {_signed(high, digits)}]"


def format_p_value(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"
