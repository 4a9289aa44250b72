"""The export check: an exported model asked the run's eval questions again, compared with the adapter's answers.

Each exported form is loaded by Transformers on its own: the merged folder with
`from_pretrained(folder)`, the GGUF with Transformers' GGUF loader
(`from_pretrained(folder, gguf_file=...)`, model and tokenizer), which knows
nothing of the writer in training/export.py. The questions are encoded and
answered as the generate step did (evaluation/generation.py: the run's prompt
format, its prompt budget, greedy, max_new_tokens, batch size, device), and the
answers compared with the adapter's stored ones (evaluation/equivalence.py).

Scores: an answer identical to the adapter's keeps the adapter's stored scores
(the same text scores the same); an answer that differs is scored with the
run's metrics by the same ragas code (evaluation/scoring.py). Django-free.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .equivalence import Agreement, Equivalence, agreement, compare_scores, overall_verdict
from .samples import Sample


@dataclass
class ReferenceSet:
    """The adapter's side of one eval dataset: rows (question, contexts, ground_truth, reference_contexts), its answers and scores."""

    dataset: str
    indices: list[int]
    rows: list[dict[str, Any]]
    answers: list[str]
    scores: list[dict[str, float | None]]


@dataclass
class DatasetCheck:
    dataset: str
    indices: list[int]
    answers: list[str]
    scores: list[dict[str, float | None]]
    agreement: Agreement
    equivalence: dict[str, Equivalence]


@dataclass
class FormCheck:
    form: str  # "merged" or "gguf"
    label: str  # "merged (float32)", "GGUF q8_0"
    datasets: list[DatasetCheck] = field(default_factory=list)
    seconds: float = 0.0
    device: str = ""

    @property
    def rows(self) -> int:
        return sum(d.agreement.rows for d in self.datasets)

    @property
    def identical(self) -> int:
        return sum(d.agreement.identical for d in self.datasets)

    @property
    def verdict(self) -> str:
        return overall_verdict([e.verdict for d in self.datasets for e in d.equivalence.values()])


def load_exported(folder: str | Path, *, gguf_file: str | None, precision: str):
    """(model, tokenizer, device) of an exported form, as Transformers alone reads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.precision import pick_device

    device, dtype = pick_device(precision)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(str(folder), **extra)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **extra).to(device)
    model.eval()
    return model, tokenizer, device


def exported_answers(model, tokenizer, rows: Sequence[dict[str, Any]], settings: dict[str, Any],
                     on_batch: Callable[[int, int], None] | None = None) -> list[str]:
    """Greedy answers to `rows`, encoded and decoded as the run's generate step does."""
    from training.pyfunc_model import prompt_token_budget

    from .generation import encode_eval_prompts, generate_answers

    budget = prompt_token_budget(max_seq_length=int(settings["max_seq_length"]), max_new_tokens=int(settings["max_new_tokens"]),
                                 max_position_embeddings=getattr(model.config, "max_position_embeddings", None))
    prompts = encode_eval_prompts(tokenizer, rows, max_prompt_tokens=budget, prompt_format=settings["prompt_format"])
    return generate_answers(model, tokenizer, prompts, batch_size=int(settings["batch_size"]), max_new_tokens=int(settings["max_new_tokens"]),
                            on_batch=on_batch, prompt_format=settings["prompt_format"])


def check_form(
    *, folder: str | Path, gguf_file: str | None, form: str, label: str, references: Sequence[ReferenceSet], settings: dict[str, Any],
    metrics: list[str], margin: float, judge: dict[str, Any] | None = None, judge_api_key: str = "",
    progress: Callable[[float, str], None] | None = None, check_cancelled: Callable[[], None] | None = None,
) -> FormCheck:
    """One exported form answers every reference set; agreement and equivalence per eval dataset.

    settings: prompt_format, max_new_tokens, max_seq_length, batch_size, precision (the run's).
    """
    from .scoring import score_samples

    report = progress or (lambda fraction, stage: None)
    started = time.monotonic()
    report(0.0, f"{label}: loading it as Transformers reads it")
    model, tokenizer, device = load_exported(folder, gguf_file=gguf_file, precision=str(settings.get("precision", "auto")))
    checked = FormCheck(form=form, label=label, device=device)
    total = sum(len(r.rows) for r in references) or 1
    done = 0
    for reference in references:
        if check_cancelled:
            check_cancelled()

        def on_batch(answered: int, count: int, before: int = done, name: str = reference.dataset) -> None:
            report(0.8 * (before + answered) / total, f"{label}: answering {name} {answered}/{count}")
            if check_cancelled:
                check_cancelled()

        answers = exported_answers(model, tokenizer, reference.rows, settings, on_batch=on_batch)
        done += len(reference.rows)
        agreed = agreement(reference.answers, answers)
        scores = [dict(s) for s in reference.scores]
        if agreed.differing and metrics:
            report(0.8 + 0.2 * done / total, f"{label}: scoring the {len(agreed.differing)} answers that differ on {reference.dataset}")
            samples = [_sample(reference.rows[i], answers[i]) for i in agreed.differing]
            scored = score_samples(samples, metrics, judge=judge, judge_api_key=judge_api_key)
            for position, row_scores in zip(agreed.differing, scored.scores, strict=True):
                scores[position] = row_scores
        equivalence = compare_scores(
            {m: [s.get(m) for s in reference.scores] for m in metrics}, {m: [s.get(m) for s in scores] for m in metrics}, margin=margin,
        )
        checked.datasets.append(DatasetCheck(dataset=reference.dataset, indices=list(reference.indices), answers=answers, scores=scores,
                                             agreement=agreed, equivalence=equivalence))
    checked.seconds = time.monotonic() - started
    del model
    return checked


def _sample(row: dict[str, Any], answer: str) -> Sample:
    return Sample(question=row["question"], contexts=row["contexts"], ground_truth=row.get("ground_truth", ""), answer=answer,
                  reference_contexts=row.get("reference_contexts"))
