"""What the README promises, tested only through what a user or an operator
touches: HTTP (pages and API), management commands, `scripts/served_mode.sh`,
real `rqworker`, `runserver` and `mlflow server` processes. Nothing here imports
the run lifecycle's internals (orchestration, execution, step bodies), so the
tests hold whatever shape that code takes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import psutil
import pytest
import requests
from django.conf import settings
from django.core.management import call_command

from tests.conftest import ROOT, free_port, wait_for_port, worker_env
from tests.judge_server import LocalHTTPServer, _last_input
from tests.served.test_served_mode import topology  # noqa: F401 - the fixture: scripts/served_mode.sh on this test's database and Redis

from .fault_tools import Processes, kill_tree, wait_until

pytestmark = [pytest.mark.reliability]

TERMINAL = {"completed", "failed", "cancelled"}
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def manage(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


# --- run_pipeline --dry-run and --enqueue --wait with the shipped configs -------------------


@pytest.mark.django_db
@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_run_pipeline_dry_run_accepts_each_shipped_config_and_stores_nothing(config, capsys):
    from runs.models import PipelineRun

    call_command("run_pipeline", str(config), "--dry-run")
    assert capsys.readouterr().out.strip() == f"{config}: valid"
    assert not PipelineRun.objects.exists()


@pytest.fixture
def workers(redis_url, tmp_path) -> Iterator[Processes]:
    """One `rqworker gpu` and one `rqworker cpu` on the test Redis and database."""
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    procs = Processes(redis_url, tmp_path)
    procs.worker("gpu")
    procs.worker("cpu")
    try:
        yield procs
    finally:
        procs.close()


def enqueue_and_wait(config: Path, redis_url: str, processes: Processes, timeout: float, *overrides: str) -> subprocess.CompletedProcess:
    sets = [arg for override in overrides for arg in ("--set", override)]
    result = manage("run_pipeline", str(config), "--enqueue", "--wait", *sets, env=worker_env(redis_url), timeout=timeout)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-3000:]}\n{processes.logs()}"
    return result


def assert_completed_with_every_metric(config: Path, output: str) -> None:
    from runs.config import parse_yaml
    from runs.models import PipelineRun

    data = parse_yaml(config.read_text())
    run = PipelineRun.objects.get(name=data["name"])
    assert run.status == "completed", run.logs[-3000:]
    assert f"run #{run.pk} {run.name} ({run.kind}) created" in output
    variants = {"finetuned", "base"} if data["kind"] == "finetune" else {"dataset"}
    expected = {(d, v, m) for d in data["datasets"]["eval"] for v in variants for m in data["evaluation"]["metrics"]}
    measured = {(r.dataset.name, r.variant, r.metric) for r in run.results.select_related("dataset") if r.value is not None}
    assert measured == expected, (measured ^ expected)
    for metric in data["evaluation"]["metrics"]:
        assert re.search(rf"^{data['datasets']['eval'][0]}\s+{metric}\s+\d", output, re.M), output  # the score table


@pytest.mark.served
@pytest.mark.django_db(transaction=True)
def test_run_pipeline_enqueue_wait_completes_the_shipped_eval_only_config_on_workers(workers, redis_url):
    config = ROOT / "configs" / "eval_only.yaml"
    result = enqueue_and_wait(config, redis_url, workers, timeout=600)
    assert_completed_with_every_metric(config, result.stdout)


@pytest.mark.served
@pytest.mark.pipeline
@pytest.mark.timeout(2400)
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("name", ["finetune_rag_qa.yaml", "multi_dataset.yaml"])
def test_run_pipeline_enqueue_wait_completes_the_shipped_finetune_configs_on_workers(workers, redis_url, tiny_model, smollm2_model, name):
    config = ROOT / "configs" / name
    # The shipped file as it is, only shorter: a few steps, answers and tokens (`make run` runs it whole).
    result = enqueue_and_wait(config, redis_url, workers, 2300, "training.max_steps=3", "evaluation.max_samples=4",
                              "evaluation.max_new_tokens=16")
    assert_completed_with_every_metric(config, result.stdout)


# --- the embedded default: `make serve` (runserver), runs in the server process ------------


class EmbeddedServer:
    """`manage.py runserver` on a fresh embedded default: SQLite, no Redis, jobs in the server process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "TEST_REDIS_URL", "DATABASE_URL", "MLFLOW_TRACKING_URI", "SECRET_KEY")}
        self.env.update({
            "DJANGO_SETTINGS_MODULE": "mlops_site.settings", "MLOPS_VAR_DIR": str(root / "var"), "MLOPS_MODELS_DIR": str(settings.MODELS_DIR),
            "DEBUG": "false", "HEARTBEAT_SECONDS": "1",  # as `make serve`: no SECRET_KEY (one is generated under var/)
            "DJANGO_SUPERUSER_PASSWORD": "embedded-test-passphrase",
        })
        self.proc: subprocess.Popen | None = None
        self.log = root / "runserver.log"

    def start(self) -> None:
        for args in (("migrate", "--noinput"), ("createsuperuser", "--noinput", "--username", "owner", "--email", "owner@example.com")):
            done = manage(*args, env=self.env)
            assert done.returncode == 0, done.stdout + done.stderr
        token = manage("drf_create_token", "owner", env=self.env)
        self.token = re.search(r"Generated token (\w+)", token.stdout).group(1)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "manage.py"), "runserver", f"127.0.0.1:{self.port}", "--noreload"],
                env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_for_port(self.port, timeout=60)

    @property
    def api(self) -> requests.Session:
        session = requests.Session()
        session.headers["Authorization"] = f"Token {self.token}"
        return session

    def run(self, run_id: int) -> dict:
        return self.api.get(f"{self.url}/api/runs/{run_id}/", timeout=30).json()

    def samples(self, run_id: int) -> int:
        return self.api.get(f"{self.url}/api/runs/{run_id}/samples/", timeout=30).json()["count"]

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def stop(self) -> None:
        kill_tree(self.proc)


