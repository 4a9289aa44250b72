"""Prompting the way the model was trained: chat template for instruct models, the plain
"### Context" template for the rest; loss on the answer only; context cut first."""

from __future__ import annotations

import json

import pytest

from evaluation.generation import answer_from_ids, clean_answer, encode_eval_prompts
from training.data import (
    IGNORE_INDEX,
    SYSTEM_MESSAGE,
    PromptFormatError,
    build_example,
    encode_prompt,
    render_prompt,
    resolve_prompt_format,
)
from training.finetune import encode_rows, load_tokenizer

ROW = {
    "question": "What does Newton's second law of motion state?",
    "context": "Newton's second law relates force, mass, and acceleration. It is written F = ma.",
    "answer": "The net force on an object equals its mass times its acceleration (F = ma).",
}
LONG_CONTEXT = " ".join(f"Sentence number {i} of a long context about forces and masses." for i in range(200))


@pytest.fixture(scope="module")
def chat_tokenizer(smollm2_model):
    return load_tokenizer(smollm2_model)


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_model):
    return load_tokenizer(tiny_model)


def answer_tokens(example) -> list[int]:
    return [label for label in example.labels if label != IGNORE_INDEX]


def test_auto_picks_chat_only_with_a_chat_template(chat_tokenizer, plain_tokenizer):
    assert resolve_prompt_format(chat_tokenizer, "auto") == "chat"
    assert resolve_prompt_format(plain_tokenizer, "auto") == "plain"
    assert resolve_prompt_format(chat_tokenizer, "plain") == "plain"
    assert resolve_prompt_format(chat_tokenizer, "chat") == "chat"


def test_chat_without_a_template_is_refused_clearly(plain_tokenizer):
    with pytest.raises(PromptFormatError, match="has no chat template.*'plain'"):
        resolve_prompt_format(plain_tokenizer, "chat")
    with pytest.raises(PromptFormatError, match="unknown prompt_format"):
        resolve_prompt_format(plain_tokenizer, "markdown")


def test_chat_example_is_the_template_with_loss_on_the_assistant_turn_only(chat_tokenizer):
    tok = chat_tokenizer
    example = build_example(tok, max_seq_length=512, **ROW)
    messages = [
        {"role": "system", "content": SYSTEM_MESSAGE},
        {"role": "user", "content": f"Context:\n{ROW['context']}\n\nQuestion: {ROW['question']}"},
        {"role": "assistant", "content": ROW["answer"]},
    ]
    full = tok.apply_chat_template(messages, tokenize=False)
    # The whole example is the template's text, up to and including the assistant's <|im_end|>.
    assert tok.decode(example.input_ids) + "\n" == full
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    expected_answer = tok(ROW["answer"], add_special_tokens=False)["input_ids"] + [end_of_turn]
    assert answer_tokens(example) == expected_answer
    # The labelled tokens are exactly the last ones: everything before them is masked.
    n_prompt = example.n_tokens - len(expected_answer)
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
    assert tok.decode(example.input_ids[:n_prompt]) == render_prompt(tok, question=ROW["question"], contexts=[ROW["context"]])


