"""Benchmark 5: what the served mode (API + RQ workers) costs over running the same work inline.

    python3 bench/bench_orchestration.py [--database-url ...] [--redis-url ...] [--json OUT]

1. End to end: a small eval-only run (local:tiny-llama generates answers for 16
   questions on the gpu queue, then RAGAS scores them on the cpu queue), posted
   to POST /api/runs/ and carried out by real `manage.py rqworker gpu` and
   `rqworker cpu` processes, against the same config run inline by
   `manage.py run_pipeline` (the embedded default: both jobs in one process).
   Both are timed the same way, from the run's creation to its completion
   (created_at -> finished_at in the database); the inline process's wall time,
   interpreter and Django start-up included, is printed beside it.
2. Enqueue-to-start: a no-op job enqueued on the idle cpu worker's queue, the
   time until its body runs (RQ's fork-per-job included), repeated.

Uses its own database (default `mlops_bench_orch`, created and migrated here)
and Redis database (default redis://127.0.0.1:6379/13; only the bench's own
queues in it are touched), a local MLflow store under var/bench/orchestration.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, median, percentile, print_table, ratio, verdict, write_json  # noqa: E402

DEFAULT_DB = "postgres://postgres@127.0.0.1:5432/mlops_bench_orch"
DEFAULT_REDIS = "redis://127.0.0.1:6379/13"
CONFIG = {
    "name": "bench-orchestration",
    "kind": "eval_only",
    "model": {"base": "local:tiny-llama"},
    "datasets": {"eval": ["ragas_eval"]},
    "evaluation": {
        "answers": "generate", "metrics": ["semantic_similarity", "rouge_score", "non_llm_context_recall"],
        "max_samples": 16, "max_new_tokens": 32,
    },
}
START_KEY = "bench:orchestration:started:{}"


def record_start(token: str) -> None:
    """The no-op job: note when its body ran (wall clock, shared with the parent through Redis)."""
    import redis

    redis.Redis.from_url(os.environ["REDIS_URL"]).set(START_KEY.format(token), repr(time.time()), ex=600)


def _environment(args: argparse.Namespace, var_dir: Path) -> dict[str, str]:
    return {
        "DJANGO_SETTINGS_MODULE": "mlops_site.settings", "DATABASE_URL": args.database_url, "REDIS_URL": args.redis_url,
        "MLOPS_VAR_DIR": str(var_dir), "MLOPS_MODELS_DIR": str(ROOT / "var" / "models"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{var_dir / 'mlflow.db'}", "MLFLOW_ARTIFACT_ROOT": (var_dir / "mlartifacts").as_uri(),
        "SECRET_KEY": "bench-only-secret-key-not-used-anywhere-else-0123456789", "ALLOWED_HOSTS": "testserver,127.0.0.1",
        "LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAGAS_DO_NOT_TRACK": "true",
        "TOKENIZERS_PARALLELISM": "false",
    }


def start_worker(queue: str, env: dict[str, str], worker_class: str | None = None) -> subprocess.Popen:
    extra = ["--worker-class", worker_class] if worker_class else []
    return subprocess.Popen([sys.executable, str(ROOT / "manage.py"), "rqworker", queue, *extra], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def wait_for_workers(queues: list[str], timeout: float = 120) -> None:
    import django_rq
    from rq import Worker

    connection = django_rq.get_connection("cpu")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listening = {q.name for w in Worker.all(connection=connection) for q in w.queues}
        if set(queues) <= listening:
            return
        time.sleep(0.2)
    raise TimeoutError(f"workers for {queues} did not start in {timeout}s")


def run_seconds(run_id: int) -> float:
    from runs.models import PipelineRun

    run = PipelineRun.objects.get(pk=run_id)
    if run.status != "completed":
        raise RuntimeError(f"run {run_id} ended {run.status}: {run.error}\n{run.logs[-3000:]}")
    return (run.finished_at - run.created_at).total_seconds()


def through_api(client, timeout: float = 600) -> dict[str, Any]:
    from runs.models import PipelineRun, RunEvent

    t0 = time.perf_counter()
    response = client.post("/api/runs/", CONFIG, format="json")
    assert response.status_code == 201, response.content
    run_id = response.json()["id"]
    deadline = time.monotonic() + timeout
    while PipelineRun.objects.filter(pk=run_id, status__in=["pending", "evaluating"]).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} did not finish in {timeout}s")
        time.sleep(0.05)
    observed = time.perf_counter() - t0
    run = PipelineRun.objects.get(pk=run_id)
    started = RunEvent.objects.filter(run_id=run_id, to_status="evaluating").values_list("at", flat=True).first()
    return {"run_id": run_id, "seconds": run_seconds(run_id), "observed_seconds": round(observed, 3),
            "created_to_first_job_seconds": (started - run.created_at).total_seconds() if started else None}


def inline(config_path: Path, env: dict[str, str]) -> dict[str, Any]:
    from runs.models import PipelineRun

    inline_env = {**env}
    inline_env.pop("REDIS_URL")  # the embedded default: jobs inline, in this process
    before = PipelineRun.objects.order_by("-id").values_list("id", flat=True).first() or 0
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "manage.py"), "run_pipeline", str(config_path)], cwd=ROOT, env=inline_env,
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"run_pipeline failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    run_id = PipelineRun.objects.filter(id__gt=before).order_by("id").values_list("id", flat=True).last()
    return {"run_id": run_id, "seconds": run_seconds(run_id), "process_wall_seconds": round(wall, 3)}


def enqueue_to_start(samples: int) -> list[float]:
    import django_rq

    queue = django_rq.get_queue("cpu")
    connection = queue.connection
    latencies = []
    for number in range(samples):
        token = f"{os.getpid()}-{number}-{time.time_ns()}"
        enqueued = time.time()
        queue.enqueue_call("bench.bench_orchestration.record_start", args=(token,), result_ttl=60)
        deadline = time.monotonic() + 30
        while (value := connection.get(START_KEY.format(token))) is None:
            if time.monotonic() > deadline:
                raise TimeoutError("the no-op job did not start in 30s")
            time.sleep(0.002)
        latencies.append(float(value) - enqueued)
        time.sleep(0.3)  # the worker is idle again (its work-horse reaped) before the next one
    return latencies


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="served mode (API + RQ workers) vs inline")
    parser.add_argument("--database-url", default=os.environ.get("BENCH_ORCH_DATABASE_URL", DEFAULT_DB))
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS))
    parser.add_argument("--rounds", type=int, default=2, help="interleaved (api, inline) rounds after one warm-up of each; the median counts")
    parser.add_argument("--samples", type=int, default=20, help="no-op jobs for the enqueue-to-start latency")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock rq.Worker reference phase")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from bench.bench_web import ensure_database

    started = time.monotonic()
    var_dir = ROOT / "var" / "bench" / "orchestration"
    var_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **_environment(args, var_dir)}
    os.environ.update(_environment(args, var_dir))
    ensure_database(args.database_url, drop=False)
    import django

    django.setup()
    import django_rq
    import yaml
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from rest_framework.test import APIClient

    from training.tiny_model import build_tiny_model

    call_command("migrate", verbosity=0)
    build_tiny_model("tiny-llama")  # built once, outside every timing
    for name in ("gpu", "cpu"):
        django_rq.get_queue(name).empty()
    user, _ = get_user_model().objects.get_or_create(username="bench-orchestration")
    client = APIClient()
    client.force_authenticate(user)
    config_path = Path(tempfile.mkstemp(prefix="bench-orch-", suffix=".yaml")[1])
    config_path.write_text(yaml.safe_dump(CONFIG))
    print(f"bench 5, orchestration: eval-only run ({CONFIG['evaluation']['max_samples']} questions, generate on gpu queue, "
          f"score on cpu queue) via API + workers vs inline run_pipeline; {args.rounds} round(s) after a warm-up", flush=True)
    # "deployed": `manage.py rqworker` as shipped (runs.worker.PreloadingWorker, settings.RQ);
    # "stock": RQ's own Worker, which re-imports the ML stack in every forked work-horse.
    phases = [("deployed", None)] + ([] if args.no_stock else [("stock", "rq.Worker")])
    api_runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in phases}
    latencies: dict[str, list[float]] = {}
    inline_runs: list[dict[str, Any]] = []
    try:
        for phase, worker_class in phases:
            workers = [start_worker("gpu", env, worker_class), start_worker("cpu", env, worker_class)]
            try:
                wait_for_workers(["gpu", "cpu"])
                time.sleep(1)
                latencies[phase] = enqueue_to_start(args.samples)
                print(f"  [{phase} workers] enqueue-to-start (no-op job, idle worker): p50 {median(latencies[phase]) * 1000:.0f} ms, "
                      f"p90 {percentile(latencies[phase], 90) * 1000:.0f} ms", flush=True)
                if not inline_runs:
                    inline(config_path, env)  # warm-up: disk caches, MLflow store, first-use paths
                through_api(client)  # warm-up
                for number in range(args.rounds):
                    api_runs[phase].append(through_api(client))
                    line = (f"  [{phase} workers] round {number + 1}: api + workers {api_runs[phase][-1]['seconds']:.2f}s "
                            f"(first job running after {api_runs[phase][-1]['created_to_first_job_seconds']:.2f}s)")
                    if phase == "deployed":
                        inline_runs.append(inline(config_path, env))
                        line += f", inline {inline_runs[-1]['seconds']:.2f}s (process wall {inline_runs[-1]['process_wall_seconds']:.2f}s)"
                    print(line, flush=True)
            finally:
                for worker in workers:
                    stop(worker)
    finally:
        config_path.unlink(missing_ok=True)
    inline_s = median([r["seconds"] for r in inline_runs])
    api_s = {phase: median([r["seconds"] for r in runs]) for phase, runs in api_runs.items()}
    report = {
        "config": CONFIG,
        "end_to_end_seconds": {"api_workers": round(api_s["deployed"], 3), "inline": round(inline_s, 3),
                               "inline_process_wall": round(median([r["process_wall_seconds"] for r in inline_runs]), 3)},
        "ratio": ratio(api_s["deployed"], inline_s, 3),
        "created_to_first_job_seconds": round(median([r["created_to_first_job_seconds"] for r in api_runs["deployed"]]), 3),
        "enqueue_to_start_seconds": {"p50": round(median(latencies["deployed"]), 4), "p90": round(percentile(latencies["deployed"], 90), 4),
                                     "max": round(max(latencies["deployed"]), 4), "samples": len(latencies["deployed"])},
        "rounds": {"inline": inline_runs, **{f"api_{phase}": runs for phase, runs in api_runs.items()}},
    }
    if "stock" in api_s:
        report["stock_worker"] = {
            "api_workers_seconds": round(api_s["stock"], 3), "ratio": ratio(api_s["stock"], inline_s, 3),
            "enqueue_to_start_p50": round(median(latencies["stock"]), 4),
        }
    report["targets"] = {
        "ratio": verdict(report["ratio"], 1.15, at_least=False),
        "enqueue_to_start_p50": verdict(report["enqueue_to_start_seconds"]["p50"], 0.5, at_least=False),
    }
    rows = [
        ["api + rq workers (as deployed: runs.worker.PreloadingWorker)", round(api_s["deployed"], 2), report["ratio"], report["targets"]["ratio"]],
    ]
    if "stock" in api_s:
        rows.append(["api + stock rq.Worker (reference)", round(api_s["stock"], 2), report["stock_worker"]["ratio"], ""])
    rows += [
        ["inline (run_pipeline)", round(inline_s, 2), "1.000", ""],
        ["enqueue-to-start p50 (s)", report["enqueue_to_start_seconds"]["p50"], "", report["targets"]["enqueue_to_start_p50"]],
    ]
    print_table("orchestration (median round; run created -> completed)", rows, ["what", "seconds", "api / inline", "target"])
    report["bench_seconds"] = round(time.monotonic() - started, 1)
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
