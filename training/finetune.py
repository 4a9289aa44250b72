"""LoRA fine-tuning loop (Transformers + PEFT), free of Django so benchmarks can call it.

A plain PyTorch loop rather than Trainer: length-grouped dynamic padding (little
padding waste), loss on answer tokens only, a cancel check and live progress at
every step, and nothing between the optimizer and the batches.

Two things keep the compute on real work (bench/README.md has the profiles):
batches padded only to their longest example (length-grouped, so that is
close to the shortest), and logits computed only from the first answer
position of a batch on (`logits_to_keep`): prompt positions carry no loss, so
projecting them onto the vocabulary was waste. The loss is the same number
`model(**batch).loss` gives.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import IGNORE_INDEX, Example, build_example, collate, iter_batches, resolve_prompt_format


@dataclass
class StepInfo:
    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    tokens: int  # non-padding tokens seen so far


@dataclass
class FinetuneOutcome:
    adapter_dir: Path
    steps: int
    final_loss: float
    tokens: int
    seconds: float
    device: str
    dtype: str
    trainable_parameters: int
    total_parameters: int


def pick_device(precision: str = "auto") -> tuple[str, Any]:
    """CUDA with bf16 where supported, else CPU with float32."""
    import torch

    if torch.cuda.is_available():
        if precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
            return "cuda", torch.bfloat16
        return "cuda", torch.float32
    return "cpu", torch.float32


class HubModelNeedsToken(OSError):
    """A hub model is private or gated and this worker has no (or no valid) HF_TOKEN."""


@contextlib.contextmanager
def hub_access(model: str) -> Iterator[None]:
    """Turn the hub's "gated / not found / 401" into one message that says what to set (never the token)."""
    try:
        yield
    except OSError as exc:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, (GatedRepoError, RepositoryNotFoundError)):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        has_token = bool(os.environ.get("HF_TOKEN"))
        kind = "gated" if isinstance(cause, GatedRepoError) else "private or does not exist"
        advice = ("the HF_TOKEN this worker has is not allowed to read it (accept the model's terms on the hub with that account)"
                  if has_token else "set HF_TOKEN for the gpu workers (.env: HF_TOKEN) to a token that may read it")
        raise HubModelNeedsToken(f"hub model {model!r} is {kind}: {advice}") from None


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    with hub_access(path):
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(path: str, *, device: str, dtype):
    from transformers import AutoModelForCausalLM

    with hub_access(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device)


def encode_rows(tokenizer, rows: Sequence[dict[str, str]], max_seq_length: int, *, prompt_format: str = "auto") -> list[Example]:
    fmt = resolve_prompt_format(tokenizer, prompt_format)  # checked once, not per row
    return [
        build_example(tokenizer, question=r["question"], context=r["context"], answer=r["answer"], max_seq_length=max_seq_length, prompt_format=fmt)
        for r in rows
    ]


