"""Benchmark 2: answers/s of our batched greedy generation against one question at a time.

    python3 bench/bench_generation.py [--models tiny-llama,smollm2-135m-instruct] [--batch-size 8] [--json OUT]

Two models, each built on first use under var/models: `local:tiny-llama` (the
tiny offline model, every question of the three bundled eval sets) and the
real default model `local:smollm2-135m-instruct` (134.5M parameters, chat
template; an even spread of `--real-questions` of the questions, 16 by
default, so the one-at-a-time side stays at a few minutes on 2 cores: its
prompts are ~200 tokens and its answers run to the 64-token limit). Same
prompts (encoded as run_generate encodes them), same greedy settings. The
baseline is what a user writes: `model.generate()` per question, no padding,
stopping at the same stop tokens and cutting the answer the same way. Ours is
evaluation.generation.generate_answers() at the default batch size. The
answers must be identical. Runs without Django.

The machines here are shared and noisy, so the two are measured in pairs: the
prompts are cut into groups of one batch (in our length order), and each
group runs batched, then one question at a time, back to back; each group's
best time over the rounds counts. A burst of load then hits both sides of a
pair instead of one whole side.

The report's top level is the real default model (issue 14's row 2); every
model's figures are under "models".
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, linear_weights, matmul_peaks, print_table, ratio, read_jsonl, verdict, write_json  # noqa: E402

REAL_MODEL = "smollm2-135m-instruct"


def load(model_name: str, precision: str = "auto"):
    """The model as the generate step loads it: device and dtype from training.precision's rule."""
    from training.finetune import load_base_model, load_tokenizer
    from training.local_models import build_local_model
    from training.precision import pick_device

    # Explicit directories: resolve_model_path() would read MODELS_DIR from Django's settings.
    path = str(build_local_model(model_name, models_dir=ROOT / "var" / "models", data_dir=ROOT / "data"))
    tokenizer = load_tokenizer(path)
    device, dtype = pick_device(precision)
    model = load_base_model(path, device=device, dtype=dtype)
    model.eval()
    return model, tokenizer


def fp32_reference(model_name: str, prompts: list[list[int]], answers: list[str], *, batch_size: int, max_new_tokens: int,
                   seconds: float) -> dict[str, Any]:
    """The same batched generation in float32: its speed, and how close bf16's answers are (identical; ROUGE-L F1)."""
    from rouge_score import rouge_scorer

    from evaluation.generation import generate_answers

    model, tokenizer = load(model_name, "fp32")
    generate_answers(model, tokenizer, prompts[:2], batch_size=2, max_new_tokens=4)  # warm-up
    started = time.perf_counter()
    reference = generate_answers(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)
    fp32_seconds = time.perf_counter() - started
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    overlap = [scorer.score(a, b)["rougeL"].fmeasure for a, b in zip(reference, answers, strict=True)]
    return {"fp32_seconds": round(fp32_seconds, 3), "bf16_speedup": ratio(fp32_seconds, seconds),
            "identical_to_fp32": sum(a == b for a, b in zip(reference, answers, strict=True)), "questions": len(prompts),
            "mean_rouge_l_vs_fp32": round(sum(overlap) / len(overlap), 4), "lowest_rouge_l_vs_fp32": round(min(overlap), 4)}


