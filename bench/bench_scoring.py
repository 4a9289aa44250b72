"""Benchmark 3: our scoring (evaluation.scoring.score_samples) against ragas.evaluate called directly.

    python3 bench/bench_scoring.py [--samples N] [--metrics a,b,...] [--json OUT]

The same samples (the bundled eval sets with their stored answers), the same
metrics (every metric that needs no judge), the same embeddings object. The
baseline is the call a ragas user writes: `evaluate(EvaluationDataset, metrics)`
and read `result.scores`. Ours adds the failure bookkeeping (a callback that
keeps every unmeasured sample's reason), the NaN -> None conversion, and
embeds the texts ragas asks for one at a time beforehand, once each, in
unpadded batches (evaluation.embedding_cache). The scores must be identical
(to 1e-9, sample by sample and metric by metric; the benchmark exits non-zero
otherwise); the ratio is baseline time / our time.
The two alternate, round after round, and each side's best round counts (the
machines here are shared: the least disturbed round is the closest to the
true cost). Runs without Django.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, print_table, ratio, read_jsonl, verdict, write_json  # noqa: E402

TOLERANCE = 1e-9  # issue 14: every score identical to 1e-9


def load_samples(limit: int | None):
    from evaluation.scoring import Sample

    rows = [r for path in sorted((ROOT / "data" / "eval").glob("*.jsonl")) for r in read_jsonl(path)]
    samples = [
        Sample(question=r["question"], contexts=r["contexts"], ground_truth=r["ground_truth"], answer=r["answer"],
               reference_contexts=r.get("reference_contexts"))
        for r in rows
    ]
    while limit and len(samples) < limit:  # more than the bundled rows: repeat them
        samples += samples[: limit - len(samples)]
    return samples[:limit] if limit else samples


def ragas_directly(samples, metric_names: list[str]) -> list[dict[str, float]]:
    """What a ragas user writes: the metrics, a dataset, evaluate(), result.scores."""
    from ragas import evaluate
    from ragas.dataset_schema import EvaluationDataset

    from evaluation.metrics import build_metrics, packaged_embeddings, result_key, uses_embeddings

    embeddings = packaged_embeddings() if uses_embeddings(metric_names) else None
    metrics = build_metrics(metric_names, embeddings=embeddings)
    dataset = EvaluationDataset.from_list([s.to_ragas() for s in samples])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        result = evaluate(dataset, metrics=metrics, show_progress=False)
    keys = [result_key(m) for m in metrics]
    return [{name: row[key] for name, key in zip(metric_names, keys, strict=True)} for row in result.scores]


def compare(ours_scores, direct_scores, metric_names: list[str]) -> tuple[list[dict[str, Any]], float]:
    """Every (sample, metric) whose score differs by more than TOLERANCE (or is measured on one side only)."""
    mismatches, largest = [], 0.0
    for index, (ours, direct) in enumerate(zip(ours_scores, direct_scores, strict=True)):
        for name in metric_names:
            expected = direct[name]
            expected = None if expected is None or (isinstance(expected, float) and math.isnan(expected)) else float(expected)
            got = ours[name]
            if got is None or expected is None:
                if got is not expected:
                    mismatches.append({"sample": index, "metric": name, "ours": got, "ragas": expected})
                continue
            largest = max(largest, abs(got - expected))
            if abs(got - expected) > TOLERANCE:
                mismatches.append({"sample": index, "metric": name, "ours": got, "ragas": expected})
    return mismatches, largest


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from evaluation.metric_names import NON_JUDGE_METRICS

    parser = argparse.ArgumentParser(description="score_samples vs ragas.evaluate directly")
    parser.add_argument("--samples", type=int, default=None, help="default: every row of the three bundled eval sets (143)")
    parser.add_argument("--metrics", default=",".join(NON_JUDGE_METRICS))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each side's best round counts")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both sides (default: torch's own, one per core)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from evaluation.metrics import packaged_embeddings
    from evaluation.scoring import score_samples

    started = time.monotonic()
    metric_names = [m for m in args.metrics.split(",") if m]
    samples = load_samples(args.samples)
    print(f"bench 3, scoring: {len(samples)} samples x {len(metric_names)} metrics ({', '.join(metric_names)}), "
          f"{args.rounds} interleaved round(s) after a warm-up", flush=True)
    packaged_embeddings()  # loaded once per process, for both: not part of either timing
    score_samples(samples[:4], metric_names)  # warm-up: imports, lazy ragas/nltk state
    ragas_directly(samples[:4], metric_names)

    timings: dict[str, list[float]] = {"ours": [], "ragas": []}
    ours_scores: list[dict[str, float | None]] = []
    direct_scores: list[dict[str, float]] = []
    for number in range(args.rounds):
        order = ("ours", "ragas") if number % 2 == 0 else ("ragas", "ours")
        for which in order:
            t0 = time.perf_counter()
            if which == "ours":
                ours_scores = score_samples(samples, metric_names).scores
            else:
                direct_scores = ragas_directly(samples, metric_names)
            timings[which].append(time.perf_counter() - t0)
        print(f"  round {number + 1}: ours {timings['ours'][-1]:.2f}s, ragas.evaluate {timings['ragas'][-1]:.2f}s", flush=True)

    mismatches, largest_difference = compare(ours_scores, direct_scores, metric_names)
    # The best round of each: on a shared machine, the one least disturbed by others.
    ours_s, ragas_s = min(timings["ours"]), min(timings["ragas"])
    report = {
        "samples": len(samples), "metrics": metric_names, "torch_threads": torch.get_num_threads(),
        "seconds": {k: [round(t, 3) for t in v] for k, v in timings.items()},
        "samples_per_second": {"ours": round(len(samples) / ours_s, 2), "ragas_directly": round(len(samples) / ragas_s, 2)},
        "ratio": ratio(ragas_s, ours_s, 3),
        "identical_scores": not mismatches, "tolerance": TOLERANCE, "largest_difference": largest_difference,
        "mismatches": mismatches[:5], "n_mismatches": len(mismatches),
    }
    report["targets"] = {"ratio": verdict(report["ratio"], 2.0) + ("" if not mismatches else f", but {len(mismatches)} scores differ")}
    report["bench_seconds"] = round(time.monotonic() - started, 1)
    print_table("scoring throughput (best round of each)", [
        ["ours (score_samples)", report["samples_per_second"]["ours"], round(ours_s, 3), "1.000"],
        ["ragas.evaluate directly", report["samples_per_second"]["ragas_directly"], round(ragas_s, 3), report["ratio"]],
    ], ["variant", "samples/s", "seconds", "ours / this"])
    print(f"  identical scores (to {TOLERANCE:g}; largest difference {largest_difference:g}): "
          f"{'yes' if not mismatches else f'no, {len(mismatches)} differ'}; ratio {report['ratio']} -> {report['targets']['ratio']}")
    write_json(args.json, report)
    if mismatches:
        for m in mismatches[:5]:
            print(f"  MISMATCH sample {m['sample']} {m['metric']}: ours {m['ours']!r}, ragas {m['ragas']!r}", file=sys.stderr)
        raise SystemExit(f"bench 3 FAILED: {len(mismatches)} scores differ from ragas.evaluate by more than {TOLERANCE:g}")
    return report


if __name__ == "__main__":
    main()