def test_plain_format_is_unchanged_for_tiny_llama(plain_tokenizer):
    tok = plain_tokenizer
    example = build_example(tok, max_seq_length=512, **ROW)
    prompt = f"### Context:\n{ROW['context']}\n\n### Question:\n{ROW['question']}\n\n### Answer:\n"
    prompt_ids = tok(prompt, add_special_tokens=True)["input_ids"]
    answer_ids = tok(ROW["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert example.input_ids == prompt_ids + answer_ids
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    assert render_prompt(tok, question=ROW["question"], contexts=[ROW["context"]]) == prompt
    assert encode_prompt(tok, question=ROW["question"], context=ROW["context"], max_prompt_tokens=512) == prompt_ids


@pytest.mark.parametrize("which", ["chat", "plain"])
def test_context_is_cut_first_never_question_or_answer(which, chat_tokenizer, plain_tokenizer):
    tok = chat_tokenizer if which == "chat" else plain_tokenizer
    max_seq_length = 128
    example = build_example(tok, question=ROW["question"], context=LONG_CONTEXT, answer=ROW["answer"], max_seq_length=max_seq_length)
    assert example.n_tokens <= max_seq_length
    text = tok.decode(example.input_ids, skip_special_tokens=True)
    assert ROW["question"] in text
    assert text.rstrip().endswith(ROW["answer"])
    assert "Sentence number 0 of" in text  # the context's start stays
    assert "Sentence number 199" not in text  # its end went
    assert tok.decode(answer_tokens(example), skip_special_tokens=True) == ROW["answer"]
    # Generation prompts are cut the same way, and render_prompt shows the cut text.
    ids = encode_prompt(tok, question=ROW["question"], context=LONG_CONTEXT, max_prompt_tokens=96)
    assert len(ids) <= 96
    shown = render_prompt(tok, question=ROW["question"], contexts=[LONG_CONTEXT], max_prompt_tokens=96)
    assert ROW["question"] in shown and "Sentence number 199" not in shown
    assert tok.decode(ids, skip_special_tokens=False) == shown


def test_render_prompt_is_what_generation_encodes(chat_tokenizer):
    tok = chat_tokenizer
    row = {"question": "How tall is the Eiffel Tower?", "contexts": ["It is 330 m tall.", "It is in Paris."]}
    shown = render_prompt(tok, question=row["question"], contexts=row["contexts"])
    assert shown == (
        f"<|im_start|>system\n{SYSTEM_MESSAGE}<|im_end|>\n"
        "<|im_start|>user\nContext:\nIt is 330 m tall.\n\nIt is in Paris.\n\nQuestion: How tall is the Eiffel Tower?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    [ids] = encode_eval_prompts(tok, [row], max_prompt_tokens=448)
    assert ids == tok(shown, add_special_tokens=False)["input_ids"]
    [plain_ids] = encode_eval_prompts(tok, [row], max_prompt_tokens=448, prompt_format="plain")
    assert tok.decode(plain_ids).startswith("### Context:")


def test_answers_stop_at_the_end_of_turn(chat_tokenizer, plain_tokenizer):
    tok = chat_tokenizer
    generated = tok("The tower is 330 m tall.", add_special_tokens=False)["input_ids"]
    generated += tok("<|im_end|>\n<|im_start|>user\nmore", add_special_tokens=False)["input_ids"]
    assert answer_from_ids(tok, generated) == "The tower is 330 m tall."
    plain = plain_tokenizer
    ids = plain("It is 330 m.\n### Question:\nWhat else?", add_special_tokens=False)["input_ids"]
    assert answer_from_ids(plain, ids) == "It is 330 m." == clean_answer("It is 330 m.\n### Question:\nWhat else?")


def test_encode_rows_threads_the_format(chat_tokenizer):
    [chat] = encode_rows(chat_tokenizer, [ROW], 512)
    [plain] = encode_rows(chat_tokenizer, [ROW], 512, prompt_format="plain")
    assert chat_tokenizer.decode(chat.input_ids).startswith("<|im_start|>system")
    assert chat_tokenizer.decode(plain.input_ids).startswith("### Context:")


def test_typical_train_row_in_chat_format_fits_comfortably(chat_tokenizer, settings):
    from pathlib import Path

    path = Path(settings.BUNDLED_DATA_DIR) / "train" / "rag_qa_train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    examples = encode_rows(chat_tokenizer, rows, 512)
    lengths = sorted(e.n_tokens for e in examples)
    assert lengths[-1] < 512  # nothing of rag_qa_train is cut at the default max_seq_length
    # Each answer's labels end with the end-of-turn token, so the model learns to stop.
    end_of_turn = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(answer_tokens(e)[-1] == end_of_turn for e in examples)
    print(f"rag_qa_train in chat format: median {lengths[len(lengths) // 2]} tokens, max {lengths[-1]}")
