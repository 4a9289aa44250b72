"""The from-scratch `local:<name>` models (tiny-llama, small-llama), built offline from the bundled data.

A small Llama-architecture causal LM with a byte-level BPE tokenizer trained on
the bundled train sets and a short, deterministic pre-training pass on their
text, so the model writes text of the right vocabulary. It has never seen the
prompt template the fine-tune teaches, which is what makes base vs fine-tuned
differ. Built in well under a minute on 2 CPU cores; built on first use.
training/local_models.py lists every local build and resolves `local:` names.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


@dataclass(frozen=True)
class TinyModelSpec:
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    max_position_embeddings: int = 1024
    pretrain_epochs: int = 4
    pretrain_block: int = 128
    pretrain_batch: int = 16
    pretrain_lr: float = 4e-3
    seed: int = 1234


# Named builds. "tiny-llama" is the default offline model; "small-llama" (~20M
# parameters) is big enough that compute dominates, for benchmarks.
SPECS: dict[str, TinyModelSpec] = {
    "tiny-llama": TinyModelSpec(),
    "small-llama": TinyModelSpec(
        vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
        num_attention_heads=6, pretrain_epochs=1, pretrain_lr=1e-3,
    ),
}


class UnknownLocalModel(ValueError):
    pass


def _setting(name: str) -> Path:
    # Imported late: the GPU smoke script and benchmarks use this module without Django.
    from django.conf import settings

    return Path(getattr(settings, name))


def local_model_dir(name: str, models_dir: Path | None = None) -> Path:
    return Path(models_dir or _setting("MODELS_DIR")) / name


def _bundled_texts(data_dir: Path) -> list[str]:
    """Text of the bundled train sets (never the eval sets), in a fixed order."""
    texts: list[str] = []
    for path in sorted((data_dir / "train").glob("*.jsonl")):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    row = json.loads(line)
                    texts.append(f"{row['context']}\n{row['question']}\n{row['answer']}")
    if not texts:
        raise RuntimeError(f"no bundled train data under {data_dir / 'train'}")
    return texts


def _train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=1024, padding_side="right",
    )


def untrained_model(name: str, *, data_dir: Path | None = None):
    """local:<name> before pre-training: (random-init model, its tokenizer, the bundled texts), seeded.

    build_tiny_model pre-trains it; benchmarks time it as is (throughput does not depend on the weights).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = SPECS[name]
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    texts = _bundled_texts(Path(data_dir or _setting("BUNDLED_DATA_DIR")))
    tokenizer = _train_tokenizer(texts, spec.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config), tokenizer, texts


def build_tiny_model(
    name: str = "tiny-llama",
    *,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    models_dir: Path | None = None,
    data_dir: Path | None = None,
) -> Path:
    """Build local:<name> under MODELS_DIR, atomically (a half-built model never appears).

    Pre-training runs on CUDA when there is a GPU (bit-for-bit determinism holds per device).
    """
    if name not in SPECS:
        raise UnknownLocalModel(f"unknown local model 'local:{name}'; known: {', '.join('local:' + n for n in SPECS)}")
    target = local_model_dir(name, models_dir)
    if target.exists() and not force:
        return target
    import torch
    from transformers.utils import logging as transformers_logging

    spec = SPECS[name]
    started = time.monotonic()
    model, tokenizer, texts = untrained_model(name, data_dir=data_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)

    # Pre-training: the concatenated texts, cut into fixed blocks (no padding waste).
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    block = spec.pretrain_block
    blocks = torch.tensor(stream[: len(stream) // block * block]).view(-1, block)
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=0.01)
    steps_per_epoch = (len(blocks) + spec.pretrain_batch - 1) // spec.pretrain_batch
    total = steps_per_epoch * spec.pretrain_epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=spec.pretrain_lr, total_steps=total, pct_start=0.1)
    model.train()
    step, final_loss = 0, float("nan")
    for _epoch in range(spec.pretrain_epochs):
        order = torch.randperm(len(blocks), generator=generator)
        for start in range(0, len(blocks), spec.pretrain_batch):
            batch = blocks[order[start : start + spec.pretrain_batch]].to(device)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            final_loss = loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if progress:
                progress(step, total)
    model.eval()
    model.to("cpu")
    transformers_logging.disable_progress_bar()

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "build_info.json").write_text(json.dumps({
            "name": name, "spec": asdict(spec), "final_loss": final_loss, "pretrain_tokens": int(blocks.numel()),
            "seconds": round(time.monotonic() - started, 1), "parameters": sum(p.numel() for p in model.parameters()),
        }, indent=2))
        if target.exists():
            if not force:  # Another process finished the same build first.
                shutil.rmtree(staging)
                return target
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("built local:%s in %.1fs (loss %.3f)", name, time.monotonic() - started, final_loss)
    return target


def __getattr__(name: str):
    # resolve_model_path moved to training.local_models (which knows every local build);
    # `from training.tiny_model import resolve_model_path` keeps working, lazily (no import cycle).
    if name == "resolve_model_path":
        from .local_models import resolve_model_path

        return resolve_model_path
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
