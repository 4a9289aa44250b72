"""Benchmark 7: what choosing the checkpoint by scored quality costs, and what overlapping the scoring saves.

    python3 bench/bench_selection.py [--database-url ...] [--redis-url ...] [--model local:tiny-llama] [--threads 1] [--json OUT]

The same fine-tune three ways, timed from its fine-tune job's start to the moment its adapter is known (the
fine-tune job's end without selection; the `select` job's end with it):

1. served, without selection (one gpu and one cpu `rqworker`, as deployed): the baseline;
2. served, with `selection` every N steps: the fine-tune answers the selection rows at each point and trains on
   while the cpu worker scores them (ours);
3. inline with `selection`: each point's answers are scored inside the training process before it trains on
   (the blocking way of the tools that score generations during training).

Ratios: (2) / (1), target <= 1.10; (2) / (3), target < 1. The chosen checkpoint and every checkpoint's scores must
be the same in (2) and (3). Uses its own database (default `mlops_bench_sel`) and Redis database
(redis://127.0.0.1:6379/13), a real `mlflow server` on loopback with its store under var/bench/selection (the inline
run, as the embedded default, uses the same server).
"""

from __future__ import annotations

import argparse
import atexit
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, print_table, ratio, verdict, write_json  # noqa: E402
from bench.bench_orchestration import _environment as environment  # noqa: E402
from bench.bench_orchestration import start_worker, stop, wait_for_workers  # noqa: E402

DEFAULT_DB = "postgres://postgres@127.0.0.1:5432/mlops_bench_sel"
DEFAULT_REDIS = "redis://127.0.0.1:6379/13"


def config(model: str, *, selection: bool, steps: int, every: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": f"bench-selection-{'on' if selection else 'off'}", "kind": "finetune", "model": {"base": model},
        "datasets": {"train": ["rag_qa_train"], "eval": ["ragas_eval"]},
        "training": {"epochs": 3, "max_steps": steps, "batch_size": 8, "learning_rate": 2e-3, "max_seq_length": 512, "seed": 42,
                     "lora": {"dropout": 0.0}, "validation_split": 0.1},
        "evaluation": {"metrics": ["semantic_similarity", "rouge_score"], "max_samples": 4, "max_new_tokens": 32, "compare_base": False},
    }
    if selection:
        out["selection"] = {"metric": "rouge_score", "every": every, "patience": None, "rows": 0.1, "max_rows": 16}
    return out


