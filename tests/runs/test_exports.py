"""runs/exports.py: the per-sample CSV logged to MLflow (the samples download is tested with its page, tests/runs/test_views.py)."""

from __future__ import annotations

import csv

from runs.exports import write_scored_samples_csv


def test_the_mlflow_sample_csv_says_whether_the_token_limit_cut_each_answer_off(tmp_path):
    path = tmp_path / "ragas_eval__finetuned.csv"
    samples = [{"index": i, "question": "q", "ground_truth": "g", "answer": "a", "scores": {"rouge_score": 0.5}, "reasons": {}, "cut_off": cut}
               for i, cut in enumerate([True, False, None])]
    write_scored_samples_csv(path, samples=samples, metrics=["rouge_score"])
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["index", "question", "ground_truth", "answer", "rouge_score", "rouge_score_reason", "cut_off"]
    assert [r[-1] for r in rows[1:]] == ["true", "false", ""]  # empty: not recorded