@pytest.fixture
def embedded_server(tmp_path, tiny_model) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def logged_in_browser(server: EmbeddedServer) -> requests.Session:
    """A session that logged in through the login page, as a browser does (CSRF cookie and token)."""
    browser = requests.Session()
    login = browser.get(f"{server.url}/accounts/login/", timeout=30)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login.text).group(1)
    answer = browser.post(f"{server.url}/accounts/login/", data={"username": "owner", "password": "embedded-test-passphrase", "csrfmiddlewaretoken": token},
                          headers={"Referer": f"{server.url}/accounts/login/"}, allow_redirects=False, timeout=30)
    assert answer.status_code == 302, answer.text[:500]
    return browser


def page_form_fields() -> dict:
    """The New run form's fields for a short fine-tune of the offline model."""
    return {
        "name": "from-the-page", "kind": "finetune", "base_model": "local:tiny-llama", "train_datasets": ["rag_qa_train"],
        "eval_datasets": ["ragas_eval"], "epochs": 1, "learning_rate": 0.001, "batch_size": 4, "max_seq_length": 128, "max_truncated_fraction": 1.0, "seed": 1,
        "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear", "gradient_accumulation_steps": 1,
        "max_steps": 2, "answers": "generate", "compare_base": "on", "metrics": ["rouge_score"], "max_samples": 2, "max_new_tokens": 4,
        "judge_api_key_env": "OPENAI_API_KEY",
    }


@pytest.mark.pipeline
@pytest.mark.timeout(900)
def test_a_run_launched_from_the_page_completes_in_the_server_process(embedded_server):
    server = embedded_server
    browser = logged_in_browser(server)
    page = browser.get(f"{server.url}/runs/new/", timeout=30)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    launched = browser.post(f"{server.url}/runs/new/", data={**page_form_fields(), "action": "launch", "csrfmiddlewaretoken": token},
                            headers={"Referer": f"{server.url}/runs/new/"}, allow_redirects=False, timeout=60)
    assert launched.status_code == 302, launched.text[:2000]
    run_id = int(re.fullmatch(r"/runs/(\d+)/", launched.headers["Location"]).group(1))
    # The page's live fragment polls until the run ends, then answers 286 (stop polling).
    deadline = time.monotonic() + 600
    while (fragment := browser.get(f"{server.url}/runs/{run_id}/status/", timeout=30)).status_code != 286:
        assert fragment.status_code == 200
        assert time.monotonic() < deadline, server.logs()
        time.sleep(1)
    run = browser.get(f"{server.url}/api/runs/{run_id}/", timeout=30).json()  # the browser's session works on the API too
    assert run["status"] == "completed", f"{run['error']}\n{run['logs'][-3000:]}\n{server.logs()}"
    assert {(r["metric"], r["variant"]) for r in run["results"] if r["value"] is not None} == {("rouge_score", "finetuned"), ("rouge_score", "base")}
    # Nothing but the server process did it: no worker exists on the embedded default.
    server_process = psutil.Process(server.proc.pid)
    assert [p.name() for p in server_process.children(recursive=True)] == []


