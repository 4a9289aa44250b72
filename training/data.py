"""Prompts, tokenised examples and length-grouped dynamic-padding batches.

Shared by fine-tuning (loss on answer tokens only) and generation (the same
prompt without the answer), so the model is asked exactly what it was taught.

Two prompt formats (config `model.prompt_format`):
- chat: the tokenizer's own chat template (how an instruct model was trained): a
  fixed system message, a user turn with the context and the question, the answer
  as the assistant turn; the loss covers the assistant's tokens and the template's
  end-of-turn token, so the model learns to stop.
- plain: the "### Context / ### Question / ### Answer" template (models without a
  chat template, e.g. local:tiny-llama).
`auto` (the default) is chat when the tokenizer has a chat template, else plain.
In both, a prompt over its budget loses the end of its context first, never the
question or the answer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

IGNORE_INDEX = -100
PROMPT_TEMPLATE = "### Context:\n{context}\n\n### Question:\n{question}\n\n### Answer:\n"
SYSTEM_MESSAGE = "You answer questions using only the given context. Answer briefly."
USER_TEMPLATE = "Context:\n{context}\n\nQuestion: {question}"
PROMPT_FORMATS = ("auto", "chat", "plain")

PromptFormat = Literal["auto", "chat", "plain"]


class PromptFormatError(ValueError):
    """A prompt format the tokenizer cannot serve (chat without a chat template)."""


def resolve_prompt_format(tokenizer, prompt_format: str = "auto") -> Literal["chat", "plain"]:
    """"auto" -> "chat" when the tokenizer has a chat template, else "plain"; explicit choices are checked."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "auto":
        return "chat" if has_template else "plain"
    if prompt_format == "chat":
        if not has_template:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise PromptFormatError(
                f"model.prompt_format is 'chat' but the tokenizer of {name} has no chat template; "
                "use prompt_format 'plain' (or 'auto', which picks plain for it)"
            )
        return "chat"
    if prompt_format == "plain":
        return "plain"
    raise PromptFormatError(f"unknown prompt_format {prompt_format!r}; expected one of {', '.join(PROMPT_FORMATS)}")


def format_prompt(*, question: str, context: str) -> str:
    return PROMPT_TEMPLATE.format(context=context.strip(), question=question.strip())


def join_contexts(contexts: Sequence[str]) -> str:
    return "\n\n".join(c.strip() for c in contexts)


def chat_messages(*, question: str, context: str, answer: str | None = None) -> list[dict[str, str]]:
    messages = [
        {"role": "system", "content": SYSTEM_MESSAGE},
        {"role": "user", "content": USER_TEMPLATE.format(context=context.strip(), question=question.strip())},
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer.strip()})
    return messages


def _prompt_text(tokenizer, *, question: str, context: str, fmt: str) -> str:
    if fmt == "chat":
        return tokenizer.apply_chat_template(chat_messages(question=question, context=context), tokenize=False, add_generation_prompt=True)
    return format_prompt(question=question, context=context)


def _tokenize_prompt(tokenizer, text: str, fmt: str) -> list[int]:
    # A rendered chat template already holds its special tokens (BOS included where the template has one).
    return tokenizer(text, add_special_tokens=fmt != "chat")["input_ids"]


def end_of_turn_ids(tokenizer) -> list[int]:
    """The tokens the chat template puts right after an assistant's content, up to and
    including its end-of-turn token (SmolLM2: <|im_end|>); what follows it (a newline
    before the next turn) is left out, since generation stops at the end of turn."""
    marker = "\u2063ANSWER\u2063"
    rendered = tokenizer.apply_chat_template(chat_messages(question="q", context="c", answer=marker), tokenize=False)
    suffix = rendered[rendered.rindex(marker) + len(marker):]
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    if tokenizer.eos_token_id is not None:
        special.add(tokenizer.eos_token_id)
    for position, token in enumerate(ids):
        if token in special:
            return ids[: position + 1]
    # A template that ends the turn without a special token: end it with EOS.
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids


