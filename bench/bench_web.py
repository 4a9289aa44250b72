"""Benchmark 4: the web side under a long history (PostgreSQL, gunicorn, wrk), at two history sizes.

    python3 bench/bench_web.py [--size 10k|100k|both] [--database-url postgres://postgres@127.0.0.1:5432/mlops_bench] [--json OUT]
    python3 bench/bench_web.py --size 10k --profile dashboard      # pyinstrument over in-process requests, no server

Each size has its own database, created here and reused on a rerun when it
already holds exactly that history (else dropped and refilled):

| size | database | runs | sample rows | results |
|---|---|---|---|---|
| 10k | `mlops_bench` (`--database-url`) | 10,000 | 100,000 | 1,000 |
| 100k | the same name + `_100k` | 100,000 | 1,000,000 | 10,000 |

One completed fine-tune in each (`bench-results-5000-samples`) has 5,000 of
those samples (2,500 eval rows x base and fine-tuned) for the results page; the
rest are 100 per run. Rows are filled with PostgreSQL COPY through Django's
connection, in batches, printing progress (~10 s for 10k, ~1.5 min for 100k on
2 cores). Then, for each size:

- counts the SQL queries of each request in-process (Django test client): they
  must be the same at both sizes (printed, and `queries_equal` in the JSON);
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

URLs: GET /api/runs/, GET /api/runs/{id}/ (token auth), the dashboard GET /,
the run-status HTMX fragment GET /runs/{id}/status/ and the results page
GET /runs/{id}/results/ of the 5,000-sample run (session cookie). A page that
does not exist yet is skipped with a printed note. `--size both` (the default)
runs each size in its own process, one after the other, then prints one row
per (size, URL) and whether the query counts are equal across the sizes.

wrk comes from Debian: `apt-get update && apt-get install -y wrk`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, percentile, print_table, verdict, write_json  # noqa: E402
from mlops_site.ports import free_port, wait_for_port  # noqa: E402


@dataclass(frozen=True)
class History:
    runs: int
    samples: int
    results: int
    db_suffix: str  # appended to the --database-url's database name


SIZES = {"10k": History(10_000, 100_000, 1_000, ""), "100k": History(100_000, 1_000_000, 10_000, "_100k")}
SAMPLES_PER_RUN = 100  # 50 eval rows x 2 variants
RESULTS_PER_RUN = 8  # 4 metrics x 2 variants
BIG_RUN_NAME = "bench-results-5000-samples"
BIG_RUN_ROWS = 2_500  # x 2 variants = 5,000 samples
METRICS = ["semantic_similarity", "rouge_score", "non_llm_context_precision", "non_llm_context_recall"]
BENCH_USER = "bench-owner"
TARGETS_P99_MS = {"api-list": 150, "api-detail": 150, "dashboard": 150, "status-fragment": 50, "results-page": 300}
DEFAULT_DB = "postgres://postgres@127.0.0.1:5432/mlops_bench"
HISTORY_SPAN = timedelta(hours=10_000)  # the runs' created_at spread over the last ~14 months, at either size


def size_database_url(url: str, size: str) -> str:
    parsed = urlparse(url)
    return parsed._replace(path="/" + parsed.path.lstrip("/") + SIZES[size].db_suffix).geturl()


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


def history_is_complete(history: History) -> bool:
    from runs.models import PipelineRun, RunResult, SampleResult

    big = PipelineRun.objects.filter(name=BIG_RUN_NAME).values_list("pk", flat=True).first()
    return (
        big is not None
        and PipelineRun.objects.count() == history.runs
        and PipelineRun.objects.filter(owner__username=BENCH_USER).exists()
        and SampleResult.objects.count() == history.samples
        and SampleResult.objects.filter(run_id=big).count() == 2 * BIG_RUN_ROWS
        and RunResult.objects.count() == history.results
    )


class Copier:
    """Rows into a model's table with PostgreSQL COPY (through Django's connection), every concrete column.

    Columns a row leaves out get the field's default; the primary key is left to
    the database unless `with_pk`. JSON values are serialised once per distinct
    object (the shared config, loss curve, ...).
    """

    def __init__(self, model, *, with_pk: bool = False) -> None:
        self.model = model
        self.fields = [f for f in model._meta.concrete_fields if with_pk or not f.primary_key]
        self.defaults = {f.attname: f.get_default() for f in self.fields}
        self.json_fields = {f.attname for f in self.fields if f.get_internal_type() == "JSONField"}
        self._json: dict[int, tuple[Any, str]] = {}

    def _dump(self, value: Any) -> str | None:
        if value is None:
            return None
        cached = self._json.get(id(value))
        if cached is None or cached[0] is not value:
            cached = (value, json.dumps(value))
            if isinstance(value, (dict, list)) and len(self._json) < 10_000:
                self._json[id(value)] = cached
        return cached[1]

    def copy(self, rows: Iterable[dict[str, Any]]) -> int:
        from django.db import connection

        table = connection.ops.quote_name(self.model._meta.db_table)
        columns = ", ".join(connection.ops.quote_name(f.column) for f in self.fields)
        names = [f.attname for f in self.fields]
        count = 0
        connection.ensure_connection()
        with connection.cursor() as cursor, cursor.cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
            for row in rows:
                values = []
                for name in names:
                    value = row[name] if name in row else self.defaults[name]
                    values.append(self._dump(value) if name in self.json_fields else value)
                copy.write_row(values)
                count += 1
        return count


def in_batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def populate(history: History) -> None:
    """`history.runs` runs of realistic size (config, logs, loss curve), their samples and results, by COPY."""
    import yaml
    from django.contrib.auth import get_user_model
    from django.core.management.color import no_style
    from django.db import connection
    from django.utils import timezone

    from datasets_app.models import Dataset
    from runs.config import validate_config
    from runs.models import PipelineRun, RunEvent, RunResult, SampleResult, ScoreComparison

    started = time.monotonic()

    def progress(what: str, done: int, total: int) -> None:
        print(f"  filling: {what} {done:,}/{total:,} ({time.monotonic() - started:.0f}s)", flush=True)

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
    logs = [log_line * n for n in range(40, 121)]  # 2-7 KB, shared strings (the rows still store each copy)
    train_history = [{"step": s, "loss": 3.0 - s / 100, "learning_rate": 2e-4, "epoch": round(s / 74, 4)} for s in range(1, 223)]
    reproducibility = {"seed": 42, "git_commit": "0" * 40, "libraries": {"torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2"},
                       "datasets": {"rag_qa_train": "0" * 64, "ragas_eval": "1" * 64}}
    step = HISTORY_SPAN / history.runs
    big_number = history.runs // 2

    # Run ids are ours (1..N: a fresh database), so samples and results can name them without reading them back.
    kinds: dict[int, str] = {}
    status_of: dict[int, str] = {}
    owner_of: dict[int, int] = {}

    def runs() -> Iterator[dict[str, Any]]:
        for number in range(history.runs):
            pk = number + 1
            finetune = number % 3 != 0 or number == big_number
            status = "completed" if number == big_number else rng.choice(statuses)
            owner = user if number % 50 or number == big_number else other
            config = finetune_config if finetune else eval_config
            kinds[pk], status_of[pk], owner_of[pk] = ("finetune" if finetune else "eval_only"), status, owner.pk
            created = now - step * (history.runs - number)
            started_at = None if status == "pending" else created + timedelta(seconds=5)
            finished_at = started_at + timedelta(seconds=rng.randint(60, 900)) if status in ("completed", "failed", "cancelled") and started_at else None
            yield {
                "id": pk, "name": BIG_RUN_NAME if number == big_number else f"{config['name']}-{number}",
                "kind": kinds[pk], "status": status, "config": config,
                "base_model": config.get("model", {}).get("base", "") if finetune else "",
                "progress": 100 if status == "completed" else rng.randint(0, 99),
                "stage": "done" if status == "completed" else "training: step 12/74", "logs": rng.choice(logs),
                "error": "finetune failed: RuntimeError: CUDA out of memory" if status == "failed" else "",
                "mlflow_experiment_id": "1", "mlflow_run_id": f"{number:032x}",
                "registered_model_name": "rag-finetune" if finetune and status == "completed" else "",
                "registered_model_version": str(number) if finetune and status == "completed" else "",
                "reproducibility": reproducibility, "train_history": train_history if finetune else [],
                "current_job": "score:done" if status == "completed" else "", "heartbeat_at": now if started_at else None,
                "created_at": created, "started_at": started_at, "finished_at": finished_at, "owner_id": owner.pk,
            }

    run_copier = Copier(PipelineRun, with_pk=True)
    done = 0
    for batch in in_batches(runs(), 10_000):
        done += run_copier.copy(batch)
        progress("runs", done, history.runs)
    ids = range(1, history.runs + 1)
    Copier(PipelineRun.eval_datasets.through).copy({"pipelinerun_id": i, "dataset_id": ragas_eval.pk} for i in ids)
    Copier(PipelineRun.train_datasets.through).copy({"pipelinerun_id": i, "dataset_id": rag_train.pk} for i in ids if kinds[i] == "finetune")
    Copier(RunEvent).copy({"run_id": i, "from_status": "pending", "to_status": status_of[i], "message": "", "at": now} for i in ids)
    progress("datasets and events of runs", history.runs, history.runs)

    big = big_number + 1
    # The newest completed runs have the samples and results, so the dashboard's first page shows headline scores.
    owned_completed = [i for i in reversed(ids) if status_of[i] == "completed" and owner_of[i] == user.pk and i != big]
    with_samples = owned_completed[: (history.samples - 2 * BIG_RUN_ROWS) // SAMPLES_PER_RUN]
    with_results = [big, *with_samples[: history.results // RESULTS_PER_RUN - 1]]
    Copier(RunResult).copy(
        {"run_id": r, "dataset_id": ragas_eval.pk, "variant": variant, "metric": metric, "value": rng.random(), "n_scored": 50 if r != big else BIG_RUN_ROWS,
         "n_failed": 0}
        for r in with_results for variant in ("base", "finetuned") for metric in METRICS
    )
    Copier(ScoreComparison).copy(
        {"run_id": big, "dataset_id": ragas_eval.pk, "metric": metric, "n_pairs": BIG_RUN_ROWS, "base_mean": 0.41, "finetuned_mean": 0.47, "delta": 0.06,
         "ci_low": 0.04, "ci_high": 0.08, "p_value": 0.0001, "p_adjusted": 0.0004, "verdict": "better",
         "method": {"interval": "paired bootstrap", "test": "wilcoxon", "resamples": 2000, "seed": 0, "confidence": 0.95}}
        for metric in METRICS[:2]
    )
    context = "The Supreme Court held that the statute applied to every contract signed after the effective date. " * 3
    contexts = [context, context[:120]]
    answers = ["The court held that the statute applied.",
               "The court held that the statute applied to every contract signed after the effective date, and the lower court's "
               "reading was reversed; the parties were sent back to argue damages under the new rule."]

    def samples() -> Iterator[dict[str, Any]]:
        for run_id, rows in [(big, BIG_RUN_ROWS)] + [(r, SAMPLES_PER_RUN // 2) for r in with_samples]:
            for variant in ("base", "finetuned"):
                for index in range(rows):
                    yield {
                        "run_id": run_id, "dataset_id": ragas_eval.pk, "variant": variant, "index": index,
                        "question": f"What did the court hold in case {index}?", "contexts": contexts,
                        "ground_truth": "It held that the statute applied.", "answer": answers[index % 2],
                        "scores": {m: rng.random() for m in METRICS}, "reasons": {},
                    }

    sample_copier = Copier(SampleResult)
    done = 0
    for batch in in_batches(samples(), 100_000):
        done += sample_copier.copy(batch)
        progress("samples", done, history.samples)
    with connection.cursor() as cursor:
        for sql in connection.ops.sequence_reset_sql(no_style(), [PipelineRun, RunEvent, RunResult, SampleResult, ScoreComparison,
                                                                  PipelineRun.eval_datasets.through, PipelineRun.train_datasets.through]):
            cursor.execute(sql)
    # A long-lived database is vacuumed by autovacuum; do it now so that the
    # measurement sees that steady state (index-only scans, fresh statistics).
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")
    progress("vacuum analyze", 1, 1)


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
    big = PipelineRun.objects.filter(name=BIG_RUN_NAME).values_list("pk", flat=True).get()
    with_results = list(RunResult.objects.filter(run__owner=user).exclude(run_id=big).order_by("run_id").values_list("run_id", flat=True).distinct())
    detail_id = with_results[len(with_results) // 2]
    active = PipelineRun.objects.filter(owner=user, status="training").order_by("-id").values_list("id", flat=True).first()
    if active is None:  # an embedded-mode page view reaped them (stale heartbeats): make one live again
        from django.utils import timezone

        active = PipelineRun.objects.filter(owner=user, kind="finetune").order_by("-id").values_list("id", flat=True).first()
        PipelineRun.objects.filter(pk=active).update(status="training", heartbeat_at=timezone.now(), finished_at=None, error="",
                                                     progress=40, stage="training: step 30/74", current_job="finetune:running")
    return {"user": user, "token": token.key, "session": client.cookies["sessionid"].value, "detail_id": detail_id, "active_id": active,
            "big_id": big, "session_client": client}


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

def bench_env(args: argparse.Namespace, database_url: str) -> dict[str, str]:
    var_dir = ROOT / "var" / "bench" / "web"
    var_dir.mkdir(parents=True, exist_ok=True)
    return {
        "DJANGO_SETTINGS_MODULE": "mlops_site.settings", "DATABASE_URL": database_url, "MLOPS_VAR_DIR": str(var_dir),
        "SECRET_KEY": "bench-only-secret-key-not-used-anywhere-else-0123456789", "DEBUG": "false",
        "ALLOWED_HOSTS": "127.0.0.1,localhost,testserver", "LOG_LEVEL": "WARNING", "DB_CONN_MAX_AGE": str(args.conn_max_age),
        # Served mode, as gunicorn runs in production: jobs would go to Redis (none are made
        # here), and the pages do not run the embedded-mode reaper.
        "REDIS_URL": args.redis_url,
    }


def prepare(args: argparse.Namespace, size: str) -> tuple[dict[str, str], list[tuple[str, str, dict[str, str], Any]], list[str]]:
    """Database filled (or reused), Django set up; returns (env, [(name, path, headers, in-process client)], notes)."""
    history = SIZES[size]
    database_url = size_database_url(args.database_url, size)
    env = bench_env(args, database_url)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    ensure_database(database_url, drop=args.rebuild)
    django_setup(env)
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    if not history_is_complete(history):
        print(f"bench 4, web [{size}]: filling {urlparse(database_url).path.lstrip('/')} ({history.runs:,} runs, {history.samples:,} samples, "
              f"{history.results:,} results) ...", flush=True)
        from django.db import connections

        connections.close_all()
        ensure_database(database_url, drop=True)
        call_command("migrate", verbosity=0)
        t0 = time.monotonic()
        populate(history)
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
        ("results-page", f"/runs/{objects['big_id']}/results/", {"Cookie": page_headers["Cookie"]}),
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
    return env, measured, notes


def in_process_headers(name: str) -> dict[str, str]:
    return {"HTTP_HX_REQUEST": "true"} if name == "status-fragment" else {}


def profile(args: argparse.Namespace, size: str, wanted: list[str]) -> None:
    """pyinstrument over `--profile-requests` in-process requests of each wanted URL (no server, no load)."""
    from pyinstrument import Profiler

    _, measured, notes = prepare(args, size)
    for note in notes:
        print(f"  note: {note}")
    for name, path, _, client in measured:
        if wanted != ["all"] and name not in wanted:
            continue
        headers = in_process_headers(name)
        client.get(path, **headers)  # warm
        t0 = time.perf_counter()
        profiler = Profiler(interval=0.0005)
        profiler.start()
        for _ in range(args.profile_requests):
            client.get(path, **headers)
        profiler.stop()
        per_request = (time.perf_counter() - t0) * 1000 / args.profile_requests
        print(f"\n######## profile [{size}] {name} {path}: {args.profile_requests} requests, {per_request:.1f} ms each (profiler on)")
        from pyinstrument.renderers import ConsoleRenderer

        print(profiler.output_text(unicode=False, color=False, show_all=False))
        flat = profiler.output(ConsoleRenderer(flat=True, flat_time="self", show_all=True, processor_options={"filter_threshold": 0.01}))
        print("  self time by function (the top 25):")
        print("\n".join(flat.splitlines()[:32]))


def run_size(args: argparse.Namespace, size: str) -> dict[str, Any]:
    history = SIZES[size]
    started = time.monotonic()
    load_at_start = os.getloadavg()
    env, measured, notes = prepare(args, size)
    queries = {}
    for name, path, _, client in measured:
        queries[name], status_code = count_queries(client, path, in_process_headers(name))
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
    print(f"bench 4, web [{size}]: {history.runs:,} runs, {history.samples:,} samples, {history.results:,} results in "
          f"{urlparse(env['DATABASE_URL']).path.lstrip('/')}; gunicorn {workers} worker(s) x {threads} thread(s), "
          f"DB_CONN_MAX_AGE={args.conn_max_age}; {args.connections} clients per URL on loopback: paced ({args.think_ms} ms think time) "
          f"{args.seconds}s, flood (wrk) {args.flood_seconds}s; load average {', '.join(f'{x:.2f}' for x in load_at_start)}", flush=True)
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
            print(f"  [{size}] {name:16s} paced p50 {paced['p50_ms']:7.2f} ms p99 {paced['p99_ms']:7.2f} ms ({paced['requests']} req)  "
                  f"flood {flood['requests_per_second']:7.1f} req/s (p99 {flood['p99_ms']:.0f} ms)  {errors} errors  {queries[name]} queries",
                  flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    return {
        "size": size, "history": {"runs": history.runs, "samples": history.samples, "results": history.results,
                                  "results_page_run_samples": 2 * BIG_RUN_ROWS},
        "database": urlparse(env["DATABASE_URL"]).path.lstrip("/"), "load_average_at_start": [round(x, 2) for x in load_at_start],
        "server": {"workers": workers, "threads": threads, "db_conn_max_age": args.conn_max_age},
        "load": {"paced": "stdlib threads + http.client", "flood": "wrk", "clients": args.connections, "paced_seconds": args.seconds, "think_ms": args.think_ms,
                 "flood_seconds": args.flood_seconds},
        "endpoints": results, "skipped": notes, "bench_seconds": round(time.monotonic() - started, 1),
    }


def combine(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One report over the sizes: every (size, URL) row, and whether each URL's query count is the same at every size."""
    names = list(dict.fromkeys(name for r in reports.values() for name in r["endpoints"]))
    counts = {name: {size: r["endpoints"][name]["queries"] for size, r in reports.items() if name in r["endpoints"]} for name in names}
    equal = {name: len(set(c.values())) == 1 and len(c) == len(reports) for name, c in counts.items()}
    return {"sizes": reports, "query_counts": counts, "queries_equal_per_url": equal, "queries_equal": all(equal.values()) if equal else None}


