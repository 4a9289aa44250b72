"""The data check of a fine-tune config: what the data will do to training, before it starts.

One function, `check_data`, answers the New run form's "Check data" button,
`POST /api/runs/check/` and `run_pipeline CONFIG --check` (runs/data_check.py
gathers its inputs), and is run again by every fine-tune step before it
trains, whose report is stored with the run. It reports:

- token lengths of prompt and answer under the base model's tokenizer and the
  run's prompt format (min / median / p95 / max), and how many train rows
  `max_seq_length` would cut, in which part (context, answer), with the longest
  row; above `training.max_truncated_fraction` the config is refused;
- contamination: train questions that equal an eval question after
  normalisation (case, punctuation, spacing) or nearly do (rapidfuzz
  token-set ratio >= NEAR_DUPLICATE_RATIO), listed with both texts; refused
  unless `evaluation.allow_overlap`;
- duplicate questions within the train rows, empty answers;
- the optimizer steps the config implies and, at the throughput of the last
  fine-tune of the same base model on the same device, the training time.

Django-free like the rest of training/: the caller hands in rows, the tokenizer
and the throughput. `problems` lists what refuses the config, each with the
field to change, as the config validator reports its errors.
"""

from __future__ import annotations

import re
import statistics
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from .data import planned_steps, resolve_prompt_format, row_lengths

# rapidfuzz token_set_ratio, 0-100. 95 rather than 90: on the bundled sets, 90 paired "What are the effects
# of iodine deficiency?" with "...of vitamin A deficiency?" (90.7) and "main functions of the skin" with
# "main functions of the human liver" (92.3); a question contained in another still scores 100.
NEAR_DUPLICATE_RATIO = 95.0
MAX_LISTED = 50  # pairs, duplicates and rows listed in a report (the counts are complete)
_PUNCTUATION = re.compile(r"[^\w\s]")
_SPACES = re.compile(r"\s+")


def normalise_question(text: str) -> str:
    """Case, accents' forms, punctuation and spacing removed: "What is X?" == "what is x"."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _SPACES.sub(" ", _PUNCTUATION.sub(" ", text)).strip()


def length_summary(values: Sequence[int]) -> dict[str, float | int] | None:
    if not values:
        return None
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, max(0, -(-95 * len(ordered) // 100) - 1))]  # nearest-rank percentile
    return {"min": ordered[0], "median": statistics.median(ordered), "p95": p95, "max": ordered[-1]}


def token_report(tokenizer, rows: Sequence[Mapping[str, str]], *, max_seq_length: int, prompt_format: str) -> dict[str, Any]:
    """Lengths and cuts of the train rows under build_example's budgets (training/data.py)."""
    fmt = resolve_prompt_format(tokenizer, prompt_format)
    lengths = [
        row_lengths(tokenizer, question=r["question"], context=r["context"], answer=r["answer"], max_seq_length=max_seq_length, prompt_format=fmt)
        for r in rows
    ]
    cut = [i for i, length in enumerate(lengths) if length.context_cut or length.answer_cut]
    longest = max(range(len(lengths)), key=lambda i: lengths[i].total) if lengths else None
    return {
        "prompt_format": fmt,
        "max_seq_length": max_seq_length,
        "rows": len(rows),
        "prompt_tokens": length_summary([length.prompt_tokens for length in lengths]),
        "answer_tokens": length_summary([length.answer_tokens for length in lengths]),
        "total_tokens": sum(min(length.total, max_seq_length) for length in lengths),
        "truncated": {
            "rows": len(cut),
            "fraction": len(cut) / len(rows) if rows else 0.0,
            "context_cut": sum(lengths[i].context_cut for i in cut),
            "answer_cut": sum(lengths[i].answer_cut for i in cut),
            "listed": [{"row": i + 1, "question": rows[i]["question"], "tokens": lengths[i].total} for i in cut[:MAX_LISTED]],
        },
        "longest": None if longest is None else {
            "row": longest + 1, "question": rows[longest]["question"], "tokens": lengths[longest].total,
            "prompt_tokens": lengths[longest].prompt_tokens, "answer_tokens": lengths[longest].answer_tokens,
        },
    }


