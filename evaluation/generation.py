"""Batched greedy answer generation from question + contexts (gpu queue).

Prompts are sorted by length and left-padded per batch, so little compute is
spent on padding; answers come back in the original order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from training.data import encode_prompt, join_contexts

ANSWER_STOP = "\n###"


def clean_answer(text: str) -> str:
    """The answer part of a generation: up to the next prompt section, trimmed."""
    return text.split(ANSWER_STOP, 1)[0].strip()


def encode_eval_prompts(tokenizer, rows: Sequence[dict[str, Any]], *, max_prompt_tokens: int) -> list[list[int]]:
    return [
        encode_prompt(tokenizer, question=r["question"], context=join_contexts(r["contexts"]), max_prompt_tokens=max_prompt_tokens)
        for r in rows
    ]


def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[str]:
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    answers: list[str] = [""] * len(prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
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
                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
            )
        for row, i in enumerate(indices):
            answers[i] = clean_answer(tokenizer.decode(output[row, longest:], skip_special_tokens=True))
        done += len(indices)
        if on_batch:
            on_batch(done, len(prompts))
    return answers


@contextlib.contextmanager
def adapter_disabled(model):
    """The base model's behaviour from a PEFT model, without loading it twice."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model
