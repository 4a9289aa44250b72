"""Benchmark 8: a sweep's trials in parallel on two gpu workers against one, and what the sweep itself costs.

    python3 bench/bench_sweep.py [--database-url ...] [--redis-url ...] [--threads 1] [--json OUT]

Four trials of the smoke config (local:tiny-llama, a grid over learning rate and LoRA r, selection every 5 steps),
`parallel: 2`, posted to the API and carried out by real `rqworker` processes: once with one gpu worker, once with
two (one cpu worker both times). With no GPU lent, each gpu worker trains on the CPU with `--threads` torch threads
(one by default, so two workers use the machine's two cores as two devices). Timed from the sweep's creation to
its completion; target: two workers <= 0.6x one. The sweep's own overhead is the time of its bookkeeping jobs
(plan, each tell, pick: Optuna's ask and tell, the children's creation, the winner's choice) against the sum of
its trials' own times; target under 2%.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import print_table, ratio, verdict, write_json  # noqa: E402
from bench.bench_orchestration import start_worker, stop, wait_for_workers  # noqa: E402
from bench.bench_selection import served_bench  # noqa: E402

DEFAULT_DB = "postgres://postgres@127.0.0.1:5432/mlops_bench_sweep"
DEFAULT_REDIS = "redis://127.0.0.1:6379/13"
CONFIG = {
    "name": "bench-sweep", "kind": "sweep", "model": {"base": "local:tiny-llama"},
    "datasets": {"train": ["rag_qa_train"], "eval": ["ragas_eval"]},
    "training": {"epochs": 1, "max_steps": 10, "learning_rate": 5e-3, "batch_size": 8, "max_seq_length": 512, "seed": 42, "lora": {"dropout": 0.0}},
    "evaluation": {"metrics": ["rouge_score", "bleu_score"], "max_samples": 10, "max_new_tokens": 32},
    "selection": {"metric": "rouge_score", "every": 5, "rows": 0.1, "max_rows": 8},
    "sweep": {"method": "grid", "space": {"training.learning_rate": [2e-3, 5e-3], "training.lora.r": [4, 8]}, "trials": 4, "parallel": 2},
}


def sweep_once(client, timeout: float = 3600) -> dict[str, Any]:
    from runs.models import Job, PipelineRun

    response = client.post("/api/runs/", CONFIG, format="json")
    assert response.status_code == 201, response.content
    sweep_id = response.json()["id"]
    deadline = time.monotonic() + timeout
    while not PipelineRun.objects.get(pk=sweep_id).is_terminal:
        if time.monotonic() > deadline:
            raise TimeoutError(f"sweep {sweep_id} did not finish in {timeout}s")
        time.sleep(0.5)
    sweep = PipelineRun.objects.get(pk=sweep_id)
    if sweep.status != "completed":
        raise RuntimeError(f"sweep {sweep_id} ended {sweep.status}: {sweep.error}\n{sweep.logs[-3000:]}")
    children = list(PipelineRun.objects.filter(parent=sweep))
    trial_seconds = sum((c.finished_at - c.started_at).total_seconds() for c in children)
    bookkeeping = {j.label: (j.figures or {}).get("seconds", 0.0) for j in Job.objects.filter(run=sweep, step__in=["plan", "tell", "pick"])}
    trainings = sorted(Job.objects.filter(run__parent=sweep, step="finetune"), key=lambda j: j.started_at)
    overlap = sum(max(0.0, (min(a.finished_at, b.finished_at) - max(a.started_at, b.started_at)).total_seconds())
                  for i, a in enumerate(trainings) for b in trainings[i + 1:])
    return {
        "sweep_id": sweep_id, "seconds": round((sweep.finished_at - sweep.created_at).total_seconds(), 3),
        "trials_seconds_sum": round(trial_seconds, 3), "bookkeeping_seconds": round(sum(bookkeeping.values()), 3),
        "bookkeeping": bookkeeping, "training_overlap_seconds": round(overlap, 3),
        "winner": sweep.jobs.get(step="pick").output["winner"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="a sweep on two gpu workers vs one; the sweep's own overhead")
    parser.add_argument("--database-url", default=os.environ.get("BENCH_SWEEP_DATABASE_URL", DEFAULT_DB))
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per gpu worker (no GPU here: a core as a device)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    started = time.monotonic()
    env, client = served_bench(args, "sweep", "local:tiny-llama")
    gpu_env = {**env, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cpu_env = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(f"bench 8, sweep: 4 trials (grid), parallel 2, local:tiny-llama; gpu workers train on {args.threads} CPU thread(s) each", flush=True)
    results = {}
    for gpus in (1, 2):
        workers = [start_worker("cpu", cpu_env)] + [start_worker("gpu", gpu_env) for _ in range(gpus)]
        try:
            wait_for_workers(["gpu", "cpu"])
            results[gpus] = sweep_once(client)
        finally:
            for worker in workers:
                stop(worker)
        r = results[gpus]
        print(f"  {gpus} gpu worker(s): {r['seconds']:.1f}s (trials overlapped in training for {r['training_overlap_seconds']:.1f}s; "
              f"bookkeeping {r['bookkeeping_seconds']:.2f}s of {r['trials_seconds_sum']:.1f}s of trials)", flush=True)
    overhead = max(r["bookkeeping_seconds"] / r["trials_seconds_sum"] for r in results.values())
    report = {
        "config": CONFIG, "threads_per_gpu_worker": args.threads, "one_gpu_worker": results[1], "two_gpu_workers": results[2],
        "ratio_two_vs_one": ratio(results[2]["seconds"], results[1]["seconds"], 3), "overhead_fraction": round(overhead, 4),
    }
    report["targets"] = {"two_vs_one": verdict(report["ratio_two_vs_one"], 0.6, at_least=False),
                         "overhead": verdict(report["overhead_fraction"], 0.02, at_least=False)}
    print_table("sweep: 4 trials, parallel 2 (created -> completed)", [
        ["two gpu workers", results[2]["seconds"], report["ratio_two_vs_one"], report["targets"]["two_vs_one"]],
        ["one gpu worker (baseline)", results[1]["seconds"], "1.000", ""],
        ["sweep bookkeeping / trials' time (worst of the two)", f"{overhead:.2%}", "", report["targets"]["overhead"]],
    ], ["what", "seconds", "ratio", "target"])
    report["bench_seconds"] = round(time.monotonic() - started, 1)
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
