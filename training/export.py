"""Take the model home: the LoRA adapter merged into its base, and a GGUF of the merged weights.

Free of Django (the export job, the benchmark and the command call it with plain paths):

- `merge_adapter` loads the base in float32, applies the adapter, merges it
  (PEFT's merge_and_unload: W + scale * B @ A, computed in float32), casts to the
  base's own dtype and saves a Transformers folder: safetensors, config, the
  tokenizer with its chat template, and generation settings that decode as the
  run did (greedy, its max_new_tokens, its stop tokens).
- `write_gguf` writes that folder as a GGUF file with the `gguf` library's
  GGUFWriter, for the Llama family (what the platform's model builders produce:
  SmolLM2, the tiny models). Our own writer: the tensor names, the rotary
  layout of q/k and the tokenizer metadata are written here from the folder's
  config and tokenizer.json. Any other architecture raises `GGUFNotSupported`
  ("GGUF export is not supported for <architecture>"); the merged folder stands.

Nothing appears half-written: each output is written under a temporary name in
its destination folder, flushed to disk, then renamed into place (a rename is
atomic on one filesystem). A disk that fills up, or a process killed mid-write,
leaves at most a `.partial` name that `sweep_partials` removes and nothing refers to.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GGUF_TYPES = ("f16", "q8_0")
PARTIAL = ".partial"
# A file the export adds to the merged folder: where the weights came from and how the run asked the model.
EXPORT_INFO = "platform_export.json"
Progress = Callable[[float, str], None]


class GGUFNotSupported(ValueError):
    """The model's architecture (or a feature of it) has no GGUF writer here."""


class ExportWriteError(OSError):
    """An output could not be written (a full disk, a folder that is not writable); nothing of it was left behind."""


def _write_error(what: str, target: Path, exc: BaseException) -> ExportWriteError:
    import re

    text = getattr(exc, "strerror", None) or str(exc)
    found = re.search(r"os error (\d+)", str(exc))
    if found:  # safetensors reports the OS error in its message
        text = os.strerror(int(found.group(1)))
    elif getattr(exc, "errno", None) is None:  # numpy's tofile reports a short write without errno
        with contextlib.suppress(OSError):
            if shutil.disk_usage(target.parent).free < 1 << 20:
                text = f"No space left on device ({text})"
    return ExportWriteError(f"cannot write {what} to {target}: {text}")


@dataclass(frozen=True)
class Merged:
    folder: Path
    dtype: str  # what the weights were saved in: the base's dtype
    bytes: int  # on disk
    seconds: float


@dataclass(frozen=True)
class GGUFWritten:
    path: Path
    quantization: str
    bytes: int
    seconds: float
    tensor_types: dict[str, int]  # GGML type name -> how many tensors


# --- files written whole, or not at all


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _staging_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}{PARTIAL}")


