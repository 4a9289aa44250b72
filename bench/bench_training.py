"""Benchmark 1: LoRA training throughput, ours against the Trainer script users would write.

    python3 bench/bench_training.py [--device auto|cpu|cuda] [--rows N] [--epochs E] [--json OUT]

Three ways to fine-tune the same model with the same LoRA settings on the same
rows (the bundled train sets, whose lengths vary), each in its own process so
that peak memory is its own:

- ours: training.finetune.finetune(), the platform's loop (length-grouped
  dynamic padding, logits only where the loss is, loss on answer tokens);
- trainer: what the Transformers/PEFT docs lead a user to write: Trainer,
  `padding="max_length"`, DataCollatorForLanguageModeling (loss on the whole
  sequence), get_peft_model with the same LoraConfig, the same learning rate,
  batch size and epochs;
- minimal: a hand-written PyTorch loop over exactly our batches (forward, loss,
  backward, AdamW step, nothing else): what is left is framework overhead.

Every variant sees the same rows for the same epochs, so the same real
(non-padding) tokens. Throughput is non-padding tokens per second over the
steady state (steps 2..N: the first step pays one-off warm-up); the first step
is still counted in the wall time printed beside it. Runs without Django: on
CUDA (bf16 where supported) it needs only torch, transformers, peft, accelerate.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, PeakRss, linear_weights, matmul_peaks, print_table, ratio, read_jsonl, verdict, write_json  # noqa: E402

LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"}
LEARNING_RATE = 2e-4
SEED = 42
VARIANTS = ("ours", "trainer", "minimal")


# --- the model ------------------------------------------------------------------------------

def ensure_model(init: str, name: str = "small-llama") -> Path:
    """The ~14M-parameter `local:small-llama` build: pre-trained, or the same config with random weights.

    Throughput does not depend on the weights; the random-init build takes
    seconds where the pre-training pass takes minutes on 2 CPU cores.
    """
    from training.tiny_model import build_tiny_model, untrained_model

    if init == "pretrained":
        return build_tiny_model(name, models_dir=ROOT / "var" / "models", data_dir=ROOT / "data")
    target = ROOT / "var" / "bench" / "models" / f"{name}-random"
    if target.exists():
        return target
    model, tokenizer, _texts = untrained_model(name, data_dir=ROOT / "data")  # the same config build_tiny_model() uses
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-random-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, target)
    return target


def bench_rows(n_rows: int) -> list[dict[str, str]]:
    """A fixed, seeded sample of the bundled train rows (all three sets: lengths vary)."""
    rows = [r for path in sorted((ROOT / "data" / "train").glob("*.jsonl")) for r in read_jsonl(path)]
    random.Random(0).shuffle(rows)
    return rows[: n_rows or len(rows)]


# --- one variant, in its own process ----------------------------------------------------------

class Clock:
    """Step timestamps and cumulative real tokens; steady state = steps 2..N."""

    def __init__(self, sync) -> None:
        self.sync = sync
        self.marks: list[tuple[float, int]] = []
        self.losses: list[float] = []

    def mark(self, tokens: int, *, synchronize: bool = False, loss: float | None = None) -> None:
        if synchronize:
            self.sync()
        self.marks.append((time.perf_counter(), tokens))
        if loss is not None:
            self.losses.append(loss)

    def summary(self, started: float) -> dict[str, Any]:
        (t1, k1), (tn, kn) = self.marks[0], self.marks[-1]
        steady_seconds = tn - t1
        return {
            "steps": len(self.marks),
            "real_tokens": kn,
            "seconds_total": round(tn - started, 3),
            "steady_seconds": round(steady_seconds, 3),
            "steady_tokens": kn - k1,
            "tokens_per_second": round((kn - k1) / steady_seconds, 1) if steady_seconds > 0 else None,
            "seconds_per_step": round(steady_seconds / (len(self.marks) - 1), 4) if len(self.marks) > 1 else None,
        }


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from training.precision import training_precision

    cuda = torch.cuda.is_available()
    device, weights_dtype, autocast_dtype = training_precision(args.precision, args.model_dir)
    dtype = autocast_dtype or weights_dtype  # the compute dtype, as finetune() reports it

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    model_dir = str(args.model_dir)
    rows = bench_rows(args.rows)
    training = {
        "epochs": args.epochs, "learning_rate": LEARNING_RATE, "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length, "seed": SEED, "lora": dict(LORA, dropout=args.lora_dropout),
        "gradient_accumulation_steps": args.accumulation, "gradient_checkpointing": args.gradient_checkpointing,
        "warmup_ratio": 0.0, "max_steps": None, "precision": args.precision,
    }
    clock = Clock(sync)
    _preimport(variant)
    memory = PeakRss()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if variant == "ours":
        _run_ours(model_dir, rows, training, clock)
    elif variant == "trainer":
        _run_trainer(model_dir, rows, training, clock, device=device, weights_dtype=weights_dtype, bf16=dtype == torch.bfloat16)
    elif variant == "minimal":
        _run_minimal(model_dir, rows, training, clock, device=device, weights_dtype=weights_dtype, autocast_dtype=autocast_dtype)
    else:
        raise SystemExit(f"unknown variant {variant}")
    sync()
    result = clock.summary(started)
    result.update({
        "variant": variant, "device": device, "dtype": str(dtype).removeprefix("torch."), "losses": clock.losses,
        "peak_rss_mib": memory.peak_mib(), "rss_before_mib": memory.start_mib(),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "torch_threads": torch.get_num_threads(),
    })
    return result


def _preimport(variant: str) -> None:
    """Imports before the memory mark, so peak memory is the work's, not the libraries'."""
    import peft  # noqa: F401
    import transformers  # noqa: F401

    if variant == "trainer":
        from transformers import Trainer  # noqa: F401


def _run_ours(model_dir: str, rows, training, clock: Clock) -> None:
    from training.finetune import finetune

    with tempfile.TemporaryDirectory(prefix="bench-ours-") as out:
        finetune(base_model_path=model_dir, rows=rows, training=training, output_dir=Path(out),
                 on_step=lambda info: clock.mark(info.tokens, loss=info.loss))


def _run_trainer(model_dir: str, rows, training, clock: Clock, *, device: str, weights_dtype, bf16: bool) -> None:
    """The script the Transformers/PEFT docs lead to: Trainer, padding to max_length, loss on the whole sequence."""
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from training.data import format_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [format_prompt(question=r["question"], context=r["context"]) + r["answer"].strip() + tokenizer.eos_token for r in rows]
    encoded = tokenizer(texts, truncation=True, max_length=training["max_seq_length"], padding="max_length")
    dataset = [{"input_ids": ids, "attention_mask": mask} for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)  # labels = input_ids, padding -> -100
    batch_tokens: list[int] = []

    def counting_collator(features):
        batch = collator(features)
        batch_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=weights_dtype)  # CPU bf16: float32 weights + autocast, as ours
    lora = training["lora"]
    model = get_peft_model(model, LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=lora["target_modules"],
        task_type="CAUSAL_LM", bias="none",
    ))
    if training["gradient_checkpointing"]:
        model.enable_input_require_grads()

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            last = state.global_step in (1, state.max_steps)
            clock.mark(sum(batch_tokens[: state.global_step * training["gradient_accumulation_steps"]]), synchronize=last)

    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as out:
        arguments = TrainingArguments(
            output_dir=out, per_device_train_batch_size=training["batch_size"], num_train_epochs=training["epochs"],
            gradient_accumulation_steps=training["gradient_accumulation_steps"],
            gradient_checkpointing=training["gradient_checkpointing"],
            learning_rate=training["learning_rate"], weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=0,
            logging_steps=10, save_strategy="no", report_to="none", seed=SEED, disable_tqdm=True,
            bf16=bf16, use_cpu=device == "cpu",
        )
        Trainer(model=model, args=arguments, train_dataset=dataset, data_collator=counting_collator, callbacks=[StepClock()]).train()


def _run_minimal(model_dir: str, rows, training, clock: Clock, *, device: str, weights_dtype, autocast_dtype) -> None:
    """Our batches through a bare loop: forward, the same loss, backward, AdamW. Nothing else."""
    import torch
    from transformers import set_seed

    from training.data import collate, iter_batches
    from training.finetune import causal_lm_loss, encode_rows, first_logit_needed, load_base_model, load_tokenizer, make_lora_model
    from training.precision import training_autocast

    set_seed(SEED)
    tokenizer = load_tokenizer(model_dir)
    model = load_base_model(model_dir, device=device, dtype=weights_dtype)
    examples = encode_rows(tokenizer, rows, training["max_seq_length"])
    model = make_lora_model(model, training["lora"], gradient_checkpointing=training["gradient_checkpointing"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=training["learning_rate"], weight_decay=0.0,
                                  fused=device == "cuda")
    model.train()
    pad_multiple = 8 if device == "cuda" else None
    tokens, steps = 0, 0
    total_steps = training["epochs"] * -(-len(examples) // training["batch_size"])
    for epoch in range(training["epochs"]):
        for batch_examples in iter_batches(examples, batch_size=training["batch_size"], seed=SEED, epoch=epoch):
            batch = collate(batch_examples, pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=pad_multiple)
            first_logit = first_logit_needed(batch["labels"])
            batch = {k: v.to(device) for k, v in batch.items()}
            with training_autocast(device, autocast_dtype):
                loss = causal_lm_loss(model, batch, first_logit=first_logit)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += sum(e.n_tokens for e in batch_examples)
            steps += 1
            clock.mark(tokens, synchronize=steps in (1, total_steps))


# --- the parent: run every variant, compare -------------------------------------------------

def child_command(variant: str, args: argparse.Namespace, out: Path) -> list[str]:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--child-json", str(out),
        "--model-dir", str(args.model_dir), "--rows", str(args.rows), "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size), "--max-seq-length", str(args.max_seq_length),
        "--accumulation", str(args.accumulation), "--lora-dropout", str(args.lora_dropout), "--precision", args.precision,
    ]
    if args.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    return command


def run_child(variant: str, args: argparse.Namespace, env: dict[str, str], **overrides: Any) -> dict[str, Any]:
    child_args = argparse.Namespace(**{**vars(args), **overrides})
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run(child_command(variant, child_args, out), env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def best(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the highest throughput: on a noisy machine, the least disturbed one."""
    return max(results, key=lambda r: r["tokens_per_second"] or 0)


