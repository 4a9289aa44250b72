"""Whole pipelines: inline (embedded default) and on real RQ workers, tracked in MLflow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from django.core.management import call_command

from runs.models import Job, PipelineRun, RunEvent, RunResult, SampleResult
from tests.conftest import free_port, run_worker_burst, status_changes, token_client, wait_for_port
from tests.runs.factories import eval_only_config, finetune_config

pytestmark = [pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]

SMALL_FINETUNE = finetune_config(
    training={"epochs": 1, "batch_size": 8, "max_seq_length": 256, "max_truncated_fraction": 1.0, "learning_rate": 5e-3, "max_steps": 4, "seed": 7},
    evaluation={"metrics": ["rouge_score", "semantic_similarity", "non_llm_context_recall"], "max_samples": 4, "max_new_tokens": 8, "compare_base": True},
)


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def mlflow_client():
    from runs.tracking import client

    return client()


def test_inline_finetune_run_completes_with_results_samples_and_mlflow(tmp_path, capsys):
    call_command("run_pipeline", str(write_config(tmp_path, SMALL_FINETUNE)))
    run = PipelineRun.objects.get()
    assert run.status == "completed", run.logs
    assert status_changes(run) == ["pending", "training", "evaluating", "completed"]
    results = RunResult.objects.filter(run=run)
    assert {(r.variant, r.metric) for r in results} == {(v, m) for v in ("base", "finetuned") for m in SMALL_FINETUNE["evaluation"]["metrics"]}
    assert all(r.n_scored == 4 and r.n_failed == 0 and r.value is not None for r in results)
    assert SampleResult.objects.filter(run=run).count() == 8
    assert not SampleResult.objects.filter(run=run, cut_off=None).exists()  # generation's cut-off flags outlive scoring
    assert len(run.train_history) == 4 and run.progress == 100
    assert run.reproducibility["datasets"]["rag_qa_train"] and run.reproducibility["seed"] == 7
    assert set(run.reproducibility["libraries"]) >= {"torch", "transformers", "peft", "ragas"}
    out = capsys.readouterr().out
    assert "difference" in out and run.mlflow_run_id in out

    mlflow = mlflow_client()
    mlflow_run = mlflow.get_run(run.mlflow_run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["training.lora.r"] == "8"
    assert mlflow_run.data.tags["repro.seed"] == "7"
    assert len(mlflow.get_metric_history(run.mlflow_run_id, "train/loss")) == 4
    assert "ragas_eval/finetuned/rouge_score" in mlflow_run.data.metrics
    assert "ragas_eval/delta/rouge_score" in mlflow_run.data.metrics
    artifacts = {a.path for a in mlflow.list_artifacts(run.mlflow_run_id, "adapter")}
    assert "adapter/adapter_config.json" in artifacts
    assert {a.path for a in mlflow.list_artifacts(run.mlflow_run_id, "samples")} == {"samples/ragas_eval__base.csv", "samples/ragas_eval__finetuned.csv"}
    version = mlflow.get_model_version(run.registered_model_name, run.registered_model_version)
    assert version.run_id == run.mlflow_run_id
    assert version.source.startswith("models:/")  # a logged pyfunc model, not a bare folder

    # Fine-tuned vs base: one comparison per metric, in the run, its API detail and MLflow; the gate decided.
    comparisons = {c.metric: c for c in run.comparisons.all()}
    assert set(comparisons) == set(SMALL_FINETUNE["evaluation"]["metrics"])
    assert all(c.n_pairs == 4 and c.verdict == "too few pairs" for c in comparisons.values())  # 4 samples: no verdict either way
    rouge = comparisons["rouge_score"]
    assert rouge.delta == pytest.approx(rouge.finetuned_mean - rouge.base_mean)
    assert mlflow_run.data.metrics["ragas_eval/compare/rouge_score/delta"] == pytest.approx(rouge.delta)
    assert "ragas_eval/compare/rouge_score/ci_low" in mlflow_run.data.metrics
    decision = run.promotion_decisions.get()
    assert decision.decision == "rejected" and "too few pairs" in decision.reason
    assert mlflow.get_model_version(run.registered_model_name, run.registered_model_version).tags["promotion"] == decision.reason
    assert "difference [95% CI]" in out and "promotion of" in out
    # The datasets as MLflow inputs (digest = sha256), the prompt the model was asked.
    inputs = {(i.dataset.name, i.dataset.digest) for i in mlflow_run.inputs.dataset_inputs}
    assert ("rag_qa_train", run.reproducibility["datasets"]["rag_qa_train"][:36]) in inputs  # MLflow's digest is 36 characters at most
    assert ("ragas_eval", run.reproducibility["datasets"]["ragas_eval"][:36]) in inputs
    assert "### Question:" in run.reproducibility["prompt_example"]  # tiny-llama has no chat template: plain format


def test_inline_eval_only_run_scores_the_dataset_answers(tmp_path):
    call_command("run_pipeline", str(write_config(tmp_path, eval_only_config())))
    run = PipelineRun.objects.get()
    assert run.status == "completed", run.logs
    assert status_changes(run) == ["pending", "evaluating", "completed"]
    assert set(RunResult.objects.filter(run=run).values_list("variant", flat=True)) == {"dataset"}
    assert SampleResult.objects.filter(run=run, variant="dataset").count() == 4


def test_run_pipeline_exits_non_zero_on_a_bad_config_and_on_failure(tmp_path, settings):
    from django.core.management.base import CommandError

    settings.MLOPS_MODEL_PATHS = [str(tmp_path)]  # an allowed folder, with no model in it

    with pytest.raises(CommandError, match="training.epochs"):
        call_command("run_pipeline", str(write_config(tmp_path, finetune_config(training={"epochs": 0}))))
    assert not PipelineRun.objects.exists()
    broken = finetune_config(model={"base": str(tmp_path / "no-such-model")})
    with pytest.raises(CommandError, match="ended failed"):
        call_command("run_pipeline", str(write_config(tmp_path, broken)))
    run = PipelineRun.objects.get()
    assert run.status == "failed"
    assert "finetune failed" in run.error
    assert "Traceback" in run.logs


def test_runs_go_through_real_gpu_and_cpu_workers(rq_settings, redis_url, user):
    import django_rq
    from rq.registry import FinishedJobRegistry

    api = token_client(user)
    finetune_id = api.post("/api/runs/", SMALL_FINETUNE, format="json").json()["id"]
    eval_id = api.post("/api/runs/", eval_only_config(), format="json").json()["id"]
    gpu, cpu = django_rq.get_queue("gpu"), django_rq.get_queue("cpu")

    def rq_ids(run_id: int, *steps: str) -> set[str]:
        return {f"job-{pk}" for pk in Job.objects.filter(run_id=run_id, step__in=steps).values_list("pk", flat=True)}

    assert set(gpu.job_ids) == rq_ids(finetune_id, "finetune") and set(cpu.job_ids) == rq_ids(eval_id, "score")

    result = run_worker_burst("gpu", redis_url)  # fine-tune, then the generation it queued
    assert result.returncode == 0, result.stderr[-3000:]
    assert PipelineRun.objects.get(pk=finetune_id).status == "evaluating"
    result = run_worker_burst("cpu", redis_url)
    assert result.returncode == 0, result.stderr[-3000:]

    for run_id in (finetune_id, eval_id):
        run = PipelineRun.objects.get(pk=run_id)
        assert run.status == "completed", run.logs
        assert run.results.exists() and run.samples.exists()
    assert set(FinishedJobRegistry(queue=gpu).get_job_ids()) == rq_ids(finetune_id, "finetune", "generate")
    assert set(FinishedJobRegistry(queue=cpu).get_job_ids()) == rq_ids(finetune_id, "register", "score", "compare", "promote") | rq_ids(eval_id, "score")
    assert set(Job.objects.filter(run_id=finetune_id).values_list("state", flat=True)) == {"done"}


def test_a_job_delivered_twice_runs_once(rq_settings, redis_url, user):
    import django_rq

    from runs.pipeline import run_job
    from runs.queues import send_job

    run_id = token_client(user).post("/api/runs/", eval_only_config(), format="json").json()["id"]
    job_id = Job.objects.get(run_id=run_id).pk
    send_job(func=run_job, queue="cpu", job_id=job_id)  # a second enqueue of the same job id is refused by RQ
    cpu = django_rq.get_queue("cpu")
    cpu.enqueue_call(run_job, args=(job_id,), job_id=f"redelivered-job-{job_id}")  # a redelivery
    assert len(cpu.job_ids) == 2
    result = run_worker_burst("cpu", redis_url)
    assert result.returncode == 0, result.stderr[-3000:]
    run = PipelineRun.objects.get(pk=run_id)
    assert run.status == "completed"
    assert RunEvent.objects.filter(run=run, to_status="evaluating").count() == 1
    assert RunResult.objects.filter(run=run).count() == 2  # one per metric, never duplicated
    assert SampleResult.objects.filter(run=run).count() == 4
    assert Job.objects.get(pk=job_id).attempts == 1


def test_mlflow_server_in_served_mode_receives_everything(tmp_path, settings):
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
    )
    try:
        wait_for_port(port, timeout=90)
        settings.MLFLOW_TRACKING_URI = f"http://127.0.0.1:{port}"
        call_command("run_pipeline", str(write_config(tmp_path, SMALL_FINETUNE)))
        run = PipelineRun.objects.get()
        assert run.status == "completed", run.logs

        from mlflow.tracking import MlflowClient

        over_http = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}", registry_uri=f"http://127.0.0.1:{port}")
        mlflow_run = over_http.get_run(run.mlflow_run_id)
        assert mlflow_run.data.params["training.epochs"] == "1"
        assert [m.step for m in over_http.get_metric_history(run.mlflow_run_id, "train/loss")] == [1, 2, 3, 4]
        assert "ragas_eval/base/rouge_score" in mlflow_run.data.metrics
        assert any(a.path == "adapter/adapter_model.safetensors" for a in over_http.list_artifacts(run.mlflow_run_id, "adapter"))
        version = over_http.get_model_version(run.registered_model_name, run.registered_model_version)
        assert version.run_id == run.mlflow_run_id and version.status == "READY"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_an_out_of_memory_step_halves_the_micro_batch_and_the_run_completes(tmp_path, monkeypatch):
    from training.steps import INJECT_OOM_ENV

    monkeypatch.setenv(INJECT_OOM_ENV, "2:1")  # one CUDA out-of-memory error in step 2 (a test hook; CPU here)
    config = {**SMALL_FINETUNE, "evaluation": {**SMALL_FINETUNE["evaluation"], "compare_base": False, "metrics": ["rouge_score"]}}
    call_command("run_pipeline", str(write_config(tmp_path, config)))
    run = PipelineRun.objects.get()
    assert run.status == "completed", run.logs
    assert "out of memory at step 2" in run.logs and "micro-batch 8 -> 4" in run.logs
    assert [e["step"] for e in run.train_history] == [1, 2, 3, 4]
