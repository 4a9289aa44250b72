"""The registered version is a real MLflow pyfunc model: it loads from the registry in a fresh
interpreter, and over `mlflow models serve`, and answers what the platform's generation answers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.conf import settings

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.pipeline

MODEL_NAME = "rag-qa-tiny"
TRAINING = {
    "epochs": 1, "learning_rate": 1e-3, "batch_size": 4, "max_seq_length": 256, "seed": 0, "max_steps": 2,
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
}
GENERATION = {"max_new_tokens": 16, "max_seq_length": 256, "batch_size": 3}


def jsonl(path: Path, limit: int) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()][:limit]


def subprocess_env(ctx) -> dict[str, str]:
    """A fresh interpreter as on another machine with this checkout: no Django settings chosen, offline."""
    env = {k: v for k, v in os.environ.items() if k not in {"DJANGO_SETTINGS_MODULE", "MLFLOW_TRACKING_URI"}}
    env.update({
        # The virtual environment's bin first, as when it is activated (`mlflow models serve` runs uvicorn from it).
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": ctx.tracking_uri,
        "MLOPS_MODELS_DIR": str(settings.MODELS_DIR), "MLOPS_VAR_DIR": str(ctx.root / "var"),
    })
    return env


@pytest.fixture(scope="module")
def registered(tiny_model, tmp_path_factory):
    """A 2-step LoRA of local:tiny-llama, logged as pyfunc into a sqlite MLflow store, registered as version 1."""
    from mlflow import MlflowClient

    from training.finetune import finetune
    from training.pyfunc_model import log_pyfunc_model, register

    root = tmp_path_factory.mktemp("pyfunc")
    outcome = finetune(base_model_path=tiny_model, rows=jsonl(ROOT / "data/train/rag_qa_train.jsonl", 16), training=TRAINING,
                       output_dir=root / "train")
    assert outcome.steps == 2
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.create_experiment("pyfunc-test", artifact_location=(root / "artifacts").as_uri())
    run = client.create_run(experiment_id)
    eval_rows = jsonl(ROOT / "data/eval/ragas_eval.jsonl", 5)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    model_uri = log_pyfunc_model(
        tracking_uri=tracking_uri, run_id=run.info.run_id, adapter_dir=outcome.adapter_dir, base_model="local:tiny-llama",
        prompt_format="auto", input_example_rows=eval_rows[:1], **GENERATION,
    )
    assert os.environ.get("MLFLOW_TRACKING_URI") == before  # the process-wide URI is put back
    version = register(tracking_uri=tracking_uri, name=MODEL_NAME, model_uri=model_uri, run_id=run.info.run_id,
                       tags={"promotion": "pending"})
    return SimpleNamespace(root=root, tracking_uri=tracking_uri, client=client, run_id=run.info.run_id, model_uri=model_uri,
                           version=version, adapter_dir=outcome.adapter_dir, base_path=tiny_model, eval_rows=eval_rows)


@pytest.fixture(scope="module")
def platform_answers(registered) -> list[str]:
    """What the platform's generate step computes for the same rows, in this process."""
    from peft import PeftModel

    from evaluation.generation import encode_eval_prompts, generate_answers
    from training.finetune import load_base_model, load_tokenizer, pick_device

    device, dtype = pick_device("auto")
    tokenizer = load_tokenizer(registered.base_path)
    model = PeftModel.from_pretrained(load_base_model(registered.base_path, device=device, dtype=dtype), str(registered.adapter_dir))
    max_seq, max_new = GENERATION["max_seq_length"], GENERATION["max_new_tokens"]
    budget = max(16, min(max_seq, model.config.max_position_embeddings) - max_new)  # as evaluation/steps.py
    prompts = encode_eval_prompts(tokenizer, registered.eval_rows, max_prompt_tokens=budget, prompt_format="auto")
    answers = generate_answers(model, tokenizer, prompts, batch_size=GENERATION["batch_size"], max_new_tokens=max_new, prompt_format="auto")
    assert any(answers), "the tiny model answered nothing at all"
    return answers