def overlap_report(train_rows: Sequence[Mapping[str, str]], eval_sets: Mapping[str, Sequence[Mapping[str, str]]]) -> dict[str, Any]:
    """Train questions that duplicate (exactly or nearly) an eval question, each pair listed with both texts."""
    from rapidfuzz import fuzz, process

    train = [normalise_question(r["question"]) for r in train_rows]
    pairs: list[dict[str, Any]] = []
    overlapping: set[int] = set()
    exact = near = 0
    for dataset, rows in eval_sets.items():
        questions = [normalise_question(r["question"]) for r in rows]
        if not train or not questions:
            continue
        # One C++ pass over the whole matrix; pairs under the cutoff come back as 0.
        scores = process.cdist(train, questions, scorer=fuzz.token_set_ratio, score_cutoff=NEAR_DUPLICATE_RATIO, workers=1)
        for i, j in zip(*scores.nonzero(), strict=True):
            kind = "exact" if train[i] == questions[j] else "near"
            exact += kind == "exact"
            near += kind == "near"
            overlapping.add(int(i))
            if len(pairs) < MAX_LISTED:
                pairs.append({
                    "kind": kind, "ratio": round(float(scores[i, j]), 1), "train_row": int(i) + 1,
                    "train_question": train_rows[i]["question"], "eval_dataset": dataset, "eval_row": int(j) + 1,
                    "eval_question": rows[j]["question"],
                })
    return {"train_rows": len(overlapping), "exact": exact, "near": near, "threshold": NEAR_DUPLICATE_RATIO, "pairs": pairs}


def selection_report(
    selection_rows: Sequence[Mapping[str, str]], *, source: str, train_rows: Sequence[Mapping[str, str]],
    validation_rows: Sequence[Mapping[str, str]], eval_sets: Mapping[str, Sequence[Mapping[str, str]]],
) -> dict[str, Any]:
    """How many selection rows ask (exactly or nearly) a question of the train rows, the validation rows and each
    eval set: the rows checkpoints are chosen on must be apart from what trains and from what the claim is made on."""
    against = {"train": {"train": train_rows}, "validation": {"validation": validation_rows}, "eval": dict(eval_sets)}
    overlap = {}
    for name, sets in against.items():
        found = overlap_report(selection_rows, sets)
        overlap[name] = {"rows": found["train_rows"], "exact": found["exact"], "near": found["near"],
                         "pairs": [{**{k: v for k, v in p.items() if not k.startswith("train_")}, "selection_row": p["train_row"],
                                    "selection_question": p["train_question"]} for p in found["pairs"][:5]]}
    return {"rows": len(selection_rows), "source": source, "overlap": overlap}