def eval_prompts(tokenizer, model, *, max_new_tokens: int, limit: int | None, spread: int | None = None) -> list[list[int]]:
    """The eval questions encoded as run_generate does: the first `limit`, or `spread` evenly spaced ones."""
    from evaluation.generation import encode_eval_prompts

    rows = [r for path in sorted((ROOT / "data" / "eval").glob("*.jsonl")) for r in read_jsonl(path)][:limit]
    if spread and spread < len(rows):
        rows = [rows[i * len(rows) // spread] for i in range(spread)]
    # The same prompt budget as evaluation.steps.generate_step (max_seq_length 512).
    max_prompt = max(16, min(512, model.config.max_position_embeddings) - max_new_tokens)
    return encode_eval_prompts(tokenizer, rows, max_prompt_tokens=max_prompt)


def one_at_a_time(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int) -> list[str]:
    """The loop a user writes: generate() per question, stopping at the same tokens, the answer cut the same way."""
    import torch

    from evaluation.generation import answer_from_ids
    from training.data import stop_token_ids

    stops = stop_token_ids(tokenizer)  # EOS; with a chat template also its end-of-turn token
    device = next(model.parameters()).device
    answers = []
    for ids in prompts:
        input_ids = torch.tensor([ids], device=device)
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=stops or None,
            )
        answers.append(answer_from_ids(tokenizer, output[0, len(ids):].tolist(), stops=stops))
    return answers


def bench_model(model_name: str, *, batch_size: int, max_new_tokens: int, limit: int | None, spread: int | None,
                rounds: int, precision: str = "auto", peaks: dict[str, float] | None = None) -> dict[str, Any]:
    """One model's row: batched vs one at a time, in pairs of one batch each."""
    from evaluation.generation import generate_answers

    started = time.monotonic()
    model, tokenizer = load(model_name, precision)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    prompts = eval_prompts(tokenizer, model, max_new_tokens=max_new_tokens, limit=limit, spread=spread)
    print(f"bench 2, generation: local:{model_name}, {len(prompts)} questions, greedy, max_new_tokens {max_new_tokens}, "
          f"batch size {batch_size}, {dtype}, {rounds} interleaved round(s)", flush=True)
    generate_answers(model, tokenizer, prompts[:2], batch_size=2, max_new_tokens=4)  # warm-up
    one_at_a_time(model, tokenizer, prompts[:1], max_new_tokens=4)

    # Groups of one batch each, in the order generate_answers batches them (longest first).
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    groups = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    best: dict[str, list[float]] = {"ours": [float("inf")] * len(groups), "baseline": [float("inf")] * len(groups)}
    totals: dict[str, list[float]] = {"ours": [], "baseline": []}
    answers: dict[str, list[str]] = {"ours": [""] * len(prompts), "baseline": [""] * len(prompts)}
    for number in range(rounds):
        round_totals = {"ours": 0.0, "baseline": 0.0}
        for g, group in enumerate(groups):
            group_prompts = [prompts[i] for i in group]
            for which in ("ours", "baseline") if (number + g) % 2 == 0 else ("baseline", "ours"):
                t0 = time.perf_counter()
                if which == "ours":
                    out = generate_answers(model, tokenizer, group_prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)
                else:
                    out = one_at_a_time(model, tokenizer, group_prompts, max_new_tokens=max_new_tokens)
                elapsed = time.perf_counter() - t0
                best[which][g] = min(best[which][g], elapsed)
                round_totals[which] += elapsed
                for i, answer in zip(group, out, strict=True):
                    answers[which][i] = answer
        for which in totals:
            totals[which].append(round_totals[which])
        print(f"  round {number + 1}: ours {round_totals['ours']:.2f}s, one at a time {round_totals['baseline']:.2f}s", flush=True)
    timings = {which: sum(best[which]) for which in best}  # best time of each group, summed

    different = [i for i, (a, b) in enumerate(zip(answers["ours"], answers["baseline"], strict=True)) if a != b]
    ours_rate = len(prompts) / timings["ours"]
    base_rate = len(prompts) / timings["baseline"]
    report = {
        "model": f"local:{model_name}", "device": str(next(model.parameters()).device), "dtype": dtype, "questions": len(prompts),
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": batch_size, "max_new_tokens": max_new_tokens,
        "answers_per_second": {"ours": round(ours_rate, 2), "baseline_one_at_a_time": round(base_rate, 2)},
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "seconds_per_round": {k: [round(t, 3) for t in v] for k, v in totals.items()},
        "ratio": ratio(ours_rate, base_rate),
        "identical_answers": not different, "different_answers": len(different),
        "example_difference": None if not different else {
            "index": different[0], "ours": answers["ours"][different[0]], "baseline": answers["baseline"][different[0]]},
        "empty_answers": sum(1 for a in answers["ours"] if not a),
    }
    report["targets"] = {"ratio": verdict(report["ratio"], 3.0) + ("" if not different else f", but {len(different)} answers differ")}
    if peaks:
        # Real tokens through the decoder: every prompt token once, every answer token (re-encoded; its stop token
        # not counted) once; 2 FLOPs per decoder weight each, attention and lm_head left out: a lower bound.
        answer_tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers["ours"])
        tokens = sum(len(p) for p in prompts) + answer_tokens
        gflops = 2 * linear_weights(Path(model.name_or_path)) * tokens / timings["ours"] / 1e9
        report["hardware"] = {"matmul_peak_gflops": peaks, "tokens": tokens, "ours_gflops": round(gflops, 2),
                              "fraction_of_bf16_peak": round(gflops / peaks["bfloat16"], 4),
                              "fraction_of_fp32_peak": round(gflops / peaks["float32"], 4)}
    if dtype == "bfloat16" and report["device"] == "cpu":
        model = None  # free it before the float32 copy loads
        report["precision"] = fp32_reference(model_name, prompts, answers["ours"], batch_size=batch_size, max_new_tokens=max_new_tokens,
                                             seconds=timings["ours"])
    report["bench_seconds"] = round(time.monotonic() - started, 1)
    print_table(f"generation throughput, local:{model_name} (answers/s; each batch-sized group's best time over the rounds, summed)", [
        [f"ours, batch {batch_size}", round(ours_rate, 2), round(timings["ours"], 2), "1.00"],
        ["one question at a time", round(base_rate, 2), round(timings["baseline"], 2), report["ratio"]],
    ], ["variant", "answers/s", "seconds", "ours / this"])
    print(f"  identical answers: {len(prompts) - len(different)}/{len(prompts)}; ratio {report['ratio']}x -> {report['targets']['ratio']}", flush=True)
    if hw := report.get("hardware"):
        print(f"  ours: >= {hw['ours_gflops']} GFLOP/s = {hw['fraction_of_bf16_peak']:.1%} of this machine's bf16 matmul peak "
              f"({peaks['bfloat16']} GFLOP/s; {hw['fraction_of_fp32_peak']:.1%} of the float32 peak, {peaks['float32']})", flush=True)
    if p := report.get("precision"):
        print(f"  bf16 vs float32 (batched): {p['bf16_speedup']}x faster; answers identical to float32 {p['identical_to_fp32']}/{p['questions']}, "
              f"ROUGE-L F1 vs float32 mean {p['mean_rouge_l_vs_fp32']}, lowest {p['lowest_rouge_l_vs_fp32']}", flush=True)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="batched generation vs one question at a time")
    parser.add_argument("--models", default=f"tiny-llama,{REAL_MODEL}", help="comma-separated local: model names")
    parser.add_argument("--model", default=None, help="one model only (same as --models NAME)")
    parser.add_argument("--batch-size", type=int, default=8, help="the config's default evaluation.batch_size")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the config's default")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N questions")
    parser.add_argument("--real-questions", type=int, default=16,
                        help=f"local:{REAL_MODEL}: an even spread of this many questions (0: all)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both sides (default: torch's own, one per core); 1 keeps a co-running "
                             "process on the other core from stalling every parallel region")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="as training.precision (training/precision.py)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    peaks = None if torch.cuda.is_available() else matmul_peaks()
    if peaks:
        print(f"bench 2: this machine's 2048x2048 matmul: float32 {peaks['float32']} GFLOP/s, bfloat16 {peaks['bfloat16']} GFLOP/s "
              f"({torch.get_num_threads()} threads)", flush=True)
    names = [args.model] if args.model else [m for m in args.models.split(",") if m]
    models = {}
    for name in names:
        models[name] = bench_model(
            name, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit,
            spread=(args.real_questions or None) if name == REAL_MODEL else None, rounds=args.rounds, precision=args.precision, peaks=peaks)
    headline = models.get(REAL_MODEL) or models[names[0]]
    report = {**headline, "models": models, "torch_threads": torch.get_num_threads(), "bench_seconds": round(time.monotonic() - started, 1)}
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
