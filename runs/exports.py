"""Every CSV the platform writes: a run's results, its samples, and the per-sample artifact in MLflow.

Cells that a spreadsheet would run as a formula are neutralised in all of them.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .models import PipelineRun
from .selectors import run_results_rows, run_samples_table

RESULTS_HEADER = [
    "run_id", "run_name", "dataset", "variant", "metric", "value", "n_scored", "n_failed",
    # On a fine-tuned row: the paired comparison with base (runs/models.py ScoreComparison).
    "n_pairs", "delta_vs_base", "ci_low", "ci_high", "p_adjusted", "verdict",
]


def neutralise_csv_cell(value: object) -> object:
    """Keep spreadsheet programs from executing a cell as a formula."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _write(rows: Iterable[Sequence[object]], handle) -> None:
    writer = csv.writer(handle)
    for row in rows:
        writer.writerow([neutralise_csv_cell(cell) for cell in row])


def _text(rows: Iterable[Sequence[object]]) -> str:
    buffer = io.StringIO()
    _write(rows, buffer)
    return buffer.getvalue()


def results_csv(run: PipelineRun) -> str:
    """One line per (dataset, variant, metric); an unmeasured value is an empty cell."""
    return _text([RESULTS_HEADER, *((run.pk, run.name, *row) for row in run_results_rows(run))])


def cut_off_cell(value: bool | None) -> str:
    """true / false, or empty where generation did not record it (answers from the dataset, runs from before)."""
    return "" if value is None else str(value).lower()


def samples_csv(run: PipelineRun) -> str:
    """One line per (dataset, row): the question, the ground truth, each variant's answer and scores, then whether
    the token limit cut each variant's answer off (last, so the earlier columns keep their places)."""
    samples = run_samples_table(run, dataset=None, sort=None, order="asc")
    metrics, variants = samples["metrics"], samples["variants"]
    header = ["dataset", "index", "question", "ground_truth", *(f"answer_{v}" for v in variants), *(f"{m}_{v}" for v in variants for m in metrics),
              *(f"cut_off_{v}" for v in variants)]
    lines: list[Sequence[object]] = [header]
    for row in samples["rows"]:
        cells: list[object] = [row["dataset"], row["index"], row["question"], row["ground_truth"], *(row["answers"].get(v, "") for v in variants)]
        cells += [("" if row["scores"].get(v, {}).get(m) is None else row["scores"][v][m]) for v in variants for m in metrics]
        cells += [cut_off_cell(row["cut_off"].get(v)) for v in variants]
        lines.append(cells)
    return _text(lines)


def write_scored_samples_csv(path: Path, *, samples: Iterable[dict[str, Any]], metrics: Sequence[str]) -> None:
    """The per-sample artifact logged to MLflow for one (dataset, variant): scores, why a score is missing, and
    whether the token limit cut the answer off."""
    header = ["index", "question", "ground_truth", "answer", *metrics, *(f"{m}_reason" for m in metrics), "cut_off"]
    rows = (
        [s["index"], s["question"], s["ground_truth"], s["answer"], *(s["scores"].get(m) for m in metrics), *(s["reasons"].get(m, "") for m in metrics),
         cut_off_cell(s.get("cut_off"))]
        for s in samples
    )
    with open(path, "w", newline="", encoding="utf-8") as handle:
        _write([header, *rows], handle)
