"""training.precision: where bf16 is chosen, and what bf16 training on a CPU gives (losses within bf16's tolerance)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training import precision
from training.data import collate
from training.finetune import causal_lm_loss, encode_rows, finetune, first_logit_needed, load_base_model, load_tokenizer, make_lora_model
from training.precision import CPU_BF16_MIN_HIDDEN, pick_device, training_autocast, training_precision

ROWS = [json.loads(line) for line in (Path(__file__).resolve().parents[2] / "data/train/rag_qa_train.jsonl").read_text().splitlines()[:24]]
# bf16 keeps 8 bits of mantissa: one rounding is up to 0.4% relative; a loss after a few steps stays within 2%.
BF16_LOSS_TOLERANCE = 2e-2


def config_dir(tmp_path: Path, hidden_size: int) -> Path:
    folder = tmp_path / f"hidden-{hidden_size}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden_size, "intermediate_size": 4 * hidden_size,
                                                    "num_attention_heads": 4, "num_hidden_layers": 1, "vocab_size": 64}))
    return folder


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("native", [True, False])
def test_auto_trains_in_bf16_on_a_cpu_only_with_native_bf16_and_a_wide_enough_model(tmp_path, monkeypatch, cpu_only, native):
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: native)
    wide, narrow = config_dir(tmp_path, CPU_BF16_MIN_HIDDEN), config_dir(tmp_path, CPU_BF16_MIN_HIDDEN // 2)
    f32, bf16 = torch.float32, torch.bfloat16
    # On a CPU, bf16 training is float32 weights under bf16 autocast.
    assert training_precision("auto", wide) == ("cpu", f32, bf16 if native else None)
    assert training_precision("auto", narrow) == ("cpu", f32, None)
    assert training_precision("auto", None) == ("cpu", f32, None)  # an unknown model stays in float32
    assert training_precision("auto", tmp_path / "missing") == ("cpu", f32, None)
    assert training_precision("fp32", wide) == ("cpu", f32, None)
    assert training_precision("bf16", narrow) == ("cpu", f32, bf16)  # asked for: honoured


def test_generation_on_a_cpu_stays_in_float32_unless_bf16_is_asked_for(monkeypatch, cpu_only):
    """bf16 answers depend on the batch they are generated in (bench/README.md): auto keeps float32 on every CPU."""
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: True)
    assert pick_device("auto") == ("cpu", torch.float32)
    assert pick_device("fp32") == ("cpu", torch.float32)
    assert pick_device("bf16") == ("cpu", torch.bfloat16)


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_the_trimmed_loss_is_the_models_own_loss(tiny_model, autocast_dtype):
    """causal_lm_loss (logits only from the first answer position) = model(**batch).loss within 1e-6, in float32 and under bf16 autocast."""
    tokenizer = load_tokenizer(tiny_model)
    model = make_lora_model(load_base_model(tiny_model, device="cpu", dtype=torch.float32),
                            {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}, gradient_checkpointing=False)
    batch = collate(encode_rows(tokenizer, ROWS[:4], 256), pad_token_id=tokenizer.pad_token_id)
    first_logit = first_logit_needed(batch["labels"])
    assert first_logit and first_logit > 0  # the prompt positions really are skipped
    with torch.no_grad(), training_autocast("cpu", autocast_dtype):
        trimmed, full = float(causal_lm_loss(model, batch, first_logit=first_logit)), float(model(**batch).loss)
    assert trimmed == pytest.approx(full, abs=1e-6)


def test_bf16_training_on_a_cpu_gives_float32_losses_within_bf16_tolerance(tmp_path, tiny_model, cpu_only):
    training = {"epochs": 1, "batch_size": 4, "max_seq_length": 128, "learning_rate": 5e-3, "seed": 3, "max_steps": 5,
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}}
    runs = {}
    for name in ("fp32", "bf16"):
        steps = []
        outcome = finetune(base_model_path=tiny_model, rows=ROWS[:20], validation_rows=ROWS[20:], training={**training, "precision": name},
                           output_dir=tmp_path / name, prompt_format="plain", on_step=steps.append)
        runs[name] = (outcome, steps)
    (fp32, fp32_steps), (bf16, bf16_steps) = runs["fp32"], runs["bf16"]
    assert (fp32.dtype, bf16.dtype) == ("float32", "bfloat16")
    assert [s.loss for s in bf16_steps] == pytest.approx([s.loss for s in fp32_steps], rel=BF16_LOSS_TOLERANCE)
    assert [s.val_loss for s in bf16_steps if s.val_loss] == pytest.approx([s.val_loss for s in fp32_steps if s.val_loss], rel=BF16_LOSS_TOLERANCE)
    assert [s.loss for s in bf16_steps] != [s.loss for s in fp32_steps]  # bf16 really ran
    from safetensors.torch import load_file

    weights = load_file(str(bf16.adapter_dir / "adapter_model.safetensors"))
    assert weights and all(t.dtype == torch.float32 for t in weights.values())  # the adapter trained and saved in float32
