"""Where a model runs and in which number format: the one rule behind `training.precision`.

`auto` picks bfloat16 where it is measured to win without changing answers:

- a CUDA GPU that supports bf16: bf16 weights and compute, for training and generation;
- training on a CPU with native bf16 instructions (`amx_bf16` or
  `avx512_bf16` in /proc/cpuinfo: Sapphire Rapids and later Xeons, AMD Zen 4
  and later) and a model wide enough that the bf16 matrix multiplies pay for
  the casts around them (`hidden_size >= CPU_BF16_MIN_HIDDEN`): float32
  weights, the forward pass under bf16 autocast (`training_precision`);
- float32 otherwise, and for generation on every CPU (`pick_device`).

Measured on a 2-core AMD EPYC with avx512_bf16 (bench/README.md, "bf16 on
CPU"): matmuls 4.3x float32; LoRA training 1.7-2.1x on SmolLM2-135M (hidden
576) and small-llama (384), losses within 1.4% of float32; 0.95x on tiny-llama
(128), which stays in float32. Autocast beat bf16 weights for training (187 vs
151 tokens/s on SmolLM2: the element-wise work stays in float32).

Generation stays float32 on a CPU under `auto`: bf16 weights generate 2.0-2.2x
faster, but greedy answers then depend on the batch they are generated in (7
of 16 SmolLM2 answers identical batched vs one at a time, where float32 gives
16 of 16) and differ from float32's (ROUGE-L 0.84 on average), so a run's
answers would change with evaluation.batch_size. `bf16` asks for it anyway,
on any device (slow on CPUs without native bf16); `fp32` forces float32
everywhere.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

CPU_BF16_MIN_HIDDEN = 256
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX-512 BF16)."""
    try:
        flags = {
            flag for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()
        }
    except OSError:  # not Linux: no way to tell, stay in float32
        return False
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def model_hidden_size(model_path: str | Path | None) -> int | None:
    """hidden_size from the model's config (local folder or cached hub model), None when unknown."""
    if model_path is None:
        return None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model_path))
    except (OSError, ValueError):
        return None
    size = getattr(config, "hidden_size", None)
    return int(size) if isinstance(size, int) else None


def cpu_bf16_wins(model_path: str | Path | None) -> bool:
    hidden = model_hidden_size(model_path)
    return cpu_native_bf16() and hidden is not None and hidden >= CPU_BF16_MIN_HIDDEN


def pick_device(precision: str = "auto") -> tuple[str, Any]:
    """(device, dtype) to load a model in for generation (the module docstring says why a CPU stays in float32 under auto)."""
    import torch

    if torch.cuda.is_available():
        if precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
            return "cuda", torch.bfloat16
        return "cuda", torch.float32
    return "cpu", torch.bfloat16 if precision == "bf16" else torch.float32


def training_precision(precision: str = "auto", model_path: str | Path | None = None) -> tuple[str, Any, Any]:
    """(device, weights dtype, autocast dtype or None) for fine-tuning the model at model_path."""
    import torch

    if torch.cuda.is_available():
        device, dtype = pick_device(precision)
        return device, dtype, None
    if precision == "bf16" or (precision == "auto" and cpu_bf16_wins(model_path)):
        return "cpu", torch.float32, torch.bfloat16
    return "cpu", torch.float32, None


def training_autocast(device: str, autocast_dtype) -> contextlib.AbstractContextManager:
    """The forward pass's autocast for training_precision()'s third value (a no-op for None)."""
    if autocast_dtype is None:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type=device, dtype=autocast_dtype)