def start_mlflow_server(var_dir: Path) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on loopback, as served mode deploys it (scripts/served_mode.sh): workers talk HTTP to it
    instead of each forked job opening the SQLite store itself (about 1.1 s of schema checks per job, measured)."""
    from mlops_site.ports import free_port, wait_for_port

    port = free_port()
    log = open(var_dir / "mlflow-server.log", "wb")  # noqa: SIM115 - the server's log, open while it runs
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{var_dir / 'mlflow-server.db'}",
         "--artifacts-destination", str(var_dir / "mlflow-artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=var_dir, start_new_session=True,
    )
    atexit.register(stop, server)
    wait_for_port(port, timeout=120)
    return server, f"http://127.0.0.1:{port}"


def served_bench(args: argparse.Namespace, name: str, model: str) -> tuple[dict[str, str], Any]:
    """A benchmark's own database (created afresh, migrated), Redis queues emptied, var dir, a real MLflow server,
    the model built outside every timing, and an API client: (the environment for its worker processes, the client)."""
    import shutil

    from bench.bench_web import ensure_database

    var_dir = ROOT / "var" / "bench" / name
    shutil.rmtree(var_dir, ignore_errors=True)  # a fresh MLflow store each time, like the fresh database
    var_dir.mkdir(parents=True, exist_ok=True)
    _, tracking_uri = start_mlflow_server(var_dir)
    overrides = {**environment(args, var_dir), "MLFLOW_TRACKING_URI": tracking_uri}
    overrides.pop("MLFLOW_ARTIFACT_ROOT")
    env = {**os.environ, **overrides}
    os.environ.update(overrides)
    ensure_database(args.database_url, drop=True)
    import django

    django.setup()
    import django_rq
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from rest_framework.test import APIClient

    from training.local_models import resolve_model_path

    call_command("migrate", verbosity=0)
    resolve_model_path(model)
    django_rq.get_connection("cpu").flushdb()  # the bench's own Redis database: RQ ids restart with the database
    user, _ = get_user_model().objects.get_or_create(username=f"bench-{name}")
    client = APIClient()
    client.force_authenticate(user)
    return env, client


def adapter_known_seconds(run_id: int) -> dict[str, Any]:
    """The fine-tune job's start -> the adapter known (select's end, or the fine-tune's), and the run's whole time."""
    from runs.models import Job, PipelineRun

    run = PipelineRun.objects.get(pk=run_id)
    if run.status != "completed":
        raise RuntimeError(f"run {run_id} ended {run.status}: {run.error}\n{run.logs[-3000:]}")
    jobs = {j.label: j for j in Job.objects.filter(run_id=run_id)}
    finetune = jobs["finetune"]
    known = jobs["select"] if "select" in jobs else finetune
    points = sorted(((j.output["step"], j.output["metrics"]["rouge_score"]["mean"]) for k, j in jobs.items() if k.startswith("score_checkpoint")))
    return {
        "run_id": run_id, "seconds": round((known.finished_at - finetune.started_at).total_seconds(), 3),
        "training_job_seconds": round((finetune.finished_at - finetune.started_at).total_seconds(), 3),
        "run_seconds": round((run.finished_at - run.created_at).total_seconds(), 3),
        "chosen_step": (jobs["select"].output.get("chosen_step") if "select" in jobs else None), "points": points,
        "scoring_jobs_after_training": sum(1 for k, j in jobs.items() if k.startswith("score_checkpoint") and j.finished_at > finetune.finished_at),
    }


def served(client, body: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    from runs.models import PipelineRun

    response = client.post("/api/runs/", body, format="json")
    assert response.status_code == 201, response.content
    run_id = response.json()["id"]
    deadline = time.monotonic() + timeout
    while not PipelineRun.objects.get(pk=run_id).is_terminal:
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} did not finish in {timeout}s")
        time.sleep(0.2)
    return adapter_known_seconds(run_id)


def inline(body: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    import yaml

    from runs.models import PipelineRun

    path = Path(tempfile.mkstemp(prefix="bench-sel-", suffix=".yaml")[1])
    path.write_text(yaml.safe_dump(body))
    inline_env = {k: v for k, v in env.items() if k != "REDIS_URL"}
    before = PipelineRun.objects.order_by("-id").values_list("id", flat=True).first() or 0
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "manage.py"), "run_pipeline", str(path)], cwd=ROOT, env=inline_env,
                              capture_output=True, text=True, check=False)
    finally:
        path.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"run_pipeline failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return adapter_known_seconds(PipelineRun.objects.filter(id__gt=before).order_by("id").values_list("id", flat=True).last())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="checkpoint selection: served (overlapped) vs none vs inline (blocking)")
    parser.add_argument("--database-url", default=os.environ.get("BENCH_SEL_DATABASE_URL", DEFAULT_DB))
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS))
    parser.add_argument("--model", default="local:tiny-llama")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--every", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the gpu worker and of the inline run (no GPU here: a core as the device); "
                             "the cpu worker gets 1")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    started = time.monotonic()
    env, client = served_bench(args, "selection", args.model)
    # Without a GPU both workers would train and score on the same cores with torch's default threads each: four
    # spinning threads on two cores, and the scoring job would slow training fourfold (measured: 13,000 -> 3,000
    # tokens/s). As deployed, training has a device of its own; here it is a core: the gpu worker and the inline run
    # get --threads, the cpu worker one thread.
    device_env = {**env, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cpu_env = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(f"bench 7, selection: {args.model}, {args.steps} steps, a selection point every {args.every} steps, "
          f"served (1 gpu worker on {args.threads} thread(s) + 1 cpu worker on 1) with and without selection, "
          f"inline with selection on {args.threads} thread(s)", flush=True)
    workers = [start_worker("gpu", device_env), start_worker("cpu", cpu_env)]
    try:
        wait_for_workers(["gpu", "cpu"])
        off = served(client, config(args.model, selection=False, steps=args.steps, every=args.every))
        print(f"  served, no selection: {off['seconds']:.1f}s to the adapter", flush=True)
        on = served(client, config(args.model, selection=True, steps=args.steps, every=args.every))
        print(f"  served, selection:    {on['seconds']:.1f}s to the chosen adapter (training job {on['training_job_seconds']:.1f}s, "
              f"{on['scoring_jobs_after_training']} scoring job(s) ended after training)", flush=True)
    finally:
        for worker in workers:
            stop(worker)
    blocking = inline(config(args.model, selection=True, steps=args.steps, every=args.every), device_env)
    print(f"  inline (blocking):    {blocking['seconds']:.1f}s to the chosen adapter", flush=True)
    same_choice = on["chosen_step"] == blocking["chosen_step"]
    same_scores = on["points"] == blocking["points"]
    report = {
        "model": args.model, "steps": args.steps, "every": args.every, "threads": args.threads,
        "seconds_to_adapter": {"served_no_selection": off["seconds"], "served_selection": on["seconds"], "inline_blocking_selection": blocking["seconds"]},
        "ratio_selection_vs_none": ratio(on["seconds"], off["seconds"], 3),
        "ratio_overlapped_vs_blocking": ratio(on["seconds"], blocking["seconds"], 3),
        "same_chosen_checkpoint": same_choice, "identical_scores": same_scores,
        "chosen_step": {"served": on["chosen_step"], "inline": blocking["chosen_step"]},
        "points": {"served": on["points"], "inline": blocking["points"]},
        "runs": {"served_no_selection": off, "served_selection": on, "inline_blocking_selection": blocking},
    }
    report["targets"] = {
        "selection_vs_none": verdict(report["ratio_selection_vs_none"], 1.10, at_least=False),
        "overlapped_vs_blocking": "MET (faster)" if report["ratio_overlapped_vs_blocking"] < 1 else "NOT MET (not faster)",
        "same_choice_and_scores": "MET" if same_choice and same_scores else "NOT MET",
    }
    print_table("checkpoint selection (fine-tune job start -> adapter known)", [
        [f"served, selection every {args.every} steps (ours)", on["seconds"], report["ratio_selection_vs_none"], report["targets"]["selection_vs_none"]],
        ["served, no selection (baseline)", off["seconds"], "1.000", ""],
        ["inline, scoring inside training (blocking)", blocking["seconds"], report["ratio_overlapped_vs_blocking"], report["targets"]["overlapped_vs_blocking"]],
        ["same chosen checkpoint / identical scores", f"{same_choice} / {same_scores}", "", report["targets"]["same_choice_and_scores"]],
    ], ["what", "seconds", "ratio", "target"])
    report["bench_seconds"] = round(time.monotonic() - started, 1)
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