REAL_MODEL = "smollm2-135m-instruct"
FP32_REFERENCE = "precision_fp32"


def model_dir_for(name: str, init: str) -> Path:
    """small-llama (random or pre-trained weights, see ensure_model) or a local: model, built on first use."""
    if name == "small-llama":
        return ensure_model(init)
    from training.local_models import build_local_model

    return build_local_model(name, models_dir=ROOT / "var" / "models", data_dir=ROOT / "data")


def bench_model(args: argparse.Namespace, env: dict[str, str], *, cuda: bool, peaks: dict[str, float] | None) -> dict[str, Any]:
    """Every variant on args.model_dir, interleaved rounds, the knobs; the report of one model."""
    started = time.monotonic()
    print(f"bench 1, training: model {args.model_dir.name}, {args.rows or 'all'} rows x {args.epochs} epoch(s), batch {args.batch_size}, "
          f"max_seq_length {args.max_seq_length}, LoRA r={LORA['r']} alpha={LORA['alpha']} dropout={args.lora_dropout} all-linear, "
          f"precision {args.precision}, {'cuda' if cuda else 'cpu'}, {args.rounds} interleaved round(s)", flush=True)

    rounds: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for number in range(args.rounds):
        for variant in VARIANTS:
            result = run_child(variant, args, env)
            rounds[variant].append(result)
            print(f"  round {number + 1} {variant:8s} {result['tokens_per_second']:>9} tok/s  {result['seconds_total']:>8}s  "
                  f"peak rss {result['peak_rss_mib']} MiB  peak gpu {result['peak_gpu_mib']} MiB  ({result['dtype']})", flush=True)
    ours, trainer, minimal = (best(rounds[v]) for v in VARIANTS)
    memory_key = "peak_gpu_mib" if cuda else "peak_rss_mib"
    report: dict[str, Any] = {
        "device": ours["device"], "gpu": ours["gpu"], "dtype": ours["dtype"], "model": args.model_dir.name, "init": args.init,
        "precision": args.precision,
        "rows": args.rows or "all", "epochs": args.epochs, "batch_size": args.batch_size, "max_seq_length": args.max_seq_length,
        "lora": dict(LORA, dropout=args.lora_dropout), "steps": ours["steps"],
        "real_tokens": {"ours": ours["real_tokens"], "trainer": trainer["real_tokens"], "minimal": minimal["real_tokens"]},
        "tokens_per_second": {"ours": ours["tokens_per_second"], "trainer": trainer["tokens_per_second"], "minimal": minimal["tokens_per_second"]},
        "seconds_total": {"ours": ours["seconds_total"], "trainer": trainer["seconds_total"], "minimal": minimal["seconds_total"]},
        "peak_memory_mib": {"kind": "gpu max_memory_allocated" if cuda else "process peak RSS (VmHWM)",
                            "ours": ours[memory_key], "trainer": trainer[memory_key], "minimal": minimal[memory_key]},
        "ratio_vs_trainer": ratio(ours["tokens_per_second"], trainer["tokens_per_second"]),
        "ratio_vs_minimal_loop": ratio(minimal["seconds_per_step"], ours["seconds_per_step"]),
        "rounds": rounds,
    }
    report["memory_ok"] = (ours[memory_key] or 0) <= (trainer[memory_key] or 0)
    report["targets"] = {
        "ratio_vs_trainer": verdict(report["ratio_vs_trainer"], 1.5) + ("" if report["memory_ok"] else ", but peak memory is higher"),
        "ratio_vs_minimal_loop": verdict(report["ratio_vs_minimal_loop"], 0.9),
    }
    if peaks and ours["tokens_per_second"]:
        per_token = 4 * linear_weights(args.model_dir)  # forward 2N + input gradients 2N (frozen weights: no weight gradient)
        achieved = ours["tokens_per_second"] * per_token / 1e9
        report["hardware"] = {"matmul_peak_gflops": peaks, "flops_per_token_lower_bound": per_token, "ours_gflops": round(achieved, 1),
                              "fraction_of_bf16_peak": round(achieved / peaks["bfloat16"], 3),
                              "fraction_of_fp32_peak": round(achieved / peaks["float32"], 3)}

    knobs = {}
    if args.knobs:
        knobs.update({
            "gradient_checkpointing": {"gradient_checkpointing": True},
            "accumulation_2_x_half_batch": {"accumulation": 2, "batch_size": max(1, args.batch_size // 2)},
            "lora_dropout_0": {"lora_dropout": 0.0},
        })
    if ours["dtype"] == "bfloat16" and not cuda:  # the float32 it replaced, and how far its losses move
        knobs[FP32_REFERENCE] = {"precision": "fp32"}
    if knobs:
        report["knobs"] = {}
        for name, overrides in knobs.items():
            results = [run_child("ours", args, env, **overrides) for _ in range(args.rounds)]
            result = best(results)
            entry = {"tokens_per_second": result["tokens_per_second"], "peak_memory_mib": result[memory_key],
                     "vs_default_speed": ratio(result["tokens_per_second"], ours["tokens_per_second"]),
                     "vs_default_memory": ratio(result[memory_key], ours[memory_key])}
            if name == FP32_REFERENCE:
                pairs = list(zip(ours["losses"], result["losses"], strict=True))
                entry["bf16_speedup"] = ratio(ours["tokens_per_second"], result["tokens_per_second"])
                entry["largest_relative_loss_difference"] = round(max(abs(a - b) / abs(b) for a, b in pairs), 5) if pairs else None
                entry["losses"] = {"bfloat16": ours["losses"], "float32": result["losses"]}
            report["knobs"][name] = entry
            print(f"  knob {name:28s} {result['tokens_per_second']:>9} tok/s  peak {result[memory_key]} MiB", flush=True)
    report["bench_seconds"] = round(time.monotonic() - started, 1)

    memory_label = "peak GPU MiB" if cuda else "peak RSS MiB"
    print_table(f"training throughput, {args.model_dir.name} (non-padding tokens/s, steady state, {ours['dtype']})", [
        ["ours (finetune.py)", ours["real_tokens"], ours["tokens_per_second"], ours["seconds_total"], ours[memory_key], "1.00"],
        ["Trainer, pad to max_length", trainer["real_tokens"], trainer["tokens_per_second"], trainer["seconds_total"], trainer[memory_key],
         report["ratio_vs_trainer"]],
        ["minimal loop, our batches", minimal["real_tokens"], minimal["tokens_per_second"], minimal["seconds_total"], minimal[memory_key],
         ratio(ours["tokens_per_second"], minimal["tokens_per_second"])],
    ], ["variant", "real tokens", "tokens/s", "wall s", memory_label, "ours / this"])
    print(f"  ours vs Trainer: {report['ratio_vs_trainer']}x tokens/s, peak memory {ours[memory_key]} vs {trainer[memory_key]} MiB "
          f"-> {report['targets']['ratio_vs_trainer']}")
    print(f"  ours vs minimal loop (time per step, minimal / ours): {report['ratio_vs_minimal_loop']} -> {report['targets']['ratio_vs_minimal_loop']}")
    if hw := report.get("hardware"):
        print(f"  ours: >= {hw['ours_gflops']} GFLOP/s = {hw['fraction_of_bf16_peak']:.1%} of this machine's bf16 matmul peak "
              f"({peaks['bfloat16']} GFLOP/s; float32 peak {peaks['float32']})")
    if ref := report.get("knobs", {}).get(FP32_REFERENCE):
        print(f"  bf16 vs float32 (ours): {ref['bf16_speedup']}x tokens/s, losses within {ref['largest_relative_loss_difference']:.2%} (relative)")
    return report


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description="LoRA training throughput: ours vs Trainer vs a minimal loop")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--models", default=f"small-llama,{REAL_MODEL}",
                        help=f"comma-separated: small-llama (see --init) and/or local models such as {REAL_MODEL}")
    parser.add_argument("--init", choices=["random", "pretrained"], default="random",
                        help="small-llama weights: random init (default; throughput does not depend on them) or the pre-trained build")
    parser.add_argument("--model-dir", type=Path, default=None, help="one model folder instead of --models")
    parser.add_argument("--rows", type=int, default=None, help="train rows per epoch (default on CPU 48, 32 for the real model; all 592 on CUDA)")
    parser.add_argument("--epochs", type=int, default=None, help="default 1 on CPU, 3 on CUDA")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="as training.precision (training/precision.py)")
    parser.add_argument("--accumulation", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--lora-dropout", type=float, default=LORA["dropout"])
    parser.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2, help="each variant runs this many times, interleaved; the best round counts")
    parser.add_argument("--knobs", action="store_true", help="also measure gradient checkpointing, accumulation and lora dropout 0 (first model)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.variant:  # a child: one variant, result to --child-json
        args.child_json.write_text(json.dumps(run_variant(args.variant, args)))
        return None

    env = dict(os.environ)
    # Large blocks always mmap'ed, so freed activations leave the process and the
    # peak RSS measures live memory rather than glibc's heap slack (all variants alike).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    cuda = args.device != "cpu" and torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: no CUDA device here")
    started = time.monotonic()
    peaks = None if cuda else matmul_peaks()
    if peaks:
        print(f"bench 1: this machine's 2048x2048 matmul: float32 {peaks['float32']} GFLOP/s, bfloat16 {peaks['bfloat16']} GFLOP/s "
              f"({torch.get_num_threads()} threads)", flush=True)
    targets = [(args.model_dir.name, args.model_dir)] if args.model_dir else [(m, None) for m in args.models.split(",") if m]
    models: dict[str, Any] = {}
    for number, (name, folder) in enumerate(targets):
        run_args = argparse.Namespace(**vars(args))
        run_args.model_dir = folder or model_dir_for(name, args.init)
        run_args.rows = args.rows if args.rows is not None else (0 if cuda else 32 if name == REAL_MODEL else 48)
        run_args.epochs = args.epochs or (3 if cuda else 1)
        run_args.knobs = args.knobs and number == 0
        models[name] = bench_model(run_args, env, cuda=cuda, peaks=peaks)
    first = next(iter(models.values()))
    # The first model's figures stay at the top level (earlier records and readers); every model under "models".
    report = {**first, "models": models, "bench_seconds": round(time.monotonic() - started, 1)}
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
