"""GPU smoke test: a short LoRA fine-tune and batched generation on CUDA with bf16.

Runs without Django (the device machine has PyTorch, Transformers and PEFT but
not the web stack): it builds an offline `local:` model from the bundled data,
fine-tunes it with the platform's own loop (training/finetune.py) and generates
with the platform's own batched generation (evaluation/generation.py), then
prints throughput and peak GPU memory as JSON.

    python3 scripts/gpu_smoke.py [--model small-llama] [--steps 60] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small-llama", help="local model spec to build (training/tiny_model.py SPECS)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--allow-cpu", action="store_true", help="run the same flow on CPU (to check the script itself)")
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("no CUDA device: this smoke test needs a GPU", file=sys.stderr)
        return 2

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def reset_peak() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_mib() -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None

    from evaluation.generation import encode_eval_prompts, generate_answers
    from training.finetune import finetune, load_base_model, load_tokenizer
    from training.precision import pick_device
    from training.tiny_model import build_tiny_model

    device, dtype = pick_device("auto")
    report: dict = {"gpu": torch.cuda.get_device_name(0) if cuda else "none (CPU check)", "torch": torch.__version__, "device": device, "dtype": str(dtype)}
    work = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    started = time.monotonic()
    model_dir = build_tiny_model(args.model, models_dir=work / "models", data_dir=ROOT / "data")
    report["build_seconds"] = round(time.monotonic() - started, 1)

    rows = [r for path in sorted((ROOT / "data" / "train").glob("*.jsonl")) for r in read_jsonl(path)]
    training = {
        "epochs": 100, "learning_rate": 1e-3, "batch_size": args.batch_size, "max_seq_length": 512, "seed": 42,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "gradient_accumulation_steps": 1, "gradient_checkpointing": False, "warmup_ratio": 0.0,
        "max_steps": args.steps, "precision": "auto",
    }
    reset_peak()
    outcome = finetune(base_model_path=str(model_dir), rows=rows, training=training, output_dir=work / "run")
    sync()
    report["train"] = {
        "steps": outcome.steps, "non_padding_tokens": outcome.tokens, "seconds": round(outcome.seconds, 2),
        "tokens_per_second": round(outcome.tokens / outcome.seconds), "final_loss": round(outcome.final_loss, 4),
        "dtype": outcome.dtype, "peak_memory_mib": peak_mib(),
        "trainable_parameters": outcome.trainable_parameters, "total_parameters": outcome.total_parameters,
    }

    from peft import PeftModel

    tokenizer = load_tokenizer(str(model_dir))
    model = PeftModel.from_pretrained(load_base_model(str(model_dir), device=device, dtype=dtype), str(outcome.adapter_dir))
    eval_rows = read_jsonl(ROOT / "data" / "eval" / "ragas_eval.jsonl")
    prompts = encode_eval_prompts(tokenizer, eval_rows, max_prompt_tokens=448)
    reset_peak()
    generate_answers(model, tokenizer, prompts[:8], batch_size=8, max_new_tokens=8)  # warm-up
    sync()
    t0 = time.monotonic()
    answers = generate_answers(model, tokenizer, prompts, batch_size=args.batch_size, max_new_tokens=64)
    sync()
    seconds = time.monotonic() - t0
    report["generate"] = {
        "answers": len(answers), "seconds": round(seconds, 2), "answers_per_second": round(len(answers) / seconds, 1),
        "peak_memory_mib": peak_mib(), "example": answers[0][:120],
    }
    report["total_seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
