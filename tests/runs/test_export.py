"""Exports of a completed tiny-llama fine-tune: the API, the page, downloads, the command, the config step, bad input, a full disk.

Real components throughout: a real fine-tune (run_pipeline), the embedded
default's driver thread running the export job, the real MLflow store, the
real filesystem (a full disk is a 1 MB tmpfs mounted over the run's exports folder).
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import yaml
from django.core.management import call_command
from django.core.management.base import CommandError

from evaluation.equivalence import VERDICTS
from runs import tracking
from runs.export import EXPORT_JOB_TAG, exports_dir, merged_model_name
from runs.models import ExportCheck, Job, ModelExport, PipelineRun

from .factories import finetune_config, make_run

pytestmark = [pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]

CONFIG = finetune_config(
    name="export-finetune",
    training={"epochs": 1, "batch_size": 8, "max_seq_length": 256, "max_truncated_fraction": 1.0, "learning_rate": 5e-3, "max_steps": 3, "seed": 3},
    evaluation={"metrics": ["rouge_score", "exact_match"], "max_samples": 4, "max_new_tokens": 8, "batch_size": 2, "compare_base": False},
)


def finetuned(tmp_path: Path, user, config: dict | None = None) -> PipelineRun:
    config = config or CONFIG
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    call_command("run_pipeline", str(path))
    run = PipelineRun.objects.get(name=config["name"])
    assert run.status == "completed", run.logs
    PipelineRun.objects.filter(pk=run.pk).update(owner=user)
    return PipelineRun.objects.get(pk=run.pk)


def wait_for_job(job_id: int, seconds: float = 300) -> Job:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job = Job.objects.get(pk=job_id)
        if job.state in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {Job.objects.get(pk=job_id).state} after {seconds}s")


def streamed(response) -> bytes:
    return b"".join(response.streaming_content)


def test_an_export_merges_writes_a_gguf_checks_both_registers_and_serves_the_files(tmp_path, tiny_model, user, api, client, other_api):
    run = finetuned(tmp_path, user)
    answered = api.post(f"/api/runs/{run.pk}/export/", {"merged": True, "gguf": "q8_0"}, format="json")
    assert answered.status_code == 202, answered.json()
    job_id = answered.json()["job"]
    assert answered.json()["label"] == "export:1"
    # Asked again while the first is queued or running: one export at a time, and the refusal names the running one.
    again = api.post(f"/api/runs/{run.pk}/export/", {"merged": True, "gguf": "f16"}, format="json")
    assert again.status_code == 409 and "export:1" in again.json()["detail"] and again.json()["running"]["job"] == job_id
    job = wait_for_job(job_id)
    assert job.state == "done", job.error
    run.refresh_from_db()
    assert run.status == "completed"  # an on-demand job never moves the run

    detail = api.get(f"/api/runs/{run.pk}/").json()
    [export] = detail["exports"]
    merged, gguf = export["checks"]
    assert (merged["form"], merged["label"], gguf["form"], gguf["label"]) == ("merged", "merged (float32)", "gguf", "GGUF q8_0")
    # Merged in float32, saved in float32: the greedy answers are the adapter's, to the character.
    assert (merged["identical"], merged["rows"], merged["verdict"]) == (4, 4, "equivalent")
    assert gguf["verdict"] in VERDICTS and gguf["rows"] == 4
    assert {c["metric"] for c in merged["comparisons"]} == {"rouge_score", "exact_match"}
    assert export["verdict"] in VERDICTS and export["gguf_file"] == "model-q8_0.gguf"

    # The files: a merged folder Transformers loads, a GGUF its GGUF loader reads back.
    from transformers import AutoModelForCausalLM

    folder = exports_dir(run.pk) / str(job_id)
    AutoModelForCausalLM.from_pretrained(folder / "merged")
    AutoModelForCausalLM.from_pretrained(folder, gguf_file="model-q8_0.gguf")
    assert not list(exports_dir(run.pk).rglob("*.partial"))

    # Registered with the transformers flavour, tagged with its check; the database records that version.
    name = merged_model_name(run)
    version = tracking.client().get_model_version(name, export["registered_model_version"])
    assert export["registered_model_name"] == name == f"{run.registered_model_name}.merged"
    assert version.tags[EXPORT_JOB_TAG] == str(job_id) and version.tags["export.verdict"] == export["verdict"]
    assert version.tags["export.check.merged"] == "merged (float32): 4/4 identical answers, equivalent"
    metrics = tracking.client().get_run(run.mlflow_run_id).data.metrics
    assert metrics["export-1/merged/identical_share"] == 1.0

    # Downloads: authenticated, streamed, with the sha256 recorded at export time.
    client.force_login(user)
    page = client.get(f"/runs/{run.pk}/")
    assert page.status_code == 200 and 'id="exports"' in page.content.decode() and export["archive_sha256"] in page.content.decode()
    tar = client.get(f"/runs/{run.pk}/exports/{export['id']}/download/merged/")
    assert tar.status_code == 200 and tar.streaming
    body = streamed(tar)
    assert hashlib.sha256(body).hexdigest() == export["archive_sha256"] == tar["X-Content-SHA256"] and len(body) == export["archive_bytes"]
    with tarfile.open(fileobj=io.BytesIO(body)) as archive:
        assert "merged/model.safetensors" in archive.getnames()
    gguf_file = api.get(export["downloads"]["gguf"])
    assert gguf_file.status_code == 200 and hashlib.sha256(streamed(gguf_file)).hexdigest() == export["gguf_sha256"] == gguf_file["X-Content-SHA256"]
    assert other_api.get(export["downloads"]["gguf"]).status_code == 404  # another user's run
    client.logout()
    assert client.get(f"/runs/{run.pk}/exports/{export['id']}/download/merged/").status_code == 302  # to the login page

    # The rows that differ, side by side (none for the merged form here; the page says so).
    client.force_login(user)
    differences = client.get(merged["differences"])
    assert differences.status_code == 200 and "4 of 4 answers are the adapter's" in differences.content.decode()

    # The command: the same job, a progress bar, the check's table.
    out = io.StringIO()
    call_command("export_run", str(run.pk), "--gguf", "f16", stdout=out)
    text = out.getvalue()
    assert "export:2: " in text and "merged (float32): 4/4 answers identical to the adapter's; equivalent" in text and "GGUF f16:" in text
    second = ModelExport.objects.get(label="export:2")
    assert second.registered_model_version != export["registered_model_version"]

    # Deleting the run removes its .merged versions too.
    assert api.delete(f"/api/runs/{run.pk}/").status_code == 204
    assert tracking.versions_of_run(name, run.mlflow_run_id) == []


def test_bad_requests_are_refused_clearly(user, api):
    eval_only = make_run(user, kind="eval_only", status="completed")
    answer = api.post(f"/api/runs/{eval_only.pk}/export/", {"merged": True}, format="json")
    assert answer.status_code == 409 and answer.json()["detail"] == f"run {eval_only.pk} is a eval_only run: only a completed fine-tune has a model to export"
    for status in ("pending", "training", "failed", "cancelled"):
        run = make_run(user, status=status)
        answer = api.post(f"/api/runs/{run.pk}/export/", {"gguf": "q8_0"}, format="json")
        assert answer.status_code == 409 and answer.json()["detail"] == f"run {run.pk} is {status}: only a completed fine-tune can be exported"
    run = make_run(user, status="completed", mlflow_run_id="")
    assert "has no adapter to export" in api.post(f"/api/runs/{run.pk}/export/", {}, format="json").json()["detail"]
    nothing = api.post(f"/api/runs/{run.pk}/export/", {"merged": False, "gguf": "none"}, format="json")
    assert nothing.status_code == 400 and nothing.json()["detail"].startswith("nothing to export")
    assert api.post(f"/api/runs/{run.pk}/export/", {"gguf": "q4_k"}, format="json").status_code == 400
    assert api.post(f"/api/runs/{run.pk}/export/", {"margin": 0}, format="json").status_code == 400
    with pytest.raises(CommandError, match="is pending: only a completed fine-tune can be exported"):
        call_command("export_run", str(make_run(user).pk))
    assert not Job.objects.filter(step="export").exists()


def test_a_config_export_is_the_last_step_of_the_run(tmp_path, tiny_model, user):
    config = {**CONFIG, "name": "export-at-end", "export": {"merged": True, "gguf": "f16"}}
    run = finetuned(tmp_path, user, config)
    steps = list(run.jobs.order_by("id").values_list("step", "state"))
    assert steps[-1] == ("export_at_end", "done") and [s for s, _ in steps].index("promote") < len(steps) - 1
    export = ModelExport.objects.get(run=run)
    assert (export.merged, export.gguf, export.label) == (True, "f16", "export_at_end")
    assert ExportCheck.objects.get(export=export, form="merged").verdict == "equivalent"
    assert ExportCheck.objects.get(export=export, form="gguf").rows == 4


def test_a_full_disk_fails_the_export_only_and_leaves_nothing_half_written(tmp_path, tiny_model, user, api):
    run = finetuned(tmp_path, user)
    target = exports_dir(run.pk)
    target.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        job_id = api.post(f"/api/runs/{run.pk}/export/", {"merged": True, "gguf": "q8_0"}, format="json").json()["job"]
        job = wait_for_job(job_id)
        assert job.state == "failed"
        assert job.error.startswith(f"export:1 failed: ExportWriteError: cannot write the merged weights to {target / str(job_id)}/merged: ") and "No space left on device" in job.error
        assert sorted(p.name for p in target.rglob("*")) == [str(job_id)]  # the job's empty folder; no partial file
    finally:
        subprocess.run(["umount", str(target)], check=False)
    run.refresh_from_db()
    assert run.status == "completed" and not ModelExport.objects.filter(run=run).exists()
    assert tracking.versions_of_run(merged_model_name(run), run.mlflow_run_id) == []
    # The disk has room again: the next export works.
    job = wait_for_job(api.post(f"/api/runs/{run.pk}/export/", {"merged": True}, format="json").json()["job"])
    assert job.state == "done" and job.key == "2"


def test_another_architecture_gets_no_gguf_with_a_clear_message_and_its_merged_weights_all_the_same(tmp_path, tiny_model, user, api, settings):
    """A GPT-2 base (a folder under MLOPS_MODEL_PATHS): fine-tuned, then exported with a GGUF asked for."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base = tmp_path / "models" / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=len(tokenizer), n_positions=512,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    settings.MLOPS_MODEL_PATHS = [str(tmp_path / "models")]
    run = finetuned(tmp_path, user, {**CONFIG, "name": "export-gpt2", "model": {"base": str(base)}})
    job = wait_for_job(api.post(f"/api/runs/{run.pk}/export/", {"merged": True, "gguf": "q8_0"}, format="json").json()["job"])
    assert job.state == "done", job.error
    export = ModelExport.objects.get(run=run)
    assert export.gguf_message == "GGUF export is not supported for GPT2LMHeadModel" and export.gguf_file == ""
    assert [(c.form, c.verdict) for c in export.checks.all()] == [("merged", "equivalent")]
    assert export.registered_model_version and export.archive_sha256
    assert api.get(f"/api/runs/{run.pk}/exports/{export.pk}/gguf/").status_code == 404
