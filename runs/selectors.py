from __future__ import annotations

from collections.abc import Iterator

from django.db.models import QuerySet

from .models import PipelineRun, RunResult


def run_visible_to(user) -> QuerySet[PipelineRun]:
    """A user's own runs; staff see every run."""
    qs = PipelineRun.objects.all()
    return qs if user.is_staff else qs.filter(owner=user)


def run_results_rows(run: PipelineRun) -> Iterator[tuple]:
    """(dataset, variant, metric, value, n_scored, n_failed) rows, for export."""
    for result in RunResult.objects.filter(run=run).select_related("dataset").order_by("dataset__name", "metric", "variant"):
        yield (
            result.dataset.name if result.dataset else "",
            result.variant,
            result.metric,
            "" if result.value is None else result.value,
            result.n_scored,
            result.n_failed,
        )


def run_score_table(run: PipelineRun) -> list[dict]:
    """One row per (eval dataset, metric): the value of each variant, and finetuned - base.

    Cells: {"value", "n_scored", "n_failed", "failure_reasons"}; delta is None
    unless both base and finetuned were measured.
    """
    table: dict[tuple[str, str], dict] = {}
    for result in RunResult.objects.filter(run=run).select_related("dataset").order_by("dataset__name", "metric"):
        key = (result.dataset.name if result.dataset else "", result.metric)
        row = table.setdefault(key, {"dataset": key[0], "metric": key[1], "variants": {}, "delta": None})
        row["variants"][result.variant] = {
            "value": result.value, "n_scored": result.n_scored, "n_failed": result.n_failed, "failure_reasons": result.failure_reasons,
        }
    for row in table.values():
        base, tuned = row["variants"].get("base"), row["variants"].get("finetuned")
        if base and tuned and base["value"] is not None and tuned["value"] is not None:
            row["delta"] = tuned["value"] - base["value"]
    return list(table.values())