def _replace_dir(staging: Path, target: Path) -> None:
    """`staging` becomes `target` in one rename; an older `target` (an earlier attempt's) goes after."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}{PARTIAL}")
        os.replace(target, old)
    os.replace(staging, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sweep_partials(folder: Path) -> list[Path]:
    """Remove what a killed or failed export left half-written under `folder`; returns what went."""
    gone = []
    if folder.is_dir():
        for path in folder.rglob(f"*{PARTIAL}"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            gone.append(path)
    return gone


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --- merge


def _torch_dtype_name(config) -> str:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return str(dtype).removeprefix("torch.")


def merge_adapter(
    base_path: str | Path, adapter_dir: str | Path, target: Path, *, generation: dict[str, Any], info: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> Merged:
    """The adapter merged into the base in float32, saved in the base's dtype as a Transformers folder at `target`.

    generation: {"prompt_format", "max_new_tokens"} of the run: the folder's
    generation_config decodes as the run did (greedy, that many tokens, the
    prompt format's stop tokens). info: written to platform_export.json.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from .data import resolve_prompt_format, stop_token_ids
    from .finetune import load_tokenizer

    started = time.monotonic()
    report = progress or (lambda fraction, stage: None)
    report(0.0, "loading the base model in float32")
    base_config = AutoConfig.from_pretrained(str(base_path))
    dtype_name = _torch_dtype_name(base_config)
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    tokenizer = load_tokenizer(str(base_path))
    report(0.3, "merging the adapter in float32")
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload(safe_merge=True)
    target_dtype = getattr(torch, dtype_name, torch.float32)
    model = model.to(target_dtype)
    model.config.architectures = [type(model).__name__]
    fmt = resolve_prompt_format(tokenizer, generation.get("prompt_format", "auto"))
    stops = stop_token_ids(tokenizer, fmt)
    try:
        generation_config = GenerationConfig.from_pretrained(str(base_path))
    except OSError:
        generation_config = GenerationConfig.from_model_config(model.config)
    generation_config.do_sample = False
    generation_config.max_new_tokens = int(generation.get("max_new_tokens", 64))
    generation_config.eos_token_id = stops if len(stops) > 1 else (stops[0] if stops else generation_config.eos_token_id)
    generation_config.pad_token_id = tokenizer.pad_token_id
    for unused in ("temperature", "top_p", "top_k"):  # greedy: sampling options would only draw warnings
        setattr(generation_config, unused, None)
    model.generation_config = generation_config

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_name(target)
    try:
        report(0.6, f"saving the merged weights ({dtype_name}, safetensors)")
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / EXPORT_INFO).write_text(json.dumps({**(info or {}), "prompt_format": fmt, "dtype": dtype_name,
                                                       "max_new_tokens": generation_config.max_new_tokens}, indent=2))
        _fsync_tree(staging)
        _replace_dir(staging, target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, Exception) and (isinstance(exc, OSError) or "os error" in str(exc)):
            raise _write_error("the merged weights", target, exc) from exc
        raise
    report(1.0, "merged")
    return Merged(folder=target, dtype=dtype_name, bytes=folder_bytes(target), seconds=time.monotonic() - started)


# --- GGUF, for the Llama family


# Transformers' Llama parameter -> the GGUF tensor of the same role (per layer under "blk.N.").
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


def gguf_support(config) -> str:
    """"" when write_gguf can write this model, else why not (the message the export shows)."""
    architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    if architecture not in SUPPORTED_ARCHITECTURES or getattr(config, "model_type", "") != "llama":
        return f"GGUF export is not supported for {architecture}"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        return f"GGUF export is not supported for {architecture} with rope scaling {rope_type!r}"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return f"GGUF export is not supported for {architecture} with attention or MLP biases"
    return ""