def duplicate_report(rows: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """Questions asked more than once among the train rows (normalised), and empty answers."""
    seen: dict[str, int] = {}
    duplicates = []
    for i, row in enumerate(rows):
        key = normalise_question(row["question"])
        if key in seen:
            duplicates.append({"row": i + 1, "first_row": seen[key] + 1, "question": row["question"]})
        else:
            seen[key] = i
    empty = [i + 1 for i, row in enumerate(rows) if not str(row.get("answer", "")).strip()]
    return {
        "duplicate_questions": len(duplicates), "duplicates": duplicates[:MAX_LISTED],
        "empty_answers": len(empty), "empty_answer_rows": empty[:MAX_LISTED],
    }


def check_data(
    *,
    tokenizer,
    train_rows: Sequence[Mapping[str, str]],
    validation_rows: Sequence[Mapping[str, str]],
    eval_sets: Mapping[str, Sequence[Mapping[str, str]]],
    training: Mapping[str, Any],
    prompt_format: str = "auto",
    allow_overlap: bool = False,
    throughput: Mapping[str, Any] | None = None,
    selection_rows: Sequence[Mapping[str, str]] | None = None,
    selection_source: str = "",
) -> dict[str, Any]:
    """The report (see the module docstring); `problems` is empty when the config may train.

    train_rows are the rows training uses (after any validation split): their
    truncation and steps count; overlap counts them and the validation rows
    (rows of the train datasets asking an eval question). throughput: {"tokens_per_second",
    "run_id", "device"} of the last comparable run, or None.
    """
    tokens = token_report(tokenizer, train_rows, max_seq_length=training["max_seq_length"], prompt_format=prompt_format)
    overlap = overlap_report([*train_rows, *validation_rows], eval_sets)
    steps = planned_steps(len(train_rows), dict(training))
    all_epochs = planned_steps(len(train_rows), {**training, "max_steps": None})  # max_steps may stop before the last epoch
    tokens_to_train = round(tokens["total_tokens"] * training["epochs"] * steps / max(all_epochs, 1))
    estimate: dict[str, Any] = {"steps": steps, "tokens": tokens_to_train, "seconds": None, "basis": "unknown: no earlier fine-tune of this base model on this device"}
    if throughput and throughput.get("tokens_per_second"):
        estimate["seconds"] = tokens_to_train / float(throughput["tokens_per_second"])
        estimate["basis"] = f"{float(throughput['tokens_per_second']):.0f} tokens/s, measured by run #{throughput['run_id']} on {throughput['device']}"

    problems = []
    truncated, limit = tokens["truncated"], float(training.get("max_truncated_fraction", 1.0))
    if truncated["fraction"] > limit:
        longest = tokens["longest"]
        problems.append({
            "field": "training.max_truncated_fraction",
            "message": (
                f"max_seq_length {training['max_seq_length']} would cut {truncated['rows']} of {tokens['rows']} train rows "
                f"({truncated['fraction']:.0%}; {truncated['context_cut']} lose context, {truncated['answer_cut']} lose answer), "
                f"above the limit of {limit:.0%}; the longest is row {longest['row']} with {longest['tokens']} tokens "
                f"({longest['question'][:80]!r}): raise training.max_seq_length or training.max_truncated_fraction"
            ),
        })
    if overlap["train_rows"] and not allow_overlap:
        first = overlap["pairs"][0]
        problems.append({
            "field": "evaluation.allow_overlap",
            "message": (
                f"{overlap['train_rows']} train row(s) ask an eval question ({overlap['exact']} exact, {overlap['near']} near "
                f"duplicate pair(s) at token-set ratio >= {NEAR_DUPLICATE_RATIO:g}), e.g. train row {first['train_row']} "
                f"{first['train_question'][:80]!r} and {first['eval_dataset']} row {first['eval_row']} {first['eval_question'][:80]!r}: "
                "scores on them would measure memory, not skill; remove them or set evaluation.allow_overlap: true"
            ),
        })
    selection = None
    if selection_rows is not None:
        selection = selection_report(selection_rows, source=selection_source, train_rows=train_rows, validation_rows=validation_rows,
                                     eval_sets=eval_sets)
        if not selection_rows:
            problems.append({"field": "selection.rows", "message": f"no selection rows ({selection_source}): the checkpoints would have nothing to be scored on"})
        leaks = {name: o["rows"] for name, o in selection["overlap"].items() if o["rows"]}
        if leaks:
            named = ", ".join(f"{n} with the {name} rows" for name, n in leaks.items())
            problems.append({
                "field": "selection.rows",
                "message": (f"{sum(leaks.values())} selection row(s) ask a question of other rows ({named}; exact or near duplicates at "
                            f"token-set ratio >= {NEAR_DUPLICATE_RATIO:g}): a checkpoint chosen on them would be judged on what it "
                            "trained on or on what the claim is made on; choose selection rows apart from train, validation and eval rows"),
            })
    return {
        "tokens": tokens,
        "validation_rows": len(validation_rows),
        "selection": selection,
        "overlap": overlap,
        "train_set": duplicate_report(train_rows),
        "estimate": estimate,
        "problems": problems,
        "ok": not problems,
    }
