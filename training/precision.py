"""Where a model runs and in which number format: the one rule behind `training.precision`.

`auto` picks bfloat16 where it is measured to win and float32 elsewhere:

- a CUDA GPU that supports bf16: bf16 weights and compute;
- a CPU with native bf16 instructions (`amx_bf16` or `avx512_bf16` in
  /proc/cpuinfo: Sapphire Rapids and later Xeons, AMD Zen 4 and later) and a
  model wide enough that the bf16 matrix multiplies pay for the casts around
  them (`hidden_size >= CPU_BF16_MIN_HIDDEN`);
- float32 otherwise (CPUs without those instructions emulate bf16 and run
  20-80x slower; tiny models lose to the casts).

Measured on a 2-core AMD EPYC with avx512_bf16 (bench/README.md, "bf16 on
CPU"): matmuls 4.3x float32; SmolLM2-135M (hidden 576) LoRA training 1.7x and
batched generation 2.2x; small-llama (hidden 384) training 1.7x; tiny-llama
(hidden 128) 0.95x training and 0.78x generation, so it stays in float32.

On a CPU, training keeps float32 weights and runs the forward pass under bf16
autocast (`training_autocast`): measured faster than bf16 weights there (187 vs
151 tokens/s on SmolLM2: autocast keeps the element-wise work in float32) with
the same losses to bf16 precision. Generation loads bf16 weights: autocast
would cast every weight again at each of the 64 decoding steps.

`bf16` asks for bf16 on any device (slow on CPUs without native bf16);
`fp32` forces float32 everywhere.
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


def pick_device(precision: str = "auto", model_path: str | Path | None = None) -> tuple[str, Any]:
    """(device, dtype) for `precision` (auto, bf16, fp32) and the model at model_path (see the module docstring)."""
    import torch

    if torch.cuda.is_available():
        if precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
            return "cuda", torch.bfloat16
        return "cuda", torch.float32
    if precision == "bf16" or (precision == "auto" and cpu_bf16_wins(model_path)):
        return "cpu", torch.bfloat16
    return "cpu", torch.float32


def training_dtypes(device: str, dtype) -> tuple[Any, Any]:
    """(weights dtype, autocast dtype or None) for training: on a CPU, bf16 is float32 weights under bf16 autocast."""
    import torch

    if device == "cpu" and dtype == torch.bfloat16:
        return torch.float32, torch.bfloat16
    return dtype, None


def training_autocast(device: str, autocast_dtype) -> contextlib.AbstractContextManager:
    """The forward pass's autocast for training_dtypes()'s second value (a no-op for None)."""
    if autocast_dtype is None:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type=device, dtype=autocast_dtype)
