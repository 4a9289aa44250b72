#!/usr/bin/env bash
# GPU smoke: a short bf16 LoRA fine-tune and batched generation on CUDA, printing
# tokens/s and peak GPU memory. Needs a CUDA machine with PyTorch, Transformers,
# PEFT and tokenizers (the worker image, or the device machine's python3).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
PYTHONUNBUFFERED=1 python3 scripts/gpu_smoke.py "$@"
