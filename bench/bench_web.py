"""Benchmark 4: the web side under a long history (PostgreSQL, gunicorn, wrk).

    python3 bench/bench_web.py [--database-url postgres://postgres@127.0.0.1:5432/mlops_bench] [--json OUT]

Fills its own database (default `mlops_bench`, created here; reused on a rerun
when it already holds exactly the history below, else dropped and rebuilt) with
10,000 runs, 100,000 sample rows and 1,000 results owned by one user, then:

- counts the SQL queries of each request in-process (Django test client);
- serves the project with gunicorn (mlops_site/gunicorn_conf.py, as deployed)
  on a free loopback port and drives each URL with 32 concurrent clients:
  * paced (the latency targets): 32 clients, each on its own keep-alive
    connection, waiting a random 0.5-1.5 s between requests (the pages poll
    every 2 s); they join over the first second, as users do, rather than in
    one burst. p50/p99 latency of every request (connection set-up included),
    errors. A small stdlib client (threads + http.client) drives this, because
    wrk opens every connection at once and, with a think time, leaves them
    idle before the first request, which holds gthread workers waiting for data.
  * flood: wrk, the same 32 connections with no pause: the server saturated.
    Requests/s is its capacity; latency there is queueing (about 32 divided by
    requests/s), printed for information.

URLs: GET /api/runs/, GET /api/runs/{id}/ (token auth), the dashboard GET / and
the run-status HTMX fragment GET /runs/{id}/status/ (session cookie). A page
that does not exist yet is skipped with a printed note.

wrk comes from Debian: `apt-get update && apt-get install -y wrk`.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, percentile, print_table, verdict, write_json  # noqa: E402
from mlops_site.ports import free_port, wait_for_port  # noqa: E402

N_RUNS, N_SAMPLES, N_RESULTS = 10_000, 100_000, 1_000
SAMPLES_PER_RUN = 100  # 50 eval rows x 2 variants
RESULTS_PER_RUN = 8  # 4 metrics x 2 variants
BENCH_USER = "bench-owner"
TARGETS_P99_MS = {"api-list": 150, "api-detail": 150, "dashboard": 150, "status-fragment": 50}
DEFAULT_DB = "postgres://postgres@127.0.0.1:5432/mlops_bench"


# --- database ---------------------------------------------------------------------------------

def ensure_database(url: str, *, drop: bool) -> None:
    import psycopg

    parsed = urlparse(url)
    name = parsed.path.lstrip("/")
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise SystemExit(f"refusing database name {name!r}")
    admin = parsed._replace(path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists and drop:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            exists = None
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')


def django_setup(env: dict[str, str]) -> None:
    os.environ.update(env)
    import django

    django.setup()


def history_is_complete() -> bool:
    from runs.models import PipelineRun, RunResult, SampleResult

    return (
        PipelineRun.objects.count() == N_RUNS
        and PipelineRun.objects.filter(owner__username=BENCH_USER).exists()
        and SampleResult.objects.count() == N_SAMPLES
        and RunResult.objects.count() == N_RESULTS
    )


def populate() -> None:
    """10,000 runs of realistic size (config, logs, loss curve), 100,000 samples, 1,000 results."""
    import yaml
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction
    from django.utils import timezone

    from datasets_app.models import Dataset
    from runs.config import validate_config
    from runs.models import PipelineRun, RunEvent, RunResult, SampleResult

    rng = random.Random(6)
    user = get_user_model().objects.create_user(username=BENCH_USER, password="bench-passphrase-not-secret")
    other = get_user_model().objects.create_user(username="bench-other", password="bench-passphrase-not-secret")
    datasets = {d.name: d for d in Dataset.objects.all()}
    ragas_eval, rag_train = datasets["ragas_eval"], datasets["rag_qa_train"]
    finetune_config = validate_config(yaml.safe_load((ROOT / "configs" / "finetune_rag_qa.yaml").read_text()))
    eval_config = validate_config(yaml.safe_load((ROOT / "configs" / "eval_only.yaml").read_text()))
    statuses = ["completed"] * 80 + ["failed"] * 10 + ["cancelled"] * 5 + ["pending"] * 3 + ["training", "evaluating"]
    now = timezone.now()
    log_line = "[2026-01-01 00:00:00] step 10/74: loss 2.3456, lr 0.0002\n"
    runs = []
    for number in range(N_RUNS):
        finetune = number % 3 != 0
        status = rng.choice(statuses)
        config = finetune_config if finetune else eval_config
        runs.append(PipelineRun(
            name=f"{config['name']}-{number}", kind="finetune" if finetune else "eval_only", status=status, config=config,
            base_model=config.get("model", {}).get("base", "") if finetune else "", progress=100 if status == "completed" else rng.randint(0, 99),
            stage="done" if status == "completed" else "training: step 12/74", logs=log_line * rng.randint(40, 120),
            error="finetune failed: RuntimeError: CUDA out of memory" if status == "failed" else "",
            mlflow_experiment_id="1", mlflow_run_id=f"{number:032x}",
            registered_model_name="rag-finetune" if finetune and status == "completed" else "",
            registered_model_version=str(number) if finetune and status == "completed" else "",
            reproducibility={"seed": 42, "git_commit": "0" * 40, "libraries": {"torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2"},
                             "datasets": {"rag_qa_train": "0" * 64, "ragas_eval": "1" * 64}},
            train_history=[{"step": s, "loss": 3.0 - s / 100, "learning_rate": 2e-4, "epoch": round(s / 74, 4)} for s in range(1, 223)]
            if finetune else [],
            current_job="score:done" if status == "completed" else "", heartbeat_at=now, started_at=now, finished_at=now,
            owner=user if number % 50 else other,
        ))
    with transaction.atomic():
        created = PipelineRun.objects.bulk_create(runs, batch_size=500)
        ids = [r.pk for r in created]
        # auto_now_add stamped them all "now": spread them over the last 10,000 hours instead.
        with connection.cursor() as cursor:
            cursor.execute("UPDATE runs_pipelinerun SET created_at = %s - (interval '1 hour' * (%s - id))", [now, max(ids)])
        through_eval = PipelineRun.eval_datasets.through
        through_train = PipelineRun.train_datasets.through
        through_eval.objects.bulk_create([through_eval(pipelinerun_id=i, dataset_id=ragas_eval.pk) for i in ids], batch_size=2000)
        through_train.objects.bulk_create([through_train(pipelinerun_id=r.pk, dataset_id=rag_train.pk) for r in created if r.kind == "finetune"],
                                          batch_size=2000)
        RunEvent.objects.bulk_create([RunEvent(run_id=r.pk, from_status="pending", to_status=r.status, message="") for r in created], batch_size=2000)
        owned_completed = [r for r in created if r.status == "completed" and r.owner_id == user.pk]
        with_samples = owned_completed[: N_SAMPLES // SAMPLES_PER_RUN]
        with_results = with_samples[: N_RESULTS // RESULTS_PER_RUN]
        metrics = ["semantic_similarity", "rouge_score", "non_llm_context_precision", "non_llm_context_recall"]
        RunResult.objects.bulk_create([
            RunResult(run_id=r.pk, dataset_id=ragas_eval.pk, variant=variant, metric=metric, value=rng.random(), n_scored=50, n_failed=0)
            for r in with_results for variant in ("base", "finetuned") for metric in metrics
        ], batch_size=2000)
        context = "The Supreme Court held that the statute applied to every contract signed after the effective date. " * 3
        batch: list[SampleResult] = []
        for r in with_samples:
            for variant in ("base", "finetuned"):
                for index in range(SAMPLES_PER_RUN // 2):
                    batch.append(SampleResult(
                        run_id=r.pk, dataset_id=ragas_eval.pk, variant=variant, index=index,
                        question=f"What did the court hold in case {index}?", contexts=[context, context[:120]],
                        ground_truth="It held that the statute applied.", answer="The court held that the statute applied.",
                        scores={m: rng.random() for m in metrics}, reasons={},
                    ))
            if len(batch) >= 5000:
                SampleResult.objects.bulk_create(batch, batch_size=2500)
                batch = []
        SampleResult.objects.bulk_create(batch, batch_size=2500)
    # A long-lived database is vacuumed by autovacuum; do it now so that the
    # measurement sees that steady state (index-only scans, fresh statistics).
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")


# --- what to measure --------------------------------------------------------------------------

def bench_objects() -> dict[str, Any]:
    """The user, a token, a session cookie, and the run ids the URLs use."""
    from django.contrib.auth import get_user_model
    from django.test import Client
    from rest_framework.authtoken.models import Token

    from runs.models import PipelineRun, RunResult

    user = get_user_model().objects.get(username=BENCH_USER)
    token, _ = Token.objects.get_or_create(user=user)
    client = Client()
    client.force_login(user)
    with_results = RunResult.objects.filter(run__owner=user).order_by("run_id").values_list("run_id", flat=True)
    detail_id = with_results[len(with_results) // 2]
    active = PipelineRun.objects.filter(owner=user, status="training").order_by("-id").values_list("id", flat=True).first()
    if active is None:  # an embedded-mode page view reaped them (stale heartbeats): make one live again
        from django.utils import timezone

        active = PipelineRun.objects.filter(owner=user, kind="finetune").order_by("-id").values_list("id", flat=True).first()
        PipelineRun.objects.filter(pk=active).update(status="training", heartbeat_at=timezone.now(), finished_at=None, error="",
                                                     progress=40, stage="training: step 30/74", current_job="finetune:running")
    return {"user": user, "token": token.key, "session": client.cookies["sessionid"].value, "detail_id": detail_id, "active_id": active,
            "session_client": client}


def page_exists(client, path: str) -> tuple[bool, str]:
    """(exists, note): a page that is not built yet 404s, or (the dashboard) still redirects to the API."""
    from django.urls import Resolver404, resolve

    try:
        resolve(path)
    except Resolver404:
        return False, f"{path} has no URL yet (runs/page_urls.py): skipped"
    response = client.get(path, HTTP_HX_REQUEST="true")
    if response.status_code in (301, 302):
        return False, f"{path} still redirects to {response['Location']} (the dashboard is not built yet): skipped"
    if response.status_code >= 400:
        return False, f"{path} answered HTTP {response.status_code}: skipped"
    return True, ""


def count_queries(client, path: str, headers: dict[str, str]) -> tuple[int, int]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    client.get(path, **headers)  # warm: first-request caches (content types, ...) are not per-request cost
    with CaptureQueriesContext(connection) as queries:
        response = client.get(path, **headers)
    return len(queries), response.status_code


def parse_duration_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip()).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def paced_load(port: int, path: str, headers: dict[str, str], *, clients: int, seconds: float,
               think_ms: tuple[int, int]) -> dict[str, Any]:
    """`clients` users, each on a keep-alive connection, pausing think_ms between requests."""
    import http.client
    import threading

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    started = time.monotonic()

    def user(number: int) -> None:
        rng = random.Random(number)
        time.sleep(rng.uniform(0, think_ms[1] / 1000))  # users arrive over the first think interval
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() - started < seconds:
            begin = time.perf_counter()
            try:
                connection.request("GET", path, headers=headers)
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                status, error = None, f"{type(exc).__name__}: {exc}"
            elapsed = (time.perf_counter() - begin) * 1000
            with lock:
                latencies.append(elapsed)
                if status is None or status >= 400:
                    failures.append(error if status is None else f"HTTP {status}")
            time.sleep(rng.uniform(think_ms[0], think_ms[1]) / 1000)
        connection.close()

    threads = [threading.Thread(target=user, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 30)
    return {
        "p50_ms": round(percentile(latencies, 50), 2), "p90_ms": round(percentile(latencies, 90), 2),
        "p99_ms": round(percentile(latencies, 99), 2), "max_ms": round(max(latencies), 2), "requests": len(latencies),
        "requests_per_second": round(len(latencies) / seconds, 1), "errors": len(failures), "error_examples": sorted(set(failures))[:3],
    }


def run_wrk(url: str, headers: dict[str, str], *, seconds: int, connections: int, threads: int) -> dict[str, Any]:
    command = ["wrk", "--latency", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    output = subprocess.run(command + [url], capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    percentiles = {m.group(1): parse_duration_ms(m.group(2)) for m in re.finditer(r"^\s+(50|75|90|99)%\s+(\S+)", output, re.M)}
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    # A sync gunicorn worker closes the connection after each response; wrk counts the close
    # it did not expect as a read error even though the response was whole. Only connect
    # errors, timeouts and HTTP >= 400 are failed requests.
    errors = int(non_2xx.group(1)) if non_2xx else 0
    if socket_errors:
        errors += int(socket_errors.group(1)) + int(socket_errors.group(4))
    return {
        "p50_ms": round(percentiles["50"], 2), "p90_ms": round(percentiles["90"], 2), "p99_ms": round(percentiles["99"], 2),
        "requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)), "requests": requests, "errors": errors,
        "socket_errors": socket_errors.group(0) if socket_errors else None, "raw": output,
    }


# --- main -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="web and API latency and SQL queries under a long history")
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DB))
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"),
                        help="puts the server in served mode; these requests never touch it")
    parser.add_argument("--rebuild", action="store_true", help="drop and refill the bench database")
    parser.add_argument("--seconds", type=int, default=20, help="paced run per URL (after a 3 s wrk warm-up)")
    parser.add_argument("--flood-seconds", type=int, default=5, help="saturating wrk run per URL")
    parser.add_argument("--think-ms", default="500-1500", help="paced clients wait a random LOW-HIGH ms between requests")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="gunicorn workers (default: the web process's, WEB_CONCURRENCY or 2)")
    parser.add_argument("--threads", type=int, default=None, help="gunicorn threads per worker (default: WEB_THREADS or 4)")
    parser.add_argument("--conn-max-age", type=int, default=60, help="DB_CONN_MAX_AGE for the server (0 = a new connection per request)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    if not shutil.which("wrk"):
        raise SystemExit("bench_web needs wrk: apt-get update && apt-get install -y wrk")
    started = time.monotonic()
    var_dir = ROOT / "var" / "bench" / "web"
    var_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "DJANGO_SETTINGS_MODULE": "mlops_site.settings", "DATABASE_URL": args.database_url, "MLOPS_VAR_DIR": str(var_dir),
        "SECRET_KEY": "bench-only-secret-key-not-used-anywhere-else-0123456789", "DEBUG": "false",
        "ALLOWED_HOSTS": "127.0.0.1,localhost,testserver", "LOG_LEVEL": "WARNING", "DB_CONN_MAX_AGE": str(args.conn_max_age),
        # Served mode, as gunicorn runs in production: jobs would go to Redis (none are made
        # here), and the pages do not run the embedded-mode reaper.
        "REDIS_URL": args.redis_url,
    }
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    ensure_database(args.database_url, drop=args.rebuild)
    django_setup(env)
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    if not history_is_complete():
        print("bench 4, web: filling the bench database (10,000 runs, 100,000 samples, 1,000 results) ...", flush=True)
        from django.db import connections

        connections.close_all()
        ensure_database(args.database_url, drop=True)
        call_command("migrate", verbosity=0)
        t0 = time.monotonic()
        populate()
        print(f"  filled in {time.monotonic() - t0:.0f}s", flush=True)
    objects = bench_objects()
    token_headers = {"Authorization": f"Token {objects['token']}"}
    page_headers = {"Cookie": f"sessionid={objects['session']}", "HX-Request": "true"}
    status_id = objects["active_id"] or objects["detail_id"]
    endpoints = [
        ("api-list", "/api/runs/", token_headers),
        ("api-detail", f"/api/runs/{objects['detail_id']}/", token_headers),
        ("dashboard", "/", {"Cookie": page_headers["Cookie"]}),
        ("status-fragment", f"/runs/{status_id}/status/", page_headers),
    ]
    from django.test import Client

    api_client = Client(HTTP_AUTHORIZATION=token_headers["Authorization"])
    session_client = objects["session_client"]
    notes: list[str] = []
    measured: list[tuple[str, str, dict[str, str], Any]] = []
    for name, path, headers in endpoints:
        client = api_client if name.startswith("api") else session_client
        if not name.startswith("api"):
            exists, note = page_exists(client, path)
            if not exists:
                notes.append(f"{name}: {note}")
                continue
        measured.append((name, path, headers, client))
    queries = {}
    for name, path, _, client in measured:
        extra = {"HTTP_HX_REQUEST": "true"} if name == "status-fragment" else {}
        queries[name], status_code = count_queries(client, path, extra)
        if status_code >= 400:
            raise SystemExit(f"{path} answered {status_code} in-process")

    from django.db import connections

    connections.close_all()
    port = free_port()
    workers = args.workers or int(os.environ.get("WEB_CONCURRENCY", "2"))
    threads = args.threads or int(os.environ.get("WEB_THREADS", "4"))
    # The web process exactly as deployed (mlops_site/gunicorn_conf.py), on a loopback port.
    gunicorn = [str(Path(sys.executable).parent / "gunicorn"), "-c", "python:mlops_site.gunicorn_conf", "mlops_site.wsgi"]
    server_env = {**os.environ, **env, "WEB_BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": str(workers), "WEB_THREADS": str(threads)}
    print(f"bench 4, web: {N_RUNS} runs, {N_SAMPLES} samples, {N_RESULTS} results in {urlparse(args.database_url).path.lstrip('/')}; "
          f"gunicorn {workers} worker(s) x {threads} thread(s), DB_CONN_MAX_AGE={args.conn_max_age}; "
          f"{args.connections} clients per URL on loopback: paced ({args.think_ms} ms think time) {args.seconds}s, "
          f"flood (wrk) {args.flood_seconds}s", flush=True)
    think = tuple(int(x) for x in args.think_ms.split("-"))
    server = subprocess.Popen(gunicorn, cwd=ROOT, env=server_env, start_new_session=True, stdout=subprocess.DEVNULL)
    results: dict[str, Any] = {}
    try:
        wait_for_port(port, timeout=60.0)
        for name, path, headers, _ in measured:
            url = f"http://127.0.0.1:{port}{path}"
            run_wrk(url, headers, seconds=3, connections=args.connections, threads=2)  # warm-up: imports, connections
            flood = run_wrk(url, headers, seconds=args.flood_seconds, connections=args.connections, threads=2)
            paced = paced_load(port, path, headers, clients=args.connections, seconds=args.seconds, think_ms=think)
            errors = paced["errors"] + flood["errors"]
            outcome = {
                "path": path, "queries": queries[name], "p50_ms": paced["p50_ms"], "p99_ms": paced["p99_ms"],
                "paced_requests": paced["requests"], "paced_requests_per_second": paced["requests_per_second"],
                "capacity_requests_per_second": flood["requests_per_second"], "flood_p50_ms": flood["p50_ms"], "flood_p99_ms": flood["p99_ms"],
                "errors": errors, "target_p99_ms": TARGETS_P99_MS[name],
            }
            outcome["target"] = verdict(outcome["p99_ms"], TARGETS_P99_MS[name], at_least=False) + ("" if not errors else f", {errors} errors")
            results[name] = outcome
            print(f"  {name:16s} paced p50 {paced['p50_ms']:7.2f} ms p99 {paced['p99_ms']:7.2f} ms ({paced['requests']} req)  "
                  f"flood {flood['requests_per_second']:7.1f} req/s (p99 {flood['p99_ms']:.0f} ms)  {errors} errors  {queries[name]} queries",
                  flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    report = {
        "history": {"runs": N_RUNS, "samples": N_SAMPLES, "results": N_RESULTS},
        "server": {"workers": workers, "threads": threads, "db_conn_max_age": args.conn_max_age},
        "load": {"paced": "stdlib threads + http.client", "flood": "wrk", "clients": args.connections, "paced_seconds": args.seconds, "think_ms": args.think_ms,
                 "flood_seconds": args.flood_seconds},
        "endpoints": results, "skipped": notes, "bench_seconds": round(time.monotonic() - started, 1),
    }
    print_table(f"web and API under a long history ({args.connections} concurrent clients)", [
        [name, r["path"], r["queries"], r["p50_ms"], r["p99_ms"], r["capacity_requests_per_second"], r["flood_p99_ms"], r["errors"], r["target"]]
        for name, r in results.items()
    ], ["endpoint", "path", "SQL queries", "p50 ms", "p99 ms", "capacity req/s", "flood p99 ms", "errors", "p99 target (paced)"])
    for note in notes:
        print(f"  note: {note}")
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