def rotary_to_interleaved(weight, n_head: int):
    """q/k projection rows from Transformers' rotary layout to GGUF's.

    Transformers rotates each head's first half against its second half
    (rotate_half); GGUF's Llama rotates adjacent pairs (0,1), (2,3), ... So each
    head's rows [x0..x(d/2-1), y0..y(d/2-1)] are written interleaved as
    [x0, y0, x1, y1, ...]; a reader undoes it (Transformers' GGUF loader does).
    """
    rows = weight.shape[0]
    half = rows // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tokenizer_metadata(folder: Path) -> dict[str, Any]:
    """Vocabulary, merges, token types, special ids and the chat template, from the folder's tokenizer."""
    from transformers import AutoTokenizer

    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec["model"]
    pre = spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or spec.get("normalizer"):
        raise GGUFNotSupported(
            "GGUF export is not supported for this tokenizer: only byte-level BPE with the GPT-2 split "
            f"(model {model.get('type')}, pre-tokenizer {pre.get('type')}, normalizer {(spec.get('normalizer') or {}).get('type')})"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["content"]: a for a in spec.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED where no token has the id
    for content, index in vocab.items():
        tokens[index] = content
        token = added.get(content)
        types[index] = 1 if token is None else (3 if token.get("special") else 4)  # NORMAL, CONTROL, USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    probe = tokenizer("a")["input_ids"]
    return {
        "tokens": tokens, "types": types, "merges": merges,
        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id,
        "add_bos": bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id,
        "add_eos": bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id and len(probe) > 1,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


def _tensor_plan(name: str, array, quantization: str):
    """(data, raw GGML type or None) for one tensor: 1-D ones (norms) stay float32; matrices in the asked type.

    Q8_0 quantises rows in blocks of 32 values; a matrix whose rows are not a
    multiple of 32 is written in F16 instead (counted in the result).
    """
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if array.ndim == 1:
        return array.astype(np.float32), None
    if quantization == "q8_0" and array.shape[-1] % 32 == 0:
        return quantize(array.astype(np.float32), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


def write_gguf(folder: Path, target: Path, *, quantization: str, name: str = "", progress: Progress | None = None) -> GGUFWritten:
    """The merged Transformers folder as one GGUF file at `target` (f16 or q8_0), written whole or not at all."""
    import numpy as np
    from gguf import GGUFWriter, LlamaFileType
    from gguf.constants import GGML_QUANT_VERSION
    from safetensors import safe_open
    from transformers import AutoConfig

    if quantization not in GGUF_TYPES:
        raise ValueError(f"gguf must be one of {', '.join(GGUF_TYPES)}, got {quantization!r}")
    started = time.monotonic()
    report = progress or (lambda fraction, stage: None)
    config = AutoConfig.from_pretrained(str(folder))
    why = gguf_support(config)
    if why:
        raise GGUFNotSupported(why)
    vocab = _tokenizer_metadata(folder)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = getattr(config, "rope_parameters", None) or {}
    rope_theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_name(target)
    writer = GGUFWriter(str(staging), "llama")
    try:
        writer.add_name(name or folder.name)
        writer.add_file_type(LlamaFileType.MOSTLY_Q8_0 if quantization == "q8_0" else LlamaFileType.MOSTLY_F16)
        writer.add_quantization_version(GGML_QUANT_VERSION)
        writer.add_vocab_size(len(vocab["tokens"]))
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(rope_theta)
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt2")  # the GPT-2 split, what the folder's byte-level pre-tokenizer does
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        writer.add_token_merges(vocab["merges"])
        for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id), ("unk", writer.add_unk_token_id),
                         ("pad", writer.add_pad_token_id)):
            if vocab[key] is not None:
                add(int(vocab[key]))
        writer.add_add_bos_token(vocab["add_bos"])
        writer.add_add_eos_token(vocab["add_eos"])
        writer.add_bool("tokenizer.ggml.add_space_prefix", False)
        if vocab["chat_template"]:
            writer.add_chat_template(vocab["chat_template"])

        counts: dict[str, int] = {}
        files = sorted(folder.glob("*.safetensors"))
        names: list[tuple[Path, str]] = []
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                names += [(path, key) for key in handle.keys()]
        tied = getattr(config, "tie_word_embeddings", False)
        for number, (path, key) in enumerate(names):
            with safe_open(str(path), framework="pt") as handle:
                array = handle.get_tensor(key).float().numpy()
            gguf_name = _gguf_name(key)
            if gguf_name is None or (tied and gguf_name == "output.weight"):
                continue
            if gguf_name.endswith("attn_q.weight"):
                array = rotary_to_interleaved(array, n_head)
            elif gguf_name.endswith("attn_k.weight"):
                array = rotary_to_interleaved(array, n_kv)
            data, raw = _tensor_plan(gguf_name, np.ascontiguousarray(array), quantization)
            writer.add_tensor(gguf_name, data, raw_dtype=raw)
            kind = raw.name if raw is not None else ("F32" if data.dtype == np.float32 else "F16")
            counts[kind] = counts.get(kind, 0) + 1
            report(0.8 * (number + 1) / len(names), f"GGUF {quantization}: {gguf_name}")
        report(0.85, f"writing GGUF {quantization}")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.fout[0].flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        os.replace(staging, target)
        _fsync_dir(target.parent)
    except BaseException as exc:
        # Described before the partial file goes (a full disk is not full any more after it).
        error = _write_error(f"the GGUF {quantization}", target, exc) if isinstance(exc, OSError) else None
        writer.close()
        staging.unlink(missing_ok=True)
        if error is not None:
            raise error from exc
        raise
    report(1.0, f"GGUF {quantization} written")
    return GGUFWritten(path=target, quantization=quantization, bytes=target.stat().st_size, seconds=time.monotonic() - started,
                       tensor_types=counts)


def _gguf_name(key: str) -> str | None:
    if key in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[key]
    if key.startswith("model.layers."):
        layer, rest = key.removeprefix("model.layers.").split(".", 1)
        if rest in LAYER_TENSORS:
            return f"blk.{int(layer)}.{LAYER_TENSORS[rest]}"
    if key.endswith("rotary_emb.inv_freq"):
        return None
    raise GGUFNotSupported(f"GGUF export is not supported for a Llama model with the tensor {key!r}")


def gguf_file_name(quantization: str) -> str:
    return f"model-{quantization}.gguf"


# --- the merged folder as one archive, streamed (never written twice to disk)

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE


def archive_chunks(folder: Path, *, root: str = "merged", chunk: int = 1 << 20) -> Iterator[bytes]:
    """A deterministic tar of `folder` (sorted names, fixed times, owners and modes), produced piece by piece.

    The same folder gives the same bytes, so the sha256 computed at export time
    is the sha256 of every later download.
    """
    written = 0
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        info = tarfile.TarInfo(f"{root}/{path.relative_to(folder).as_posix()}")
        info.size = path.stat().st_size
        info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
        header = info.tobuf(format=tarfile.PAX_FORMAT)
        yield header
        written += len(header)
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                yield block
                written += len(block)
        pad = (-info.size) % BLOCK
        if pad:
            yield b"\0" * pad
            written += pad
    end = b"\0" * (2 * BLOCK)
    written += len(end)
    yield end + b"\0" * ((-written) % RECORD)


def archive_digest(folder: Path, *, root: str = "merged") -> tuple[str, int]:
    """(sha256, size) of archive_chunks(folder)."""
    digest, size = hashlib.sha256(), 0
    for block in archive_chunks(folder, root=root):
        digest.update(block)
        size += len(block)
    return digest.hexdigest(), size


def disk_write_speed(folder: Path, *, megabytes: int = 256) -> float:
    """MB/s of writing and fsyncing `megabytes` of incompressible data under `folder` (the bench's yardstick)."""
    folder.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1 << 20)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".speed-", suffix=PARTIAL) as handle:
        started = time.monotonic()
        for _ in range(megabytes):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
        return megabytes / (time.monotonic() - started)


