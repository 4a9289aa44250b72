"""The registered version is a real MLflow pyfunc model: it loads from the registry in a fresh
interpreter, and over `mlflow models serve`, and answers what the platform's generation answers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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


# A chat template for the tiny model, built from tokens its tokenizer already has.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def train_log_register(root: Path, *, base_path: str, base_model: str, prompt_format: str, name: str) -> SimpleNamespace:
    """A 2-step LoRA of base_path, logged as pyfunc into a sqlite MLflow store under root, registered as version 1."""
    from mlflow import MlflowClient

    from training.finetune import finetune
    from training.pyfunc_model import log_pyfunc_model, register

    outcome = finetune(base_model_path=base_path, rows=jsonl(ROOT / "data/train/rag_qa_train.jsonl", 16), training=TRAINING,
                       output_dir=root / "train", prompt_format=prompt_format)
    assert outcome.steps == 2
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.create_experiment("pyfunc-test", artifact_location=(root / "artifacts").as_uri())
    run = client.create_run(experiment_id)
    eval_rows = jsonl(ROOT / "data/eval/ragas_eval.jsonl", 5)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    model_uri = log_pyfunc_model(
        tracking_uri=tracking_uri, run_id=run.info.run_id, adapter_dir=outcome.adapter_dir, base_model=base_model,
        prompt_format=prompt_format, input_example_rows=eval_rows[:1], **GENERATION,
    )
    assert os.environ.get("MLFLOW_TRACKING_URI") == before  # the process-wide URI is put back
    version = register(tracking_uri=tracking_uri, name=name, model_uri=model_uri, run_id=run.info.run_id,
                       tags={"promotion": "pending"})
    ctx = SimpleNamespace(root=root, name=name, tracking_uri=tracking_uri, client=client, run_id=run.info.run_id,
                          model_uri=model_uri, version=version, adapter_dir=outcome.adapter_dir, base_path=base_path,
                          prompt_format=prompt_format, eval_rows=eval_rows)
    ctx.platform_answers = platform_generation(ctx)
    return ctx


def platform_generation(ctx) -> list[str]:
    """What the platform's generate step computes for the same rows, in this process."""
    from peft import PeftModel

    from evaluation.generation import encode_eval_prompts, generate_answers
    from training.finetune import load_base_model, load_tokenizer
    from training.precision import pick_device

    device, dtype = pick_device("auto")
    tokenizer = load_tokenizer(ctx.base_path)
    model = PeftModel.from_pretrained(load_base_model(ctx.base_path, device=device, dtype=dtype), str(ctx.adapter_dir))
    max_seq, max_new = GENERATION["max_seq_length"], GENERATION["max_new_tokens"]
    budget = max(16, min(max_seq, model.config.max_position_embeddings) - max_new)  # as evaluation/steps.py
    prompts = encode_eval_prompts(tokenizer, ctx.eval_rows, max_prompt_tokens=budget, prompt_format=ctx.prompt_format)
    answers = generate_answers(model, tokenizer, prompts, batch_size=GENERATION["batch_size"], max_new_tokens=max_new,
                               prompt_format=ctx.prompt_format)
    assert any(answers), "the tiny model answered nothing at all"
    return answers


@pytest.fixture(scope="module")
def registered(tiny_model, tmp_path_factory):
    """local:tiny-llama (no chat template: the plain format), referenced by its local: name."""
    return train_log_register(tmp_path_factory.mktemp("pyfunc"), base_path=tiny_model, base_model="local:tiny-llama",
                              prompt_format="auto", name=MODEL_NAME)


@pytest.fixture(scope="module")
def registered_chat(tiny_model, tmp_path_factory):
    """A copy of tiny-llama given a chat template, referenced by its path, in the chat format."""
    from training.finetune import load_tokenizer

    root = tmp_path_factory.mktemp("pyfunc-chat")
    base = root / "tiny-chat"
    shutil.copytree(tiny_model, base)
    tokenizer = load_tokenizer(str(base))
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(base)
    return train_log_register(root, base_path=str(base), base_model=str(base), prompt_format="chat", name=f"{MODEL_NAME}-chat")


@pytest.fixture(scope="module")
def platform_answers(registered) -> list[str]:
    return registered.platform_answers


def predict_in_a_fresh_interpreter(ctx, model_uris: list[str]) -> dict:
    rows_file = ctx.root / "rows.json"
    rows_file.write_text(json.dumps([{"question": r["question"], "contexts": r["contexts"]} for r in ctx.eval_rows]))
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        "rows = pd.DataFrame(json.load(open(sys.argv[1])))\n"
        "answers = [mlflow.pyfunc.load_model(uri).predict(rows) for uri in sys.argv[2:]]\n"
        "import training.pyfunc_model as code\n"
        "print(json.dumps({'answers': answers, 'code': code.__file__}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(rows_file), *model_uris], env=subprocess_env(ctx),
                          cwd=ctx.root, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


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
    result = predict_in_a_fresh_interpreter(registered, [f"models:/{MODEL_NAME}/1", f"models:/{MODEL_NAME}@champion"])
    assert result["answers"] == [platform_answers, platform_answers]
    # The prompt and generation code came with the version (code_paths), not from this checkout.
    assert not Path(result["code"]).is_relative_to(ROOT)
    assert Path(result["code"]).parts[-3:] == ("code", "training", "pyfunc_model.py")


def test_a_chat_format_version_with_a_path_base_answers_like_the_platform(registered_chat):
    result = predict_in_a_fresh_interpreter(registered_chat, [f"models:/{registered_chat.name}/1"])
    assert result["answers"] == [registered_chat.platform_answers]


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