# --- cancel while generating and while scoring: inline and on a worker ------------------------

# Generation long enough to be caught mid-way: every eval row, both variants, one at a time.
SLOW_GENERATION = {
    "name": "cancel-while-generating", "kind": "finetune", "model": {"base": "local:tiny-llama"},
    "datasets": {"train": ["rag_qa_train"], "eval": ["ragas_eval"]},
    "training": {"epochs": 1, "batch_size": 4, "max_seq_length": 128, "max_truncated_fraction": 1.0, "learning_rate": 1e-3, "max_steps": 1, "seed": 3},
    "evaluation": {"metrics": ["rouge_score"], "max_new_tokens": 64, "batch_size": 1, "compare_base": True},
}
# Scoring long enough to be caught mid-way: every row of the three eval sets, with the embedding metric.
SLOW_SCORING = {
    "name": "cancel-while-scoring", "kind": "eval_only", "datasets": {"eval": ["ragas_eval", "medical_ragas_eval", "legal_ragas_eval"]},
    "evaluation": {"answers": "dataset", "metrics": ["semantic_similarity", "rouge_score", "bleu_score", "non_llm_context_precision"]},
}


def cpu_seconds(proc: psutil.Process) -> float:
    total = 0.0
    for member in [proc, *proc.children(recursive=True)]:
        try:
            times = member.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def assert_goes_idle(proc: psutil.Process, *, within: float, what: str) -> float:
    """The process (and its children) stop computing: under 0.3 s of CPU in 3 s, within
    `within` seconds. Returns how long it took."""
    started = time.monotonic()
    while True:
        before = cpu_seconds(proc)
        time.sleep(3)
        if cpu_seconds(proc) - before < 0.3:
            return time.monotonic() - started
        assert time.monotonic() - started < within, f"{what} still computing {within}s after the cancel"


# How soon a cancelled job stops: generation checks between batches; scoring between
# (eval set, variant) groups, each one ragas.evaluate() call that runs to its end.
STOPS_WITHIN = {"generating": 60, "scoring": 300}


def cancel_during(stage: str, *, get_run, cancel, samples, results_after, busy: psutil.Process, settle: float) -> dict:
    """Wait until the run's stage starts with `stage`, cancel it, and check that the job
    stops and writes nothing afterwards. Returns the run after the settle time."""
    deadline = time.monotonic() + 600
    while not (run := get_run())["stage"].startswith(stage):
        assert run["status"] not in TERMINAL, f"the run ended before {stage}: {run['status']} {run['error']}\n{run['logs'][-2000:]}"
        assert time.monotonic() < deadline, f"never reached {stage}: {run['stage']}"
        time.sleep(0.3)
    answer = cancel()
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "cancelled"
    samples_at_cancel = samples()
    took = assert_goes_idle(busy, within=STOPS_WITHIN[stage], what=f"the {stage} job")
    print(f"the {stage} job stopped {took:.0f}s after the cancel")
    time.sleep(settle)  # time for anything that kept going to write
    run = get_run()
    assert run["status"] == "cancelled", run
    assert run["results"] == [] and results_after() == [], run["results"]
    assert samples() == samples_at_cancel == 0
    return run