def stop_token_ids(tokenizer, prompt_format: str = "auto") -> list[int]:
    """Token ids that end an answer: EOS, and with chat the template's end-of-turn token."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if resolve_prompt_format(tokenizer, prompt_format) == "chat":
        for token in end_of_turn_ids(tokenizer)[-1:]:
            if token not in stops:
                stops.append(token)
    return stops


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def encode_prompt(tokenizer, *, question: str, context: str, max_prompt_tokens: int, prompt_format: str = "auto") -> list[int]:
    """Token ids of the prompt; the context is cut first, so the question always fits."""
    fmt = resolve_prompt_format(tokenizer, prompt_format)
    ids = _tokenize_prompt(tokenizer, _prompt_text(tokenizer, question=question, context=context, fmt=fmt), fmt)
    if len(ids) <= max_prompt_tokens:
        return ids
    context_ids = tokenizer(context.strip(), add_special_tokens=False)["input_ids"]
    overflow = len(ids) - max_prompt_tokens
    keep = max(0, len(context_ids) - overflow - 1)
    # Decoding a cut and re-encoding it can merge tokens differently at the seams; cut a little more if needed.
    for _attempt in range(4):
        shortened = tokenizer.decode(context_ids[:keep])
        ids = _tokenize_prompt(tokenizer, _prompt_text(tokenizer, question=question, context=shortened, fmt=fmt), fmt)
        if len(ids) <= max_prompt_tokens or keep == 0:
            break
        keep = max(0, keep - (len(ids) - max_prompt_tokens) - 1)
    # Only a question longer than the whole budget gets here: its prompt loses its start.
    return ids[-max_prompt_tokens:] if len(ids) > max_prompt_tokens else ids


def render_prompt(
    tokenizer, *, question: str, contexts: Sequence[str] | str, prompt_format: str = "auto", max_prompt_tokens: int | None = None,
) -> str:
    """The exact text the model is asked (special tokens included), for the run page and MLflow.

    With max_prompt_tokens it is the decoded token ids generation uses (context cut to fit).
    """
    context = contexts if isinstance(contexts, str) else join_contexts(contexts)
    fmt = resolve_prompt_format(tokenizer, prompt_format)
    if max_prompt_tokens is None:
        return _prompt_text(tokenizer, question=question, context=context, fmt=fmt)
    ids = encode_prompt(tokenizer, question=question, context=context, max_prompt_tokens=max_prompt_tokens, prompt_format=fmt)
    return tokenizer.decode(ids, skip_special_tokens=False)


def answer_budget(max_seq_length: int) -> int:
    """The most tokens an answer keeps (with its end token): half the sequence; the prompt gets the rest."""
    return max(1, max_seq_length // 2)


def _answer_ids(tokenizer, answer: str, fmt: str) -> list[int]:
    end = end_of_turn_ids(tokenizer) if fmt == "chat" else [tokenizer.eos_token_id]
    return tokenizer(answer.strip(), add_special_tokens=False)["input_ids"] + end


@dataclass
class RowLengths:
    """A row's token counts before any cut, and what build_example would cut of it."""

    prompt_tokens: int
    answer_tokens: int  # with its end token
    context_cut: bool
    answer_cut: bool

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.answer_tokens


def row_lengths(tokenizer, *, question: str, context: str, answer: str, max_seq_length: int, prompt_format: str = "auto") -> RowLengths:
    """The lengths build_example starts from, and its cuts (the same budgets: answer_budget, then the prompt's rest)."""
    fmt = resolve_prompt_format(tokenizer, prompt_format)
    answer_tokens = len(_answer_ids(tokenizer, answer, fmt))
    kept_answer = min(answer_tokens, answer_budget(max_seq_length))
    prompt_tokens = len(_tokenize_prompt(tokenizer, _prompt_text(tokenizer, question=question, context=context, fmt=fmt), fmt))
    return RowLengths(
        prompt_tokens=prompt_tokens, answer_tokens=answer_tokens,
        context_cut=prompt_tokens > max_seq_length - kept_answer, answer_cut=answer_tokens > kept_answer,
    )


def planned_steps(n_examples: int, training: dict) -> int:
    """Optimizer steps a fine-tune of n_examples takes: batches per epoch / accumulation, x epochs, capped by max_steps."""
    batches_per_epoch = math.ceil(n_examples / training["batch_size"])
    steps = math.ceil(batches_per_epoch / training.get("gradient_accumulation_steps", 1)) * training["epochs"]
    return min(steps, training["max_steps"]) if training.get("max_steps") else steps


def build_example(
    tokenizer, *, question: str, context: str, answer: str, max_seq_length: int, prompt_format: str = "auto",
) -> Example:
    """Prompt + answer + end (EOS; with chat the template's end-of-turn token); labels mask the
    prompt so only answer tokens carry loss."""
    fmt = resolve_prompt_format(tokenizer, prompt_format)
    answer_ids = _answer_ids(tokenizer, answer, fmt)[: answer_budget(max_seq_length)]
    prompt_ids = encode_prompt(
        tokenizer, question=question, context=context, max_prompt_tokens=max_seq_length - len(answer_ids), prompt_format=fmt,
    )
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


def _seeded_split(rows: Sequence[dict], *, fraction: float, seed: int, salt: str) -> tuple[list[dict], list[dict]]:
    """(kept rows, held-out rows): a seeded shuffle, `fraction` of the rows held out, disjoint by position.

    At least one row is held out when fraction > 0 and there are two rows or more; order within each part is kept.
    The salt gives each split its own shuffle.
    """
    if fraction <= 0 or len(rows) < 2:
        return list(rows), []
    count = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
    order = list(range(len(rows)))
    random.Random(f"{salt}:{seed}").shuffle(order)
    held = set(order[:count])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def split_validation(rows: Sequence[dict], *, fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train rows, validation rows), held out for the validation loss."""
    return _seeded_split(rows, fraction=fraction, seed=seed, salt="validation-split")


def split_selection(rows: Sequence[dict], *, fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train rows, selection rows): like split_validation, with a shuffle of its own, so the rows chosen to score
    checkpoints by do not depend on the validation split's; disjoint from the rows it leaves for training."""
    return _seeded_split(rows, fraction=fraction, seed=seed, salt="selection-split")
