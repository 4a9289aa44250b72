"""local:smollm2-135m-instruct: the GGUF of the pinned wheel converted into a normal Transformers folder.

The conversion runs once per machine (the smollm2_model fixture, MLOPS_MODELS_DIR) and
every test here reads that folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from training import smollm2
from training.data import render_prompt

EIFFEL = {
    "question": "How tall is the Eiffel Tower?",
    "contexts": ["The Eiffel Tower in Paris is 330 metres (1,083 ft) tall, about the same height as an 81-storey building."],
}


@pytest.fixture(scope="module")
def tokenizer(smollm2_model):
    from training.finetune import load_tokenizer

    return load_tokenizer(smollm2_model)


@pytest.fixture(scope="module")
def model(smollm2_model):
    import torch

    from training.finetune import load_base_model

    return load_base_model(smollm2_model, device="cpu", dtype=torch.float32)


def test_folder_is_a_plain_transformers_llama(smollm2_model):
    folder = Path(smollm2_model)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config  # loads as an ordinary model, not a GGUF reference
    assert (folder / "model.safetensors").is_file()
    assert (folder / "generation_config.json").is_file()
    assert "<|im_start|>" in (folder / "chat_template.jinja").read_text()
    info = json.loads((folder / "build_info.json").read_text())
    assert info["gguf_file"] == smollm2.GGUF_FILE
    assert info["gguf_sha256"] == smollm2.sha256_of(smollm2.gguf_path())
    assert info["parameters"] == 134_515_008
    assert info["weights_sha256"]["model.safetensors"] == smollm2.sha256_of(folder / "model.safetensors")


def test_every_weight_loads_and_matches_the_gguf(smollm2_model):
    """Every parameter of LlamaForCausalLM comes from the file (none missing, none left
    randomly initialised), and the values are the GGUF's own, dequantised."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM

    model, loading = AutoModelForCausalLM.from_pretrained(smollm2_model, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert loading["missing_keys"] in ([], set())
    assert loading["unexpected_keys"] in ([], set())
    assert loading["mismatched_keys"] in ([], set())
    assert len(model.state_dict()) == 273  # 30 layers x 9 tensors + embeddings, final norm, tied lm_head
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    tensors = {t.name: t for t in GGUFReader(str(smollm2.gguf_path())).tensors}
    embeddings = tensors["token_embd.weight"]
    expected = dequantize(embeddings.data, embeddings.tensor_type)
    assert np.array_equal(model.model.embed_tokens.weight.detach().numpy(), expected.astype(np.float32))
    norm = tensors["blk.0.attn_norm.weight"]
    assert np.array_equal(model.model.layers[0].input_layernorm.weight.detach().numpy(), np.asarray(norm.data, dtype=np.float32))


def test_tokenizer_keeps_its_chat_template(tokenizer):
    assert tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.model_max_length == 8192
    text = render_prompt(tokenizer, question="Q?", contexts=["C."])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n")


def test_greedy_answer_uses_the_context_and_is_deterministic(model, tokenizer):
    from evaluation.generation import encode_eval_prompts, generate_answers

    prompts = encode_eval_prompts(tokenizer, [EIFFEL], max_prompt_tokens=448)
    started = time.monotonic()
    first = generate_answers(model, tokenizer, prompts, batch_size=1, max_new_tokens=48)
    seconds = time.monotonic() - started
    second = generate_answers(model, tokenizer, prompts, batch_size=1, max_new_tokens=48)
    assert first == second
    assert "330" in first[0], first
    assert "<|im_end|>" not in first[0] and "<|im_start|>" not in first[0]
    print(f"greedy answer {first[0]!r} in {seconds:.2f}s on CPU")


def test_existing_build_is_reused(smollm2_model, monkeypatch):
    """An existing folder is returned as is: no second conversion."""
    from training.local_models import build_local_model, resolve_model_path

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(smollm2, "convert", no_conversion)
    assert build_local_model("smollm2-135m-instruct", models_dir=Path(smollm2_model).parent) == Path(smollm2_model)
    assert resolve_model_path("local:smollm2-135m-instruct") == smollm2_model


def test_missing_wheel_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(smollm2, "GGUF_PACKAGE", "no_such_model_wheel")
    with pytest.raises(smollm2.ModelFileMissing, match="requirements/models.txt"):
        smollm2.gguf_path()
