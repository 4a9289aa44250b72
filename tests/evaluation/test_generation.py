"""evaluation/generation.py: how each answer ended (cut off by the token limit or not), and sampled decoding.

A stand-in model returns fixed token ids so the stop rules are checked exactly;
the tiny model checks that sampling really goes through generate().
"""

from __future__ import annotations

import pytest
import torch

from evaluation.generation import generate_answers, generate_detailed


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from training.finetune import load_tokenizer

    return load_tokenizer(tiny_model)


class FixedModel(torch.nn.Module):
    """generate() appends the given ids to every prompt; records the decoding options it was given."""

    def __init__(self, new_ids: list[list[int]]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.new_ids = new_ids
        self.calls: list[dict] = []

    def generate(self, *, input_ids, attention_mask, **options):
        self.calls.append(options)
        tail = torch.tensor(self.new_ids[: len(input_ids)], dtype=torch.long)
        return torch.cat([input_ids, tail], dim=1)


def word_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_an_answer_that_reaches_a_stop_token_is_not_cut_off(tokenizer):
    words = word_ids(tokenizer, "Paris is the capital")
    eos = tokenizer.eos_token_id
    ended = words[:2] + [eos] + [eos] * (len(words) - 2)  # padded with EOS after the end, as generate() does
    model = FixedModel([ended])
    [answer] = generate_detailed(model, tokenizer, [[1, 2, 3]], batch_size=1, max_new_tokens=len(ended), prompt_format="plain")
    assert answer.cut_off is False and answer.new_tokens == 2
    assert answer.text == tokenizer.decode(words[:2], skip_special_tokens=True).strip()


def test_an_answer_that_uses_every_token_without_a_stop_is_cut_off(tokenizer):
    words = word_ids(tokenizer, "Paris is the capital of France and")
    model = FixedModel([words])
    [answer] = generate_detailed(model, tokenizer, [[1, 2, 3]], batch_size=1, max_new_tokens=len(words), prompt_format="plain")
    assert answer.cut_off is True and answer.new_tokens == len(words)


def test_a_plain_answer_that_runs_into_a_new_section_ended(tokenizer):
    words = word_ids(tokenizer, "Paris\n### Question: what else")
    [answer] = generate_detailed(FixedModel([words]), tokenizer, [[1, 2, 3]], batch_size=1, max_new_tokens=len(words), prompt_format="plain")
    assert answer.cut_off is False and answer.text == "Paris"


def test_greedy_by_default_sampling_only_when_asked(tokenizer):
    words = word_ids(tokenizer, "Paris")
    model = FixedModel([words, words])
    assert generate_answers(model, tokenizer, [[1, 2], [1, 2, 3]], batch_size=2, max_new_tokens=len(words), prompt_format="plain") == ["Paris"] * 2
    assert model.calls[-1]["do_sample"] is False and "temperature" not in model.calls[-1]
    generate_detailed(model, tokenizer, [[1, 2]], batch_size=1, max_new_tokens=len(words), prompt_format="plain", temperature=0.7, top_p=0.9)
    assert model.calls[-1]["do_sample"] is True and model.calls[-1]["temperature"] == 0.7 and model.calls[-1]["top_p"] == 0.9


def test_the_tiny_model_samples_and_stays_within_the_limit(tiny_model, tokenizer):
    from training.finetune import load_base_model

    model = load_base_model(tiny_model, device="cpu", dtype=torch.float32)
    prompt = tokenizer("### Question: What is RAG?\n### Answer:", add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    sampled = generate_detailed(model, tokenizer, [prompt] * 4, batch_size=4, max_new_tokens=6, prompt_format="plain", temperature=1.5, top_p=1.0)
    greedy = generate_detailed(model, tokenizer, [prompt] * 4, batch_size=4, max_new_tokens=6, prompt_format="plain")
    assert all(g.new_tokens <= 6 for g in sampled + greedy)
    assert len({g.text for g in greedy}) == 1  # greedy: the same prompt, the same answer
    assert all(g.new_tokens == 6 for g in sampled + greedy if g.cut_off)