def supports_logits_to_keep(model) -> bool:
    """Whether the causal LM under the (PEFT) model can skip logits we do not need."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forward wrappers
        return False


def first_logit_needed(labels) -> int | None:
    """The earliest position whose logits predict a labelled token (CPU labels), None if none is.

    Position p predicts token p + 1, and answers sit at the end of each row
    (prompt, answer, padding), so positions before this one carry no loss.
    """
    columns = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    if len(columns) == 0:
        return None
    return max(int(columns[0]) - 1, 0)


def causal_lm_loss(model, batch: dict[str, Any], *, first_logit: int | None):
    """Mean next-token cross-entropy over the labelled tokens: the number `model(**batch).loss` gives.

    With `first_logit`, only positions from there on are projected onto the
    vocabulary (`logits_to_keep`); the cross-entropy is the one Transformers
    computes (float32 logits, mean over labelled tokens).
    """
    if first_logit is None:
        return model(**batch).loss
    from torch.nn import functional

    labels = batch["labels"]
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=labels.shape[1] - first_logit,
    ).logits.float()
    targets = functional.pad(labels[:, first_logit + 1 :], (0, 1), value=IGNORE_INDEX)
    return functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def make_lora_model(model, lora: dict[str, Any], *, gradient_checkpointing: bool):
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Without this, LoRA weights behind checkpointed blocks can get no gradient.
        model.enable_input_require_grads()
    peft_config = LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"], task_type="CAUSAL_LM", bias="none",
    )
    return get_peft_model(model, peft_config)


def finetune(
    *,
    base_model_path: str,
    rows: Sequence[dict[str, str]],
    training: dict[str, Any],
    output_dir: Path,
    prompt_format: str = "auto",
    on_step: Callable[[StepInfo], None] | None = None,
    check_cancelled: Callable[[], None] | None = None,
) -> FinetuneOutcome:
    import torch
    from transformers import get_linear_schedule_with_warmup, set_seed

    started = time.monotonic()
    seed = training["seed"]
    set_seed(seed)
    device, dtype = pick_device(training.get("precision", "auto"))
    tokenizer = load_tokenizer(base_model_path)
    model = load_base_model(base_model_path, device=device, dtype=dtype)
    examples = encode_rows(tokenizer, rows, training["max_seq_length"], prompt_format=prompt_format)
    if not examples:
        raise ValueError("no training examples")
    model = make_lora_model(model, training["lora"], gradient_checkpointing=training.get("gradient_checkpointing", False))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())

    batch_size = training["batch_size"]
    accumulation = training.get("gradient_accumulation_steps", 1)
    batches_per_epoch = math.ceil(len(examples) / batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    total_steps = steps_per_epoch * training["epochs"]
    if training.get("max_steps"):
        total_steps = min(total_steps, training["max_steps"])
    trainable_parameters = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW: one kernel for all LoRA tensors instead of several per tensor (CUDA only).
    optimizer = torch.optim.AdamW(trainable_parameters, lr=training["learning_rate"], weight_decay=0.0, fused=device == "cuda")
    warmup = int(total_steps * training.get("warmup_ratio", 0.0))
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    model.train()
    step, tokens, loss_value = 0, 0, float("nan")
    pad_multiple = 8 if device == "cuda" else None
    trim_logits = supports_logits_to_keep(model)
    for epoch in range(training["epochs"]):
        window_loss, window_batches = None, 0
        for batch_number, batch_examples in enumerate(iter_batches(examples, batch_size=batch_size, seed=seed, epoch=epoch)):
            cpu_batch = collate(batch_examples, pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=pad_multiple)
            # Decided on the CPU tensors: nothing here waits for the device.
            first_logit = first_logit_needed(cpu_batch["labels"]) if trim_logits else None
            tokens += sum(e.n_tokens for e in batch_examples)
            batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
            loss = causal_lm_loss(model, batch, first_logit=first_logit) / accumulation
            loss.backward()
            # Summed on the device; read once per optimizer step (one sync, not one per micro-batch).
            window_loss = loss.detach() if window_loss is None else window_loss + loss.detach()
            window_batches += 1
            last_of_epoch = batch_number == batches_per_epoch - 1
            if window_batches < accumulation and not last_of_epoch:
                continue
            torch.nn.utils.clip_grad_norm_(trainable_parameters, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = window_loss.item() * accumulation / window_batches
            window_loss, window_batches = None, 0
            info = StepInfo(
                step=step, total_steps=total_steps, epoch=epoch + (batch_number + 1) / batches_per_epoch,
                loss=loss_value, learning_rate=scheduler.get_last_lr()[0], tokens=tokens,
            )
            if on_step:
                on_step(info)
            if check_cancelled:
                check_cancelled()  # raises when the run was cancelled: the loop ends here
            if step >= total_steps:
                break
        if step >= total_steps:
            break
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"training loss is {loss_value} at step {step}: lower the learning rate")

    adapter_dir = Path(output_dir) / "adapter"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    return FinetuneOutcome(
        adapter_dir=adapter_dir, steps=step, final_loss=loss_value, tokens=tokens,
        seconds=time.monotonic() - started, device=device, dtype=str(dtype).removeprefix("torch."),
        trainable_parameters=trainable, total_parameters=total_params,
    )
