"""evaluation/steps.py's generate step: each answer comes with whether the token limit cut it off.

The tiny model never reaches a stop token within a few new tokens, so its answers
are cut off; told that the token it emits second is a stop token, it stops there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from evaluation.steps import EvalSet, generate_step

ROWS = [
    {"question": "What is the capital of France?", "contexts": ["Paris is the capital of France."], "ground_truth": "Paris"},
    {"question": "What does RAG stand for?", "contexts": ["RAG is retrieval-augmented generation."], "ground_truth": "retrieval-augmented generation"},
    {"question": "Who?", "contexts": [], "ground_truth": "nobody"},
]
MAX_NEW_TOKENS = 4


class GenerateHere:
    """The generate step's context (a GenerateContext) for base answers of the tiny model to ROWS."""

    def __init__(self, tiny_model: str) -> None:
        self.config: dict[str, Any] = {
            "model": {"base": tiny_model, "prompt_format": "plain"},
            "training": {"max_seq_length": 256},
            "evaluation": {"batch_size": 2, "max_new_tokens": MAX_NEW_TOKENS},
        }
        self.base_model = tiny_model
        self.variants = ["base"]
        self.lines: list[str] = []

    def eval_sets(self) -> list[EvalSet]:
        return [EvalSet(name="tiny", rows=ROWS)]

    def adapter_dir(self) -> Path:
        raise AssertionError("base answers need no adapter")

    def progress(self, fraction: float | None, stage: str) -> None:
        pass

    def log(self, line: str) -> None:
        self.lines.append(line)

    def check_cancelled(self) -> None:
        pass

    def build_progress(self) -> Callable[[int, int], None]:
        return lambda done, total: None

    def record_figures(self, figures: dict[str, Any]) -> None:
        pass


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from training.finetune import load_base_model, load_tokenizer

    return load_base_model(tiny_model, device="cpu", dtype=torch.float32), load_tokenizer(tiny_model)


def prompts(tokenizer) -> list[list[int]]:
    from evaluation.generation import encode_eval_prompts

    return encode_eval_prompts(tokenizer, ROWS, max_prompt_tokens=256 - MAX_NEW_TOKENS, prompt_format="plain")


def test_answers_that_use_every_new_token_are_marked_cut_off_and_are_the_answers_generate_answers_gives(tiny_model, tiny):
    from evaluation.generation import generate_answers

    ctx = GenerateHere(tiny_model)
    [answer_set] = generate_step(ctx).answer_sets
    model, tokenizer = tiny
    assert answer_set.answers == generate_answers(model, tokenizer, prompts(tokenizer), batch_size=2, max_new_tokens=MAX_NEW_TOKENS,
                                                  prompt_format="plain")
    assert answer_set.cut_off == [True] * len(ROWS)
    assert ctx.lines == [f"generated 3 base answers for tiny; 3 cut off at {MAX_NEW_TOKENS} new tokens"]


def greedy_ids(model, prompt: list[int], new_tokens: int) -> list[int]:
    """The tiny model's greedy continuation of one prompt, alone (no batch, no stop token)."""
    with torch.inference_mode():
        output = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return output[0, len(prompt):].tolist()


def test_each_answer_that_reaches_a_stop_token_is_not_cut_off_and_the_others_are(tiny_model, tiny, monkeypatch):
    model, tokenizer = tiny
    continuations = [greedy_ids(model, p, MAX_NEW_TOKENS) for p in prompts(tokenizer)]
    stop = continuations[0][1]  # the first row's second token: told it is a stop token, the model ends that answer there
    monkeypatch.setattr("evaluation.generation.stop_token_ids", lambda tokenizer, prompt_format: [stop])
    expected = [stop not in ids for ids in continuations]
    assert set(expected) == {True, False}, f"the rows no longer mix ended and cut-off answers: {continuations}"

    ctx = GenerateHere(tiny_model)
    [answer_set] = generate_step(ctx).answer_sets
    assert answer_set.cut_off == expected
    assert answer_set.answers[0] == tokenizer.decode(continuations[0][:1], skip_special_tokens=True).strip()
    assert ctx.lines == [f"generated 3 base answers for tiny; {sum(expected)} cut off at {MAX_NEW_TOKENS} new tokens"]