@pytest.mark.pipeline
@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", ["generating", "scoring"])
def test_cancel_inline_stops_the_job_and_nothing_is_written_after(embedded_server, stage):
    server = embedded_server
    config = SLOW_GENERATION if stage == "generating" else SLOW_SCORING
    created = server.api.post(f"{server.url}/api/runs/", json=config, timeout=60)
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    cancel_during(
        stage, get_run=lambda: server.run(run_id), cancel=lambda: server.api.post(f"{server.url}/api/runs/{run_id}/cancel/", timeout=60),
        samples=lambda: server.samples(run_id), results_after=lambda: server.run(run_id)["results"],
        busy=psutil.Process(server.proc.pid), settle=10,
    )
    # The server took the next run: the cancelled one did not wedge it.
    quick = server.api.post(f"{server.url}/api/runs/", json={**SLOW_SCORING, "name": "after", "datasets": {"eval": ["ragas_eval"]},
                                                             "evaluation": {"answers": "dataset", "metrics": ["rouge_score"], "max_samples": 2}}, timeout=60)
    wait_until(lambda: server.run(quick.json()["id"])["status"] in TERMINAL, 300, "the next run")
    assert server.run(quick.json()["id"])["status"] == "completed"


@pytest.mark.served
@pytest.mark.pipeline
@pytest.mark.timeout(900)
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("stage", ["generating", "scoring"])
def test_cancel_on_a_worker_stops_the_job_and_nothing_is_written_after(rq_settings, workers, user, tiny_model, stage):
    import redis
    from rq import Queue, Worker

    from tests.conftest import token_client

    api = token_client(user)
    config = SLOW_GENERATION if stage == "generating" else SLOW_SCORING
    created = api.post("/api/runs/", config, format="json")
    assert created.status_code == 201, created.content
    run_id = created.json()["id"]
    queue = "gpu" if stage == "generating" else "cpu"
    busy = psutil.Process(workers.by_name[f"worker-{queue}"].pid)
    run = cancel_during(
        stage, get_run=lambda: api.get(f"/api/runs/{run_id}/").json(), cancel=lambda: api.post(f"/api/runs/{run_id}/cancel/"),
        samples=lambda: api.get(f"/api/runs/{run_id}/samples/").json()["count"], results_after=lambda: api.get(f"/api/runs/{run_id}/").json()["results"],
        busy=busy, settle=10,
    )
    connection = redis.Redis.from_url(workers.redis_url)
    states = {w.name: w.get_state() for name in ("gpu", "cpu") for w in Worker.all(queue=Queue(name, connection=connection))}
    assert set(states.values()) == {"idle"}, (states, workers.logs())
    assert run["finished_at"] is not None


# --- scale-out: a worker that did not train downloads the adapter from the MLflow server ---


