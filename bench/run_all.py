"""Run every benchmark (bench/README.md), one process each, and write a JSON summary.

    python bench/run_all.py [--json bench/results.json] [--only training,web,...]

Each benchmark prints its own figures, baseline and ratio as it goes; this adds
one summary table at the end and exits non-zero if a benchmark crashed (a
target not met is reported, not an error: machines here are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, print_table, write_json  # noqa: E402

BENCHMARKS = {
    "training": ["bench/bench_training.py", "--knobs"],
    "generation": ["bench/bench_generation.py"],
    "scoring": ["bench/bench_scoring.py"],
    "web": ["bench/bench_web.py"],
    "orchestration": ["bench/bench_orchestration.py"],
    "selection": ["bench/bench_selection.py"],
    "sweep": ["bench/bench_sweep.py"],
    "export": ["bench/bench_export.py"],
}


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per headline figure: ours, the baseline, the ratio, the target's verdict."""
    rows = []
    if training := results.get("training"):
        for name, t in (training.get("models") or {training.get("model", "model"): training}).items():  # one set of rows per model
            mem = t["peak_memory_mib"]
            where = f"{name}, {t['device']} {t.get('dtype', '')}".rstrip()
            rows.append({"benchmark": "1 training", "figure": f"non-padding tokens/s, {where}", "ours": t["tokens_per_second"]["ours"],
                         "baseline": f"Trainer {t['tokens_per_second']['trainer']}", "ratio": t["ratio_vs_trainer"],
                         "target": t["targets"]["ratio_vs_trainer"]})
            rows.append({"benchmark": "1 training", "figure": f"peak memory MiB ({mem['kind']}), {name}", "ours": mem["ours"],
                         "baseline": f"Trainer {mem['trainer']}", "ratio": round(mem["ours"] / mem["trainer"], 2) if mem["trainer"] else None,
                         "target": "MET (equal or lower)" if t["memory_ok"] else "NOT MET (higher)"})
            rows.append({"benchmark": "1 training", "figure": f"time per step vs minimal loop, {name}", "ours": t["tokens_per_second"]["ours"],
                         "baseline": f"minimal loop {t['tokens_per_second']['minimal']}", "ratio": t["ratio_vs_minimal_loop"],
                         "target": t["targets"]["ratio_vs_minimal_loop"]})
            if hw := t.get("hardware"):
                rows.append({"benchmark": "1 training", "figure": f"GFLOP/s (lower bound) vs bf16 matmul peak, {name}", "ours": hw["ours_gflops"],
                             "baseline": f"bf16 peak {hw['matmul_peak_gflops']['bfloat16']}", "ratio": hw["fraction_of_bf16_peak"],
                             "target": "(distance to the hardware limit)"})
            if ref := (t.get("knobs") or {}).get("precision_fp32"):
                rows.append({"benchmark": "1 training", "figure": f"bf16 autocast vs float32, {name}", "ours": t["tokens_per_second"]["ours"],
                             "baseline": f"float32 {ref['tokens_per_second']}", "ratio": ref["bf16_speedup"],
                             "target": f"losses within {ref['largest_relative_loss_difference']:.2%} of float32 (tolerance 2%)"})
    if g := results.get("generation"):
        for name, m in (g.get("models") or {g.get("model", "model"): g}).items():  # one row per model measured
            rows.append({"benchmark": "2 generation", "figure": f"answers/s, {name}, batch {m['batch_size']}", "ours": m["answers_per_second"]["ours"],
                         "baseline": f"one at a time {m['answers_per_second']['baseline_one_at_a_time']}", "ratio": m["ratio"],
                         "target": m["targets"]["ratio"] + (", answers identical" if m["identical_answers"] else "")})
            if hw := m.get("hardware"):
                rows.append({"benchmark": "2 generation", "figure": f"GFLOP/s (lower bound) vs bf16 matmul peak, {name}", "ours": hw["ours_gflops"],
                             "baseline": f"bf16 peak {hw['matmul_peak_gflops']['bfloat16']}", "ratio": hw["fraction_of_bf16_peak"],
                             "target": "(distance to the hardware limit)"})
            if p := m.get("precision"):
                rows.append({"benchmark": "2 generation", "figure": f"bf16 vs float32 batched, {name}", "ours": f"{p['fp32_seconds']} s fp32",
                             "baseline": None, "ratio": p["bf16_speedup"],
                             "target": f"answers identical to float32 {p['identical_to_fp32']}/{p['questions']}, ROUGE-L vs float32 "
                                       f"mean {p['mean_rouge_l_vs_fp32']}"})
    if s := results.get("scoring"):
        rows.append({"benchmark": "3 scoring", "figure": f"samples/s, {s['samples']} x {len(s['metrics'])} metrics",
                     "ours": s["samples_per_second"]["ours"], "baseline": f"ragas.evaluate {s['samples_per_second']['ragas_directly']}",
                     "ratio": s["ratio"], "target": s["targets"]["ratio"] + (", scores identical" if s["identical_scores"] else "")})
    if w := results.get("web"):
        sizes = w.get("sizes") or {"10k": w}  # one record per history size (before: a single 10k record)
        for size, record in sizes.items():
            history = record.get("history", {})
            label = f"{size} ({history.get('runs', 0):,} runs, {history.get('samples', 0):,} samples)" if history else size
            for name, e in record["endpoints"].items():
                same = (w.get("queries_equal_per_url") or {}).get(name)
                queries = f"{e['queries']} queries" + ("" if same is None or len(sizes) < 2 else ", same at every size" if same else ", NOT the same at every size")
                rows.append({"benchmark": "4 web", "figure": f"{label}: {name} p50/p99 ms, {queries}", "ours": f"{e['p50_ms']}/{e['p99_ms']}",
                             "baseline": f"capacity {e['capacity_requests_per_second']} req/s", "ratio": None, "target": e["target"]})
            for note in record.get("skipped", []):
                rows.append({"benchmark": "4 web", "figure": f"{size}: {note}", "ours": None, "baseline": None, "ratio": None, "target": "skipped"})
        if len(sizes) > 1 and w.get("queries_equal") is not None:
            rows.append({"benchmark": "4 web", "figure": "SQL queries per URL equal across the sizes", "ours": "yes" if w["queries_equal"] else "no",
                         "baseline": None, "ratio": None, "target": "MET" if w["queries_equal"] else "NOT MET"})
    if o := results.get("orchestration"):
        e2e = o["end_to_end_seconds"]
        rows.append({"benchmark": "5 orchestration", "figure": "eval-only run, seconds", "ours": e2e["api_workers"],
                     "baseline": f"inline {e2e['inline']}", "ratio": o["ratio"], "target": o["targets"]["ratio"]})
        if p := o.get("stock_worker"):
            rows.append({"benchmark": "5 orchestration", "figure": "same, stock rq.Worker (reference)", "ours": p["api_workers_seconds"],
                         "baseline": f"inline {e2e['inline']}", "ratio": p["ratio"], "target": ""})
        rows.append({"benchmark": "5 orchestration", "figure": "enqueue-to-start p50, s", "ours": o["enqueue_to_start_seconds"]["p50"],
                     "baseline": None, "ratio": None, "target": o["targets"]["enqueue_to_start_p50"]})
    if s := results.get("selection"):
        t = s["seconds_to_adapter"]
        rows.append({"benchmark": "7 selection", "figure": "fine-tune start -> adapter, selection every N steps vs none (served)",
                     "ours": t["served_selection"], "baseline": f"no selection {t['served_no_selection']}", "ratio": s["ratio_selection_vs_none"],
                     "target": s["targets"]["selection_vs_none"]})
        rows.append({"benchmark": "7 selection", "figure": "scoring overlapped (served) vs inside training (blocking)", "ours": t["served_selection"],
                     "baseline": f"blocking {t['inline_blocking_selection']}", "ratio": s["ratio_overlapped_vs_blocking"],
                     "target": s["targets"]["overlapped_vs_blocking"] + f"; same checkpoint and scores: {s['targets']['same_choice_and_scores']}"})
    if w := results.get("sweep"):
        rows.append({"benchmark": "8 sweep", "figure": "4 trials, parallel 2: two gpu workers vs one, seconds", "ours": w["two_gpu_workers"]["seconds"],
                     "baseline": f"one worker {w['one_gpu_worker']['seconds']}", "ratio": w["ratio_two_vs_one"], "target": w["targets"]["two_vs_one"]})
        rows.append({"benchmark": "8 sweep", "figure": "the sweep's bookkeeping / its trials' time", "ours": w["overhead_fraction"], "baseline": None,
                     "ratio": None, "target": w["targets"]["overhead"]})
    if x := results.get("export"):
        for part, t in x["timings"].items():
            rows.append({"benchmark": "9 export", "figure": f"{part} seconds, {x['model']} ({t['bytes'] / 1e6:.0f} MB written)", "ours": t["seconds"],
                         "baseline": f"disk-bound {t['disk_seconds']} s at {t['disk_mb_s']} MB/s", "ratio": t["ratio_vs_disk"],
                         "target": "(distance to the disk's limit)"})
        for c in x["checks"].values():
            worst = ", ".join(f"{m} {v['delta']:+.4f} [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}] {v['verdict']}"
                              for m, v in c["metrics"].items() if v["ci_low"] is not None and v["verdict"] != "equivalent")
            rows.append({"benchmark": "9 export", "figure": f"{c['label']}: answers identical to the adapter's", "ours": f"{c['identical']}/{c['rows']}",
                         "baseline": None, "ratio": c["identical_share"], "target": f"{c['verdict']}" + (f" ({worst})" if worst else "")})
    return rows


