"""The registry of `local:` builds, the build_model command, and fine-tuning in the chat format."""

from __future__ import annotations

import json
import math
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from training import local_models, tiny_model
from training.local_models import (
    KNOWN_LOCAL_MODELS,
    build_local_model,
    describe_progress,
    local_model_info,
    resolve_model_path,
)
from training.tiny_model import UnknownLocalModel


def test_registry_lists_the_tiny_builds_and_smollm2():
    assert KNOWN_LOCAL_MODELS == (*tiny_model.SPECS, "smollm2-135m-instruct")
    assert local_models.LOCAL_MODELS["tiny-llama"].builder is tiny_model.build_tiny_model


def test_unknown_names_fail_before_building(tmp_path):
    with pytest.raises(UnknownLocalModel, match="known: local:tiny-llama, local:small-llama, local:smollm2-135m-instruct"):
        resolve_model_path("local:gpt-17")
    with pytest.raises(UnknownLocalModel):
        build_local_model("gpt-17", models_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_paths_and_hub_ids_pass_through():
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model_path("/models/mine") == "/models/mine"


def test_old_import_path_still_resolves(tiny_model):
    from training.tiny_model import resolve_model_path as old

    assert old is resolve_model_path
    assert old("local:tiny-llama") == tiny_model


def test_local_model_info_reads_build_info(smollm2_model, tiny_model, tmp_path):
    info = local_model_info(smollm2_model)
    assert len(info["gguf_sha256"]) == 64 and info["name"] == "smollm2-135m-instruct"
    assert local_model_info(tiny_model)["name"] == "tiny-llama"
    assert local_model_info(tmp_path) == {}
    (tmp_path / "build_info.json").write_text("not json")
    assert local_model_info(tmp_path) == {}


def test_progress_lines_name_the_stage():
    assert describe_progress("smollm2-135m-instruct", 1, 5) == "loading and dequantising the GGUF (stage 2/5)"
    assert describe_progress("smollm2-135m-instruct", 5, 5) == "built (5/5 stages)"
    assert describe_progress("tiny-llama", 3, 40) == "pre-training step 3/40"


def test_build_model_command(smollm2_model, settings):
    out = StringIO()
    call_command("build_model", "smollm2-135m-instruct", "--dry-run", stdout=out)
    assert f"local:smollm2-135m-instruct -> {Path(settings.MODELS_DIR) / 'smollm2-135m-instruct'} (exists)" in out.getvalue()
    out = StringIO()
    call_command("build_model", "smollm2-135m-instruct", stdout=out)
    assert "already built" in out.getvalue()
    with pytest.raises(CommandError):
        call_command("build_model", "gpt-17")


def test_build_tiny_model_command_still_works(tiny_model):
    out = StringIO()
    call_command("build_tiny_model", stdout=out)
    assert "already built" in out.getvalue()


def test_build_model_command_reports_stages_and_builds_into_models_dir(settings, tmp_path, monkeypatch):
    """The command's own path (progress bar, MODELS_DIR, the line it prints), with a
    registered builder that writes a folder in stages instead of converting 500 MB."""
    from training.local_models import LocalModel
    from training.management.commands import build_model

    seen: list[tuple[int, int]] = []

    def builder(name, *, force, progress, models_dir, data_dir):
        target = tiny_model.local_model_dir(name, models_dir)
        for step in range(3):
            progress(step, 2)
            seen.append((step, 2))
        target.mkdir(parents=True)
        (target / "build_info.json").write_text(json.dumps({"name": name, "seconds": 1.5}))
        return target

    monkeypatch.setitem(local_models.LOCAL_MODELS, "staged", LocalModel("staged", "a test build", builder, ("one", "two")))
    monkeypatch.setattr(build_model, "KNOWN_LOCAL_MODELS", (*KNOWN_LOCAL_MODELS, "staged"))
    settings.MODELS_DIR = tmp_path
    out, err = StringIO(), StringIO()
    call_command("build_model", "staged", stdout=out, stderr=err)
    assert f"built local:staged at {tmp_path / 'staged'} in 1.5 s" in out.getvalue()
    assert seen == [(0, 2), (1, 2), (2, 2)]
    assert describe_progress("staged", 1, 2) == "two (stage 2/2)"


def test_lora_finetune_in_chat_format_trains_the_answer(smollm2_model, tmp_path):
    from training.finetune import finetune

    rows = [
        {"question": "How tall is the Eiffel Tower?", "context": "The Eiffel Tower is 330 metres tall.", "answer": "It is 330 metres tall."},
        {"question": "Where is the Louvre?", "context": "The Louvre is a museum in Paris.", "answer": "In Paris."},
    ]
    training = {
        "seed": 7, "epochs": 1, "max_steps": 2, "batch_size": 1, "learning_rate": 1e-3, "max_seq_length": 128,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    }
    outcome = finetune(base_model_path=smollm2_model, rows=rows, training=training, output_dir=tmp_path, prompt_format="chat")
    assert outcome.steps == 2
    assert math.isfinite(outcome.final_loss) and outcome.final_loss > 0
    assert (outcome.adapter_dir / "adapter_config.json").is_file()
    assert (outcome.adapter_dir / "chat_template.jinja").is_file()  # the adapter's tokenizer keeps the template