def print_report(report: dict[str, Any]) -> None:
    reports = report["sizes"]
    clients = next(iter(reports.values()))["load"]["clients"] if reports else 32
    print_table(f"web and API under a long history ({clients} paced clients)", [
        [size, f"{r['history']['runs']:,}/{r['history']['samples']:,}", name, e["path"], e["queries"], e["p50_ms"], e["p99_ms"],
         e["capacity_requests_per_second"], e["errors"], e["target"]]
        for size, r in reports.items() for name, e in r["endpoints"].items()
    ], ["size", "runs/samples", "endpoint", "path", "SQL queries", "p50 ms", "p99 ms", "capacity req/s", "errors", "p99 target (paced)"])
    if len(reports) > 1:
        for name, counts in report["query_counts"].items():
            same = "equal" if report["queries_equal_per_url"][name] else "DIFFERENT"
            print(f"  queries {name}: " + ", ".join(f"{size} {n}" for size, n in counts.items()) + f": {same}")
        print(f"  query counts equal across sizes: {'yes' if report['queries_equal'] else 'NO'}")
    for size, r in reports.items():
        for note in r["skipped"]:
            print(f"  note [{size}]: {note}")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description="web and API latency and SQL queries under a long history, at two sizes")
    parser.add_argument("--size", choices=[*SIZES, "both"], default="both", help="history size (default: both, one after the other)")
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DB),
                        help="the 10k database; the 100k one is the same name + _100k")
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"),
                        help="puts the server in served mode; these requests never touch it")
    parser.add_argument("--rebuild", action="store_true", help="drop and refill the bench database(s)")
    parser.add_argument("--seconds", type=int, default=20, help="paced run per URL (after a 3 s wrk warm-up)")
    parser.add_argument("--flood-seconds", type=int, default=5, help="saturating wrk run per URL")
    parser.add_argument("--think-ms", default="500-1500", help="paced clients wait a random LOW-HIGH ms between requests")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="gunicorn workers (default: the web process's, WEB_CONCURRENCY or 2)")
    parser.add_argument("--threads", type=int, default=None, help="gunicorn threads per worker (default: WEB_THREADS or 4)")
    parser.add_argument("--conn-max-age", type=int, default=60, help="DB_CONN_MAX_AGE for the server (0 = a new connection per request)")
    parser.add_argument("--profile", default=None, metavar="NAMES",
                        help="instead of the load: pyinstrument over in-process requests of these URLs (comma-separated names, or all)")
    parser.add_argument("--profile-requests", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    if args.profile:
        if args.size == "both":
            raise SystemExit("--profile needs one --size")
        profile(args, args.size, args.profile.split(","))
        return None
    if not shutil.which("wrk"):
        raise SystemExit("bench_web needs wrk: apt-get update && apt-get install -y wrk")
    if args.size != "both":
        report = combine({args.size: run_size(args, args.size)})
    else:
        # Django is set up once per process, on one database: each size runs in its own process.
        reports = {}
        forwarded = ["--database-url", args.database_url, "--redis-url", args.redis_url, "--seconds", str(args.seconds),
                     "--flood-seconds", str(args.flood_seconds), "--think-ms", args.think_ms, "--connections", str(args.connections),
                     "--conn-max-age", str(args.conn_max_age)] + (["--rebuild"] if args.rebuild else [])
        forwarded += (["--workers", str(args.workers)] if args.workers else []) + (["--threads", str(args.threads)] if args.threads else [])
        for size in SIZES:
            with tempfile.TemporaryDirectory(prefix=f"bench-web-{size}-") as tmp:
                out = Path(tmp) / "result.json"
                subprocess.run([sys.executable, __file__, "--size", size, "--json", str(out), *forwarded], cwd=ROOT, check=True)
                reports[size] = json.loads(out.read_text())["sizes"][size]
        report = combine(reports)
    print_report(report)
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
