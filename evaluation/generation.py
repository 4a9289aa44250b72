"""Batched answer generation from question + contexts (gpu queue): greedy, as the
runs' generate step uses it, or sampled (temperature, top-p) for the playground.

Prompts are sorted by length and left-padded per batch, so little compute is
spent on padding; answers come back in the original order. Prompts follow the
run's prompt format (training/data.py): with chat, generation stops at the chat
template's end-of-turn token; with plain, the answer ends at EOS or where the
model starts a new "###" section.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from training.data import encode_prompt, join_contexts, resolve_prompt_format, stop_token_ids

ANSWER_STOP = "\n###"


def clean_answer(text: str) -> str:
    """The answer part of a plain-format generation: up to the next prompt section, trimmed."""
    return text.split(ANSWER_STOP, 1)[0].strip()


def answer_from_ids(tokenizer, ids: Sequence[int], *, prompt_format: str = "auto", stops: Sequence[int] | None = None) -> str:
    """The answer in generated token ids (prompt excluded): up to the first stop token
    (EOS; with chat the end-of-turn token), decoded without special tokens; plain
    answers are also cut at the next "###" section."""
    fmt = resolve_prompt_format(tokenizer, prompt_format)
    stop_set = set(stop_token_ids(tokenizer, fmt) if stops is None else stops)
    ids = [int(i) for i in ids]
    for position, token in enumerate(ids):
        if token in stop_set:
            ids = ids[:position]
            break
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return clean_answer(text) if fmt == "plain" else text.strip()


def encode_eval_prompts(tokenizer, rows: Sequence[dict[str, Any]], *, max_prompt_tokens: int, prompt_format: str = "auto") -> list[list[int]]:
    fmt = resolve_prompt_format(tokenizer, prompt_format)
    return [
        encode_prompt(tokenizer, question=r["question"], context=join_contexts(r["contexts"]), max_prompt_tokens=max_prompt_tokens, prompt_format=fmt)
        for r in rows
    ]


@dataclass(frozen=True)
class Generated:
    """One answer and how it ended: `cut_off` when no stop token came within max_new_tokens
    (the answer used every token it was allowed, and may end mid-sentence)."""

    text: str
    new_tokens: int
    cut_off: bool


def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    on_batch: Callable[[int, int], None] | None = None,
    prompt_format: str = "auto",
) -> list[str]:
    """Greedy answers, in the prompts' order (the generate step's decoding)."""
    generated = generate_detailed(
        model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, on_batch=on_batch, prompt_format=prompt_format,
    )
    return [g.text for g in generated]


def generate_detailed(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    on_batch: Callable[[int, int], None] | None = None,
    prompt_format: str = "auto",
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> list[Generated]:
    """Answers with how each ended. temperature 0 is greedy (top_p is then unused);
    above 0 the next token is sampled from the softmax at that temperature, within
    the top-p nucleus."""
    import torch

    fmt = resolve_prompt_format(tokenizer, prompt_format)
    stops = stop_token_ids(tokenizer, fmt)
    stop_set = set(stops)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    answers: list[Generated | None] = [None] * len(prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # generate() warns about (and ignores) sampling options under greedy decoding: pass them only when sampling.
    decoding: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        decoding = {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0}
    model.eval()
    done = 0
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        longest = max(len(prompts[i]) for i in indices)
        input_ids = torch.full((len(indices), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(indices), longest), dtype=torch.long)
        for row, i in enumerate(indices):
            ids = prompts[i]
            input_ids[row, longest - len(ids) :] = torch.tensor(ids)
            attention_mask[row, longest - len(ids) :] = 1
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens, num_beams=1, pad_token_id=pad_id, eos_token_id=stops or None, **decoding,
            )
        for row, i in enumerate(indices):
            new_ids = output[row, longest:].tolist()
            stopped = next((n for n, token in enumerate(new_ids) if token in stop_set), None)
            text = answer_from_ids(tokenizer, new_ids, prompt_format=fmt, stops=stops)
            # A plain-format answer that went on into a new "###" section did end: the rest is not the answer.
            ended = stopped is not None or (fmt == "plain" and ANSWER_STOP in tokenizer.decode(new_ids, skip_special_tokens=True))
            answers[i] = Generated(
                text=text, new_tokens=len(new_ids) if stopped is None else stopped,
                cut_off=not ended and len(new_ids) >= max_new_tokens,
            )
        done += len(indices)
        if on_batch:
            on_batch(done, len(prompts))
    return [a for a in answers if a is not None]


@contextlib.contextmanager
def adapter_disabled(model):
    """The base model's behaviour from a PEFT model, without loading it twice."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model
