"""The playground's engine: base and fine-tuned answers to the same questions, as the run generated them.

The same code path as the generate step (evaluation/steps.py): the run's prompt
format, its prompt budget (training.max_seq_length less max_new_tokens), greedy
decoding with evaluation.max_new_tokens unless the user asks otherwise (a
temperature above 0 samples, within top_p; max_new_tokens of their own), and the
base answer from the same PEFT model with its adapter disabled. Each answer says
whether the token limit cut it off. Django-free: the application passes the base
model's folder, the adapter's folder and the settings.

The last loaded (base, adapter) pair is kept in memory (one only: a model is
hundreds of MB), so asking a run again does not load it again; one generation
runs at a time per process.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# What answer_both reads from `settings`, with the defaults of the run config.
DEFAULT_SETTINGS: dict[str, Any] = {
    "prompt_format": "auto", "max_new_tokens": 64, "max_seq_length": 512, "batch_size": 8, "precision": "auto",
    "temperature": 0.0, "top_p": 1.0,  # greedy, as the generate step decodes
}


@dataclass
class LoadedPair:
    key: tuple[str, str, str]
    tokenizer: Any
    model: Any  # a PeftModel: the fine-tuned model, and the base one with the adapter disabled


_lock = threading.Lock()
_loaded: LoadedPair | None = None


def _load(base_path: str, adapter_dir: str, precision: str) -> LoadedPair:
    """The pair for (base, adapter, precision): the cached one, or loaded in place of it."""
    global _loaded
    key = (base_path, adapter_dir, precision)
    if _loaded is not None and _loaded.key == key:
        return _loaded
    from peft import PeftModel

    from training.finetune import load_base_model, load_tokenizer
    from training.precision import pick_device

    _loaded = None  # free the previous model before loading the next
    device, dtype = pick_device(precision)
    tokenizer = load_tokenizer(base_path)
    model = PeftModel.from_pretrained(load_base_model(base_path, device=device, dtype=dtype), adapter_dir)
    model.eval()
    _loaded = LoadedPair(key=key, tokenizer=tokenizer, model=model)
    return _loaded


def forget_loaded_model() -> None:
    """Drop the cached model (tests; a process that wants its memory back)."""
    global _loaded
    with _lock:
        _loaded = None


def answer_both(base_path: str | Path, adapter_dir: str | Path, rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """For each row ({"question", "contexts"}): {"base", "finetuned", "prompt", "base_cut_off",
    "finetuned_cut_off"}, generated as the run's generate step does.

    settings: prompt_format, max_new_tokens, max_seq_length, batch_size, precision,
    temperature, top_p (missing ones take the defaults above). "prompt" is the exact
    text the models were asked (special tokens included, the context cut to the
    budget); "*_cut_off" is true where that answer used all max_new_tokens without
    reaching a stop token.
    """
    from training.data import render_prompt
    from training.pyfunc_model import prompt_token_budget

    from .generation import adapter_disabled, encode_eval_prompts, generate_detailed

    options = {**DEFAULT_SETTINGS, **{k: v for k, v in settings.items() if v is not None}}
    rows = [{"question": str(r["question"]), "contexts": [str(c) for c in r["contexts"]]} for r in rows]
    if not rows:
        return []
    prompt_format, max_new_tokens = str(options["prompt_format"]), int(options["max_new_tokens"])
    generation = {
        "batch_size": int(options["batch_size"]), "max_new_tokens": max_new_tokens, "prompt_format": prompt_format,
        "temperature": float(options["temperature"]), "top_p": float(options["top_p"]),
    }
    with _lock:
        pair = _load(str(base_path), str(adapter_dir), str(options["precision"]))
        budget = prompt_token_budget(
            max_seq_length=int(options["max_seq_length"]), max_new_tokens=max_new_tokens,
            max_position_embeddings=getattr(pair.model.config, "max_position_embeddings", None),
        )
        prompts = encode_eval_prompts(pair.tokenizer, rows, max_prompt_tokens=budget, prompt_format=prompt_format)
        finetuned = generate_detailed(pair.model, pair.tokenizer, prompts, **generation)
        with adapter_disabled(pair.model):
            base = generate_detailed(pair.model, pair.tokenizer, prompts, **generation)
        shown = [
            render_prompt(pair.tokenizer, question=r["question"], contexts=r["contexts"], prompt_format=prompt_format, max_prompt_tokens=budget)
            for r in rows
        ]
    return [
        {"base": b.text, "finetuned": f.text, "prompt": p, "base_cut_off": b.cut_off, "finetuned_cut_off": f.cut_off}
        for b, f, p in zip(base, finetuned, shown, strict=True)
    ]
