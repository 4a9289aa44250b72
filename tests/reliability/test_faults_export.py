"""An export on real workers: its worker SIGKILLed mid-export, the reaper's policy (sent again), and the merged
version served over HTTP by `mlflow models serve` on loopback.

A killed export leaves no registered version and no file that anything refers to:
files are written under temporary names and renamed, registration comes last,
and the retried job (attempt 2) ends with exactly one recorded version.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from runs import tracking
from runs.export import exports_dir, merged_model_name
from runs.models import Job, ModelExport, PipelineRun, SampleResult
from tests.conftest import free_port, token_client, wait_for_port, worker_env

from . import fault_tools
from .fault_tools import SHORT_FINETUNE, kill_tree, sigkill, wait_until

owned_redis, owned_rq_settings, processes = fault_tools.owned_redis_fixture, fault_tools.owned_rq_settings_fixture, fault_tools.processes_fixture

pytestmark = [pytest.mark.reliability, pytest.mark.pipeline, pytest.mark.served, pytest.mark.django_db(transaction=True)]

STALE_SECONDS = 8
CONFIG = {**SHORT_FINETUNE, "name": "export-on-workers",
          "evaluation": {"metrics": ["rouge_score"], "max_samples": 3, "max_new_tokens": 8, "compare_base": False}}


@pytest.mark.timeout(900)
def test_a_worker_killed_mid_export_leaves_nothing_half_written_and_the_retry_registers_one_version_that_serves(
    owned_rq_settings, processes, user, ledger, tmp_path,
):
    ledger.record(
        "fault", "SIGKILL the gpu worker (parent and work-horse) while it exports a completed fine-tune (merged + GGUF q8_0)",
        "no registered version and no file recorded for the killed attempt; the reaper sends the export again (attempt 2), which "
        "records exactly one .merged version; no .partial file left; `mlflow models serve` of that version answers on loopback",
    )
    api = token_client(user)
    gpu = processes.worker("gpu")
    processes.worker("cpu")
    processes.reaper(stale_seconds=STALE_SECONDS, requeue_grace=5)
    run_id = api.post("/api/runs/", CONFIG, format="json").json()["id"]
    wait_until(lambda: PipelineRun.objects.get(pk=run_id).is_terminal, 300, "the fine-tune to end")
    run = PipelineRun.objects.get(pk=run_id)
    assert run.status == "completed", run.logs[-3000:]

    answered = api.post(f"/api/runs/{run_id}/export/", {"merged": True, "gguf": "q8_0"}, format="json")
    assert answered.status_code == 202, answered.json()
    job_id = answered.json()["job"]
    wait_until(lambda: Job.objects.get(pk=job_id).state == "running", 120, "the export to start")
    (horse,) = processes.horses("gpu")
    for victim in (horse, psutil.Process(gpu.pid)):
        sigkill(victim)
    killed = Job.objects.get(pk=job_id)
    assert killed.state == "running" and killed.attempts == 1  # nobody told the database
    assert not ModelExport.objects.filter(job_id=job_id).exists()
    name = merged_model_name(run)
    stray = list(tracking.client().search_model_versions(f"name='{name}'")) if tracking.versions_of_run(name, run.mlflow_run_id) else []
    # Registration is the job's last act: a version exists only if the kill came after it, and then it is whole (tagged).
    assert all(v.tags.get("export.verdict") for v in stray)

    processes.worker("gpu")  # the supervisor starts the machine's worker again; the reaper sends the job to it
    wait_until(lambda: Job.objects.get(pk=job_id).state in ("done", "failed"), STALE_SECONDS + 300, "the export to be redone")
    job = Job.objects.get(pk=job_id)
    assert job.state == "done" and job.attempts == 2, job.error + processes.logs()
    export = ModelExport.objects.get(job_id=job_id)
    assert tracking.versions_of_run(name, run.mlflow_run_id) == [export.registered_model_version]
    assert not list(exports_dir(run_id).rglob("*.partial"))
    assert PipelineRun.objects.get(pk=run_id).status == "completed"
    assert "sending the export job again (attempt 2 of 3)" in PipelineRun.objects.get(pk=run_id).logs

    # The merged version, served by MLflow's own server from the registry, answers a prompt of the run's format.
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{name}/{export.registered_model_version}",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        # The virtual environment's bin first, as when it is activated (`mlflow models serve` runs uvicorn from it); no
        # PYTHONPATH: the transformers flavour needs none of the platform's code.
        env={**worker_env(processes.redis_url), "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "PYTHONPATH": ""},
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for_port(port, timeout=180)
        sample = SampleResult.objects.filter(run_id=run_id, variant="finetuned").order_by("index").first()
        from evaluation.generation import clean_answer
        from runs.export import _example_prompt, generation_settings

        prompt = _example_prompt(Path(export.folder) / "merged", {"question": sample.question, "contexts": sample.contexts}, generation_settings(run))
        deadline = time.monotonic() + 120
        while True:
            try:
                answer = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": [prompt]}, timeout=60)
                if answer.status_code != 503:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        assert answer.status_code == 200, answer.text
        [served] = answer.json()["predictions"]
        text = served if isinstance(served, str) else served.get("generated_text", "")
        # Greedy with the run's max_new_tokens, its prompt format: the adapter's stored answer for the row, to the character.
        assert clean_answer(text) == sample.answer, (text, sample.answer)
    finally:
        kill_tree(server)
        log.close()
