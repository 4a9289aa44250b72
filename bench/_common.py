"""Small helpers shared by the benchmarks: paths, timing statistics, peak memory, reports.

Nothing here imports Django or torch, so bench_training.py can run on a machine
that has only PyTorch, Transformers and PEFT (the GPU box).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Offline, quiet, and no tokenizer thread pools fighting torch for the two cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("RAGAS_DO_NOT_TRACK", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


class PeakRss:
    """Peak resident memory of this process from `reset()` on (Linux: VmHWM after clear_refs).

    Writing 5 to /proc/self/clear_refs resets the high-water mark, so the peak
    covers only the measured work, not imports done before it.
    """

    def __init__(self) -> None:
        self.reset()

    @staticmethod
    def _status_kib(field: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        self.start_kib = self._status_kib("VmRSS") or 0

    def peak_mib(self) -> float | None:
        peak = self._status_kib("VmHWM")
        if peak is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / 1024, 1)

    def start_mib(self) -> float:
        return round(self.start_kib / 1024, 1)


def ratio(numerator: float | None, denominator: float | None, digits: int = 2) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, digits)


def verdict(value: float | None, target: float, *, at_least: bool = True) -> str:
    if value is None:
        return "not measured"
    met = value >= target if at_least else value <= target
    return f"{'MET' if met else 'NOT MET'} (target {'>=' if at_least else '<='} {target:g})"


def print_table(title: str, rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n== {title}")
    for number, row in enumerate(cells):
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if number == 0:
            print("  " + "  ".join("-" * width for width in widths))


def write_json(path: Path | None, report: dict[str, Any]) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def matmul_peaks(seconds: float = 1.0, n: int = 2048) -> dict[str, float]:
    """This machine's n x n matmul GFLOP/s in float32 and bfloat16 (all torch threads), measured in this run:
    the hardware limit the benchmarks' figures are set against."""
    import torch

    peaks = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        reps, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            a @ b
            reps += 1
        peaks[name] = round(2 * n**3 * reps / (time.perf_counter() - started) / 1e9, 1)
    return peaks


def linear_weights(model_dir: Path) -> int:
    """The decoder's matmul weights (every nn.Linear but the lm_head): 2x this is the forward FLOPs per token,
    attention scores, the lm_head and norms left out, so FLOP rates built on it are lower bounds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    head = model.get_output_embeddings()
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