# --- MLflow: the merged folder as a transformers-flavour model (self-contained: no platform code to load it)

TRANSFORMERS_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "accelerate", "numpy", "pandas")


def log_transformers_model(*, tracking_uri: str, run_id: str, folder: Path, example_prompt: str, max_new_tokens: int,
                           name: str = "merged_model") -> str:
    """Log the merged folder with MLflow's transformers flavour (task text-generation, greedy, the run's max_new_tokens)
    as a LoggedModel of MLflow run `run_id`; returns its URI (models:/<model_id>).

    `mlflow models serve` of it answers prompts (the text the run's prompt format
    makes of a question and its contexts) with the continuation only.
    """
    import contextlib
    import importlib.metadata

    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import Model, infer_signature

    from .pyfunc_model import _LOG_LOCK, using_tracking_uri

    requirements = []
    for package in TRANSFORMERS_REQUIREMENTS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            requirements.append(f"{package}=={importlib.metadata.version(package).split('+', 1)[0]}")
    inference = {"max_new_tokens": int(max_new_tokens), "do_sample": False, "return_full_text": False}
    signature = infer_signature([example_prompt], ["an answer"], params=None)
    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    # A pipeline of the folder's model and tokenizer (MLflow's local-checkpoint path does not support Transformers 5's task table).
    generator = pipeline("text-generation", model=AutoModelForCausalLM.from_pretrained(str(folder)),
                         tokenizer=AutoTokenizer.from_pretrained(str(folder)))
    with _LOG_LOCK, using_tracking_uri(tracking_uri):
        logged = client.create_logged_model(experiment_id=run.info.experiment_id, name=name, source_run_id=run_id,
                                            model_type="merged-lora-transformers")
        info = Model.log(
            artifact_path=None, name=name, flavor=mlflow.transformers, run_id=run_id, model_id=logged.model_id,
            transformers_model=generator, task="text-generation", model_config=inference, signature=signature,
            input_example=None, pip_requirements=requirements, model_card=None,
        )
    return info.model_uri