def test_the_version_is_registered_with_its_run_signature_and_example(registered):
    from mlflow.models import get_model_info

    from training.pyfunc_model import using_tracking_uri

    version = registered.client.get_model_version(MODEL_NAME, registered.version)
    assert registered.version == "1"
    assert version.run_id == registered.run_id
    assert version.tags == {"promotion": "pending"}
    assert version.source == registered.model_uri  # models:/<logged model id>
    logged = registered.client.get_logged_model(registered.model_uri.removeprefix("models:/"))
    assert logged.source_run_id == registered.run_id
    assert logged.experiment_id == registered.client.get_run(registered.run_id).info.experiment_id
    assert logged.params["base_model"] == "local:tiny-llama"

    with using_tracking_uri(registered.tracking_uri):
        info = get_model_info(f"models:/{MODEL_NAME}/1")
    assert [c.name for c in info.signature.inputs.inputs] == ["question", "contexts"]
    assert info.signature.params.to_dict()[0] == {"name": "max_new_tokens", "default": 16, "shape": None, "type": "long"}
    assert "python_function" in info.flavors
    assert info.flavors["python_function"]["code"] == "code"
    assert {"torch", "transformers", "peft", "mlflow"} <= {r.split("==")[0] for r in _requirements(registered)}


def _requirements(registered) -> list[str]:
    import mlflow

    logged = registered.client.get_logged_model(registered.model_uri.removeprefix("models:/"))
    path = mlflow.artifacts.download_artifacts(artifact_uri=f"{logged.artifact_location}/requirements.txt")
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def test_load_model_in_a_fresh_interpreter_answers_what_the_platform_generated(registered, platform_answers):
    from training.pyfunc_model import set_alias

    set_alias(tracking_uri=registered.tracking_uri, name=MODEL_NAME, alias="champion", version=registered.version)
    rows_file = registered.root / "rows.json"
    rows_file.write_text(json.dumps([{"question": r["question"], "contexts": r["contexts"]} for r in registered.eval_rows]))
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        "rows = pd.DataFrame(json.load(open(sys.argv[1])))\n"
        "by_version = mlflow.pyfunc.load_model(f'models:/{sys.argv[2]}/1').predict(rows)\n"
        "by_alias = mlflow.pyfunc.load_model(f'models:/{sys.argv[2]}@champion').predict(rows)\n"
        "import training.pyfunc_model as code\n"
        "print(json.dumps({'version': by_version, 'alias': by_alias, 'code': code.__file__}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(rows_file), MODEL_NAME], env=subprocess_env(registered),
                          cwd=registered.root, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["version"] == platform_answers
    assert result["alias"] == platform_answers
    # The prompt and generation code came with the version (code_paths), not from this checkout.
    assert not Path(result["code"]).is_relative_to(ROOT)
    assert Path(result["code"]).parts[-3:] == ("code", "training", "pyfunc_model.py")


def test_predict_takes_generation_params_and_refuses_rows_without_contexts(registered, platform_answers):
    import pandas as pd

    from training.pyfunc_model import load_registered_model

    # In this process (the Django settings are already there), by version through the registry.
    model = load_registered_model(tracking_uri=registered.tracking_uri, model_uri=f"models:/{MODEL_NAME}/1")
    row = registered.eval_rows[0]
    as_list = model.predict(pd.DataFrame([{"question": row["question"], "contexts": row["contexts"]}]))
    assert as_list == platform_answers[:1]
    shorter = model.predict(pd.DataFrame([{"question": row["question"], "contexts": row["contexts"]}]), params={"max_new_tokens": 2})
    assert len(shorter) == 1 and len(shorter[0]) <= len(as_list[0])
    with pytest.raises(Exception, match="contexts"):
        model.predict(pd.DataFrame([{"question": "Where?"}]))


def test_a_local_base_without_the_platform_says_how_to_load_it(monkeypatch):
    import importlib.util

    from training import pyfunc_model

    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    monkeypatch.setattr(pyfunc_model, "_django_settings_configured", lambda: False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlops_site" else real_find_spec(name, *a))
    with pytest.raises(pyfunc_model.BaseModelUnavailable, match="model_config=.*base_model"):
        pyfunc_model.resolve_base_model("local:tiny-llama")
    assert pyfunc_model.resolve_base_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_mlflow_models_serve_answers_over_http_on_loopback(registered, platform_answers):
    port = free_port()
    log_path = registered.root / "serve.log"
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [str(mlflow_cli), "models", "serve", "-m", f"models:/{MODEL_NAME}/{registered.version}", "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)],
            env=subprocess_env(registered), cwd=registered.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _wait_until_healthy(port, server, log_path)
        body = {"dataframe_split": {"columns": ["question", "contexts"],
                                    "data": [[r["question"], r["contexts"]] for r in registered.eval_rows]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=300) as response:
            assert response.status == 200
            predictions = json.loads(response.read())["predictions"]
        assert predictions == platform_answers
    finally:
        _stop(server)


def _stop(server: subprocess.Popen) -> None:
    """The server and the uvicorn it started: its own process group (start_new_session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def _wait_until_healthy(port: int, server: subprocess.Popen, log_path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {server.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow models serve not healthy after {timeout}s:\n{log_path.read_text()[-4000:]}")