@pytest.fixture
def mlflow_server(tmp_path) -> Iterator[str]:
    port = free_port()
    log = open(tmp_path / "mlflow-server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "mlflow-artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for_port(port, timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        kill_tree(proc)
        log.close()


@pytest.mark.served
@pytest.mark.pipeline
@pytest.mark.timeout(900)
@pytest.mark.django_db(transaction=True)
def test_a_worker_that_did_not_train_downloads_the_adapter_from_the_mlflow_server(rq_settings, redis_url, mlflow_server, tmp_path, user, tiny_model):
    from tests.conftest import run_worker_burst, token_client

    rq_settings.MLFLOW_TRACKING_URI = mlflow_server
    api = token_client(user)
    config = {**SLOW_GENERATION, "name": "scale-out", "evaluation": {"metrics": ["rouge_score"], "max_samples": 2, "max_new_tokens": 4, "compare_base": False}}
    run_id = api.post("/api/runs/", config, format="json").json()["id"]
    trainer, generator = tmp_path / "machine-a", tmp_path / "machine-b"
    machine = {"MLFLOW_TRACKING_URI": mlflow_server}
    # Machine A's gpu worker takes one job (the fine-tune) and exits; machine B's does the rest.
    done = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "rqworker", "gpu", "--burst", "--max-jobs", "1"],
        env=worker_env(redis_url, MLOPS_VAR_DIR=str(trainer), **machine), cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    after_training = api.get(f"/api/runs/{run_id}/").json()
    assert after_training["status"] == "evaluating", after_training
    assert list(trainer.rglob("adapter_config.json")), "machine A saved the adapter it trained"
    assert not list(generator.rglob("adapter_config.json"))
    for queue, where in (("gpu", generator), ("cpu", generator)):
        done = run_worker_burst(queue, redis_url, MLOPS_VAR_DIR=str(where), **machine)
        assert done.returncode == 0, done.stdout + done.stderr
    run = api.get(f"/api/runs/{run_id}/").json()
    assert run["status"] == "completed", run["logs"][-3000:]
    assert [(r["metric"], r["variant"], r["n_scored"]) for r in run["results"]] == [("rouge_score", "finetuned", 2)]
    downloaded = list(generator.rglob("adapter_config.json"))
    assert downloaded, "machine B has the adapter: downloaded from the MLflow server"
    trained = next(trainer.rglob("adapter_config.json"))
    assert downloaded[0].read_bytes() == trained.read_bytes()
    assert not str(downloaded[0]).startswith(str(trainer))
    listed = requests.get(f"{mlflow_server}/api/2.0/mlflow/artifacts/list", params={"run_id": run["mlflow_run_id"], "path": "adapter"}, timeout=30).json()
    assert "adapter/adapter_config.json" in {f["path"] for f in listed["files"]}


# --- served_mode.sh stop while a job runs; the reaper fails that run after the next start ---


@pytest.mark.served
@pytest.mark.pipeline
@pytest.mark.timeout(1200)
@pytest.mark.django_db(transaction=True)
def test_served_mode_stop_kills_a_running_job_after_stop_timeout_and_the_reaper_fails_its_run(topology, user):  # noqa: F811 - the imported fixture
    from rest_framework.authtoken.models import Token

    from runs.models import PipelineRun
    from tests.served.test_served_mode import PROCESSES, poll_run

    stop_timeout = 5
    topology.env.update({"STOP_TIMEOUT": str(stop_timeout), "REAPER_STALE_SECONDS": "10", "REAPER_INTERVAL_SECONDS": "5"})
    assert topology.script("start", timeout=240).returncode == 0
    topology.note_processes()
    headers = {"Authorization": f"Token {Token.objects.create(user=user).key}"}
    long_run = {"name": "stopped-mid-training", "kind": "finetune", "model": {"base": "local:tiny-llama"},
                "datasets": {"train": ["rag_qa_train"], "eval": ["ragas_eval"]},
                # One attempt: a checkpoint taken before the stop (the first epoch's validation, seconds on a fast
                # CPU) would otherwise make the reaper resume the fine-tune rather than fail it; resuming is
                # tests/reliability/test_faults_workers.py's.
                "training": {"epochs": 100, "batch_size": 1, "max_seq_length": 128, "max_truncated_fraction": 1.0, "learning_rate": 1e-3, "seed": 3,
                             "max_attempts": 1},
                "evaluation": {"metrics": ["rouge_score"], "max_samples": 2, "max_new_tokens": 4, "compare_base": False}}
    run_id = requests.post(f"{topology.web}/api/runs/", json=long_run, headers=headers, timeout=30).json()["id"]
    wait_until(lambda: len(PipelineRun.objects.get(pk=run_id).train_history) >= 1, 300, "training to start")
    topology.note_processes()
    started = time.monotonic()
    stopped = topology.script("stop", timeout=180)
    took = time.monotonic() - started
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "worker-gpu did not stop within 5s; killing it" in stopped.stdout, stopped.stdout
    assert stop_timeout <= took < stop_timeout + 60, took
    assert topology.leftovers() == [] and topology.ports_closed()
    assert PipelineRun.objects.get(pk=run_id).status == "training"  # nobody was left to say otherwise

    assert topology.script("start", timeout=240).returncode == 0
    topology.note_processes()
    assert set(topology.leaders()) == set(PROCESSES)
    run = poll_run(topology, headers, run_id, timeout=120)
    assert run["status"] == "failed", run
    assert "heartbeat" in run["error"], run["error"]
    assert topology.script("stop", timeout=180).returncode == 0
    assert topology.leftovers() == [] and topology.ports_closed()


# --- six judge metrics through ragas, against a local OpenAI-compatible server ------------


def six_metric_answer(prompt: str) -> dict:
    """The judge's answer to each prompt the six ragas judge metrics send, in the shape
    each asks for: everything stated is supported, useful, attributed and correct."""
    data = _last_input(prompt)

    def sentences(text: str) -> list[str]:
        return [s.strip() + "." for s in text.split(".") if s.strip()] or [text]

    if "statements" in data and "context" in data:  # faithfulness and factual_correctness: NLI
        return {"statements": [{"statement": s, "reason": "stated in the context", "verdict": 1} for s in data["statements"]]}
    if isinstance(data.get("answer"), list) and "ground_truth" in data:  # answer_correctness: classify statements
        return {"TP": [{"statement": s, "reason": "in the ground truth"} for s in data["answer"]], "FP": [], "FN": []}
    if {"question", "context", "answer"} <= set(data):
        if "classifications" in prompt:  # context_recall
            return {"classifications": [{"statement": s, "reason": "in the context", "attributed": 1} for s in sentences(data["answer"])]}
        return {"reason": "the context holds the answer", "verdict": 1}  # context_precision
    if "question" in data and "answer" in data:  # statement generation
        return {"statements": sentences(data["answer"])}
    if "response" in data:
        if "noncommittal" in prompt:  # answer_relevancy
            return {"question": f"What about {data['response'].split('.')[0].strip()}?", "noncommittal": 0}
        return {"claims": sentences(data["response"])}  # factual_correctness: claim decomposition
    return {"text": "unsupported prompt"}


class RecordingJudge:
    """An OpenAI-compatible chat-completions endpoint that records each request's Authorization header."""

    def __init__(self) -> None:
        self.authorizations: list[str | None] = []
        self.paths: list[str] = []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                judge.authorizations.append(self.headers.get("Authorization"))
                judge.paths.append(self.path)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
                content = json.dumps(six_metric_answer(prompt))
                reply = json.dumps({
                    "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()), "model": body.get("model", "judge"),
                    "choices": [{"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"} for i in range(int(body.get("n") or 1))],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.httpd = LocalHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> RecordingJudge:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


JUDGE_METRICS_SIX = ["faithfulness", "answer_relevancy", "context_precision", "context_recall", "answer_correctness", "factual_correctness"]


@pytest.mark.pipeline
@pytest.mark.django_db(transaction=True)
def test_all_six_judge_metrics_score_through_ragas_with_the_key_as_a_bearer_token(tmp_path, monkeypatch, user):
    import yaml

    from runs.models import PipelineRun
    from tests.conftest import token_client

    key = "sk-test-judge-key-5f1c"
    monkeypatch.setenv("TEST_JUDGE_KEY", key)
    samples = 3
    with RecordingJudge() as judge:
        config = {
            "name": "six-judge-metrics", "kind": "eval_only", "datasets": {"eval": ["ragas_eval"]},
            "evaluation": {"answers": "dataset", "metrics": JUDGE_METRICS_SIX, "max_samples": samples,
                           "judge": {"base_url": judge.base_url, "model": "test-judge", "api_key_env": "TEST_JUDGE_KEY", "timeout": 60, "max_retries": 0}},
        }
        path = tmp_path / "judge.yaml"
        path.write_text(yaml.safe_dump(config))
        call_command("run_pipeline", str(path), "--user", "alice")
    run = PipelineRun.objects.get()
    assert run.status == "completed", run.logs[-3000:]
    assert judge.authorizations and set(judge.authorizations) == {f"Bearer {key}"}, set(judge.authorizations)
    assert set(judge.paths) == {"/v1/chat/completions"}
    detail = token_client(user).get(f"/api/runs/{run.pk}/").json()
    results = {r["metric"]: r for r in detail["results"]}
    assert set(results) == set(JUDGE_METRICS_SIX)
    for metric, result in results.items():
        assert (result["n_scored"], result["n_failed"], result["failure_reasons"]) == (samples, 0, {}), (metric, result)
    # The judge supports everything: ragas' own formulas then give these.
    for metric in ("faithfulness", "context_precision", "context_recall", "factual_correctness"):
        assert results[metric]["value"] == pytest.approx(1.0, abs=1e-6), (metric, results[metric])
    assert 0.75 < results["answer_correctness"]["value"] <= 1.0  # 0.75 x F1 of 1 + 0.25 x semantic similarity
    assert 0.0 <= results["answer_relevancy"]["value"] <= 1.0
    assert key not in json.dumps(detail)