def machine() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip())
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"when": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "git_commit": commit + ("+changes" if dirty else ""), "load_average_at_start": load}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of " + ", ".join(BENCHMARKS))
    args = parser.parse_args(argv)

    wanted = [b for b in args.only.split(",") if b]
    unknown = set(wanted) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    report: dict[str, Any] = {"machine": machine(), "results": {}, "errors": {}, "seconds": {}}
    for name in wanted:
        print(f"\n######## benchmark: {name}", flush=True)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            out = Path(tmp) / "result.json"
            proc = subprocess.run([sys.executable, *BENCHMARKS[name], "--json", str(out)], cwd=ROOT, check=False)
            report["seconds"][name] = round(time.monotonic() - started, 1)
            if proc.returncode == 0 and out.exists():
                report["results"][name] = json.loads(out.read_text())
            else:
                report["errors"][name] = f"exit code {proc.returncode} (its output is above)"
                print(f"!! {name} failed with exit code {proc.returncode}", flush=True)
    report["summary"] = summary_rows(report["results"])
    write_json(args.json, report)
    print_table("summary (every figure measured against its baseline in the same run)",
                [[r["benchmark"], r["figure"], r["ours"], r["baseline"], r["ratio"], r["target"]] for r in report["summary"]],
                ["benchmark", "figure", "ours", "baseline", "ratio", "target"])
    for name, error in report["errors"].items():
        print(f"  FAILED: {name}: {error}")
    print(f"\nwritten: {args.json}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
