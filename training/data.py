"""Prompt template, tokenised examples and length-grouped dynamic-padding batches.

Shared by fine-tuning (loss on answer tokens only) and generation (the same
prompt without the answer), so the model is asked exactly what it was taught.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

IGNORE_INDEX = -100
PROMPT_TEMPLATE = "### Context:\n{context}\n\n### Question:\n{question}\n\n### Answer:\n"


def format_prompt(*, question: str, context: str) -> str:
    return PROMPT_TEMPLATE.format(context=context.strip(), question=question.strip())


def join_contexts(contexts: Sequence[str]) -> str:
    return "\n\n".join(c.strip() for c in contexts)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def encode_prompt(tokenizer, *, question: str, context: str, max_prompt_tokens: int) -> list[int]:
    """Token ids of the prompt; the context is cut first, so the question always fits."""
    ids = tokenizer(format_prompt(question=question, context=context), add_special_tokens=True)["input_ids"]
    if len(ids) <= max_prompt_tokens:
        return ids
    context_ids = tokenizer(context.strip(), add_special_tokens=False)["input_ids"]
    overflow = len(ids) - max_prompt_tokens
    keep = max(0, len(context_ids) - overflow - 1)
    shortened = tokenizer.decode(context_ids[:keep])
    ids = tokenizer(format_prompt(question=question, context=shortened), add_special_tokens=True)["input_ids"]
    return ids[-max_prompt_tokens:] if len(ids) > max_prompt_tokens else ids


def build_example(tokenizer, *, question: str, context: str, answer: str, max_seq_length: int) -> Example:
    """Prompt + answer + EOS; labels mask the prompt so only answer tokens carry loss."""
    answer_ids = tokenizer(answer.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    answer_ids = answer_ids[: max(1, max_seq_length // 2)]
    prompt_ids = encode_prompt(tokenizer, question=question, context=context, max_prompt_tokens=max_seq_length - len(answer_ids))
    return Example(input_ids=prompt_ids + answer_ids, labels=[IGNORE_INDEX] * len(prompt_ids) + answer_ids)


def length_grouped_batches(lengths: Sequence[int], *, batch_size: int, seed: int, epoch: int, group_factor: int = 50) -> list[list[int]]:
    """Shuffled batches of similar-length examples (little padding), reproducible per (seed, epoch).

    Indices are shuffled, cut into mega-batches of batch_size * group_factor, each
    sorted by length and cut into batches; the batch order is shuffled again so
    lengths do not march monotonically through an epoch.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * group_factor
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[Example], *, pad_token_id: int, pad_to_multiple_of: int | None = None):
    """Right-padded tensors, padded only to the longest example of the batch."""
    import torch

    longest = max(e.n_tokens for e in examples)
    if pad_to_multiple_of:
        longest = (longest + pad_to_multiple_of - 1) // pad_to_multiple_of * pad_to_multiple_of
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = example.n_tokens
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def iter_batches(examples: Sequence[Example], *, batch_size: int, seed: int, epoch: int) -> Iterator[list[Example]]:
    for indices in length_grouped_batches([e.n_tokens for e in examples], batch_size=batch_size, seed=seed, epoch=epoch):
        yield [examples[i] for i in indices]
