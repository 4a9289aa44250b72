"""Benchmark 2: answers/s of our batched greedy generation against one question at a time.

    python3 bench/bench_generation.py [--model tiny-llama] [--batch-size 8] [--json OUT]

Same model (`local:tiny-llama`, the default offline model, built on first use),
same prompts (every question of the three bundled eval sets, encoded as
run_generate encodes them), same greedy settings. The baseline is what a user
writes: `model.generate()` per question, no padding. Ours is
evaluation.generation.generate_answers() at the default batch size. The
answers must be identical. Runs without Django.

The machines here are shared and noisy, so the two are measured in pairs: the
prompts are cut into groups of one batch (in our length order), and each
group runs batched, then one question at a time, back to back; each group's
best time over the rounds counts. A burst of load then hits both sides of a
pair instead of one whole side.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, print_table, ratio, read_jsonl, verdict, write_json  # noqa: E402


def load(model_name: str):
    import torch

    from training.finetune import load_base_model, load_tokenizer
    from training.tiny_model import build_tiny_model

    path = str(build_tiny_model(model_name, models_dir=ROOT / "var" / "models", data_dir=ROOT / "data"))
    tokenizer = load_tokenizer(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_base_model(path, device=device, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def eval_prompts(tokenizer, model, *, max_new_tokens: int, limit: int | None) -> list[list[int]]:
    from evaluation.generation import encode_eval_prompts

    rows = [r for path in sorted((ROOT / "data" / "eval").glob("*.jsonl")) for r in read_jsonl(path)][:limit]
    # The same prompt budget as evaluation.steps.generate_step (max_seq_length 512).
    max_prompt = max(16, min(512, model.config.max_position_embeddings) - max_new_tokens)
    return encode_eval_prompts(tokenizer, rows, max_prompt_tokens=max_prompt)


def one_at_a_time(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int) -> list[str]:
    """The loop a user writes: generate() per question, the answer cut the same way."""
    import torch

    from evaluation.generation import clean_answer

    device = next(model.parameters()).device
    answers = []
    for ids in prompts:
        input_ids = torch.tensor([ids], device=device)
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
        answers.append(clean_answer(tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)))
    return answers


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="batched generation vs one question at a time")
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--batch-size", type=int, default=8, help="the config's default evaluation.batch_size")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the config's default")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N questions")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from evaluation.generation import generate_answers

    started = time.monotonic()
    model, tokenizer = load(args.model)
    prompts = eval_prompts(tokenizer, model, max_new_tokens=args.max_new_tokens, limit=args.limit)
    print(f"bench 2, generation: local:{args.model}, {len(prompts)} questions, greedy, max_new_tokens {args.max_new_tokens}, "
          f"batch size {args.batch_size}, {args.rounds} interleaved round(s)", flush=True)
    generate_answers(model, tokenizer, prompts[:2], batch_size=2, max_new_tokens=4)  # warm-up
    one_at_a_time(model, tokenizer, prompts[:1], max_new_tokens=4)

    # Groups of one batch each, in the order generate_answers batches them (longest first).
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    groups = [order[start : start + args.batch_size] for start in range(0, len(order), args.batch_size)]
    best: dict[str, list[float]] = {"ours": [float("inf")] * len(groups), "baseline": [float("inf")] * len(groups)}
    totals: dict[str, list[float]] = {"ours": [], "baseline": []}
    answers: dict[str, list[str]] = {"ours": [""] * len(prompts), "baseline": [""] * len(prompts)}
    for number in range(args.rounds):
        round_totals = {"ours": 0.0, "baseline": 0.0}
        for g, group in enumerate(groups):
            group_prompts = [prompts[i] for i in group]
            for which in ("ours", "baseline") if (number + g) % 2 == 0 else ("baseline", "ours"):
                t0 = time.perf_counter()
                if which == "ours":
                    out = generate_answers(model, tokenizer, group_prompts, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
                else:
                    out = one_at_a_time(model, tokenizer, group_prompts, max_new_tokens=args.max_new_tokens)
                elapsed = time.perf_counter() - t0
                best[which][g] = min(best[which][g], elapsed)
                round_totals[which] += elapsed
                for i, answer in zip(group, out, strict=True):
                    answers[which][i] = answer
        for which in totals:
            totals[which].append(round_totals[which])
        print(f"  round {number + 1}: ours {round_totals['ours']:.2f}s, one at a time {round_totals['baseline']:.2f}s", flush=True)
    timings = {which: [sum(best[which])] for which in best}  # best time of each group, summed

    different = [i for i, (a, b) in enumerate(zip(answers["ours"], answers["baseline"], strict=True)) if a != b]
    ours_rate = len(prompts) / min(timings["ours"])
    base_rate = len(prompts) / min(timings["baseline"])
    report = {
        "model": f"local:{args.model}", "device": str(next(model.parameters()).device), "questions": len(prompts),
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "answers_per_second": {"ours": round(ours_rate, 2), "baseline_one_at_a_time": round(base_rate, 2)},
        "seconds": {k: round(v[0], 3) for k, v in timings.items()},
        "seconds_per_round": {k: [round(t, 3) for t in v] for k, v in totals.items()},
        "ratio": ratio(ours_rate, base_rate),
        "identical_answers": not different, "different_answers": len(different),
        "example_difference": None if not different else {
            "index": different[0], "ours": answers["ours"][different[0]], "baseline": answers["baseline"][different[0]]},
        "empty_answers": sum(1 for a in answers["ours"] if not a),
    }
    report["targets"] = {"ratio": verdict(report["ratio"], 3.0) + ("" if not different else f", but {len(different)} answers differ")}
    report["bench_seconds"] = round(time.monotonic() - started, 1)
    print_table("generation throughput (answers/s; each batch-sized group's best time over the rounds, summed)", [
        [f"ours, batch {args.batch_size}", round(ours_rate, 2), round(min(timings["ours"]), 2), "1.00"],
        ["one question at a time", round(base_rate, 2), round(min(timings["baseline"]), 2), report["ratio"]],
    ], ["variant", "answers/s", "seconds", "ours / this"])
    print(f"  identical answers: {len(prompts) - len(different)}/{len(prompts)}; ratio {report['ratio']}x -> {report['targets']['ratio']}")
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
