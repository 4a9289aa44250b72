"""Choosing a fine-tune's checkpoint by scored RAG quality: the interval of a checkpoint's mean, early stopping
on the scores that have arrived, and the choice. Pure functions of the scores (the step bodies call them).

A point is {"step": int, "mean": float | None, ...}: the selection metric's mean over the selection rows that
were measured at that checkpoint (None when none could be).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 2000


def mean_interval(values: Sequence[float | None], *, seed: int = 0) -> dict[str, Any]:
    """The mean of the measured values with its 95% bootstrap interval (percentile, seeded); n counts them.

    Unmeasured values (None, NaN) are counted apart, never averaged in.
    """
    measured = np.array([v for v in values if v is not None and not np.isnan(v)], dtype=float)
    out: dict[str, Any] = {"mean": None, "ci_low": None, "ci_high": None, "n": int(measured.size), "n_failed": len(values) - int(measured.size)}
    if measured.size == 0:
        return out
    mean = float(measured.mean())
    out["mean"] = mean
    if measured.size == 1 or np.ptp(measured) == 0:
        out["ci_low"] = out["ci_high"] = mean
        return out
    result = stats.bootstrap((measured,), np.mean, n_resamples=RESAMPLES, confidence_level=CONFIDENCE, method="percentile",
                             rng=np.random.default_rng(seed), vectorized=True)
    out["ci_low"], out["ci_high"] = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return out


def scored(points: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The points that have a mean, in step order."""
    return sorted((p for p in points if p.get("mean") is not None), key=lambda p: p["step"])


def early_stop(points: Sequence[Mapping[str, Any]], *, patience: int | None, min_delta: float) -> str | None:
    """Why training should stop now (or None): `patience` scored checkpoints in a row, in step order, failed to
    beat the best before them by more than `min_delta`. Decided on the scores that have arrived."""
    if not patience:
        return None
    best, best_step, bad = None, None, 0
    for point in scored(points):
        if best is None or point["mean"] > best + min_delta:
            best, best_step, bad = point["mean"], point["step"], 0
        else:
            bad += 1
    if bad >= patience:
        return (f"{bad} scored checkpoint(s) in a row did not beat the best selection score {best:.4f} (step {best_step}) "
                f"by more than {min_delta:g} (selection.patience {patience})")
    return None


def choose(points: Sequence[Mapping[str, Any]], *, metric: str) -> tuple[int, str]:
    """(the chosen checkpoint's step, why): the highest mean of the selection metric, the earlier on a tie.

    Raises ValueError when no checkpoint could be scored at all.
    """
    candidates = scored(points)
    if not candidates:
        unscored = ", ".join(str(p["step"]) for p in sorted(points, key=lambda p: p["step"])) or "none"
        raise ValueError(f"no checkpoint could be scored on {metric} (checkpoints: {unscored}): nothing to choose by")
    best = max(candidates, key=lambda p: (p["mean"], -p["step"]))
    others = [p for p in candidates if p is not best]
    runner = max(others, key=lambda p: (p["mean"], -p["step"]), default=None)
    interval = f" [{best['ci_low']:.4f}, {best['ci_high']:.4f}]" if best.get("ci_low") is not None else ""
    reason = f"step {best['step']}: the highest mean {metric} on the selection rows, {best['mean']:.4f}{interval} over {best.get('n', '?')} rows"
    if runner is not None:
        reason += f"; next best step {runner['step']} with {runner['mean']:.4f}"
        if runner["mean"] == best["mean"]:
            reason += " (a tie: the earlier checkpoint is kept)"
    unscored = [p["step"] for p in points if p.get("mean") is None]
    if unscored:
        reason += f"; not scored: step(s) {', '.join(map(str, sorted(unscored)))}"
    return int(best["step"]), reason
