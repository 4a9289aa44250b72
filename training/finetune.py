"""LoRA fine-tuning loop (Transformers + PEFT), free of Django so benchmarks can call it.

A plain PyTorch loop rather than Trainer: length-grouped dynamic padding (little
padding waste), loss on answer tokens only, a cancel check and live progress at
every step, and nothing between the optimizer and the batches.

Nothing is lost and the best model is kept (training/checkpoints.py): a
validation loss (the same answer-token loss) on held-out rows, early stopping,
the adapter of the best validation loss rather than the last step's, checkpoints
(LoRA weights, optimizer, scheduler, RNG states, position in the data order)
that a new attempt resumes from with the same numbers, and out-of-memory
recovery (halve the micro-batch, double the accumulation, redo the step).

Two things keep the compute on real work (bench/README.md has the profiles):
batches padded only to their longest example (length-grouped, so that is
close to the shortest), and logits computed only from the first answer
position of a batch on (`logits_to_keep`): prompt positions carry no loss, so
projecting them onto the vocabulary was waste. The loss is the same number
`model(**batch).loss` gives.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoints
from .data import IGNORE_INDEX, Example, build_example, collate, iter_batches, planned_steps, resolve_prompt_format
from .precision import training_autocast, training_precision


@dataclass
class StepInfo:
    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    tokens: int  # non-padding tokens seen so far
    val_loss: float | None = None  # on the steps where validation ran
    elapsed_seconds: float = 0.0  # training time so far (earlier attempts included), model loading excluded
    device: str = ""
    peak_memory_bytes: int | None = None  # the device's peak allocation on cuda, the process's peak RSS on cpu


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
    best_step: int | None = None  # the step whose adapter this is (best validation loss); None: the last step
    best_val_loss: float | None = None
    stopped_early: str = ""  # why training stopped before its last step, if it did
    resumed_from: int | None = None  # the checkpoint step this attempt started from
    micro_batch_size: int = 0  # after any out-of-memory halving
    validation_rows: int = 0
    peak_memory_bytes: int | None = None


def peak_memory_bytes(device: str) -> int | None:
    """Peak memory so far: allocated on the CUDA device, else the process's peak resident set."""
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    except (ImportError, OSError):  # pragma: no cover - not Linux
        return None


class TrainingOutOfMemory(RuntimeError):
    """Out of memory at micro-batch 1: nothing smaller to try."""


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


def validation_loss(
    model, examples: Sequence[Example], *, batch_size: int, pad_token_id: int, device: str, trim_logits: bool, autocast_dtype=None,
) -> float:
    """The answer-token loss of training (causal_lm_loss) over held-out examples, weighted by their labelled tokens."""
    import torch

    order = sorted(range(len(examples)), key=lambda i: examples[i].n_tokens)
    total, weight = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                cpu_batch = collate([examples[i] for i in order[start : start + batch_size]], pad_token_id=pad_token_id)
                labelled = int((cpu_batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                if not labelled:
                    continue
                first_logit = first_logit_needed(cpu_batch["labels"]) if trim_logits else None
                batch = {k: v.to(device) for k, v in cpu_batch.items()}
                with training_autocast(device, autocast_dtype):
                    total += float(causal_lm_loss(model, batch, first_logit=first_logit)) * labelled
                weight += labelled
    finally:
        model.train(was_training)
    return total / weight if weight else float("nan")


def _out_of_memory_errors() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.cuda.OutOfMemoryError,)


def finetune(
    *,
    base_model_path: str,
    rows: Sequence[dict[str, str]],
    training: dict[str, Any],
    output_dir: Path,
    prompt_format: str = "auto",
    on_step: Callable[[StepInfo], None] | None = None,
    check_cancelled: Callable[[], None] | None = None,
    validation_rows: Sequence[dict[str, str]] = (),
    checkpoint_dir: Path | None = None,
    on_checkpoint: Callable[[str, Path, int], None] | None = None,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
    checkpoint_seconds: float = checkpoints.DEFAULT_CHECKPOINT_SECONDS,
    inject_oom: dict[int, int] | None = None,
    selection_every: str | int | None = None,
    on_selection_point: Callable[[int, Any, Any], str | None] | None = None,
) -> FinetuneOutcome:
    """Train a LoRA adapter; returns the adapter of the best validation loss (the last step's without validation).

    checkpoint_dir holds `last` and `best` (training/checkpoints.py); with `resume`
    and a `last` checkpoint there, training continues from it exactly where it
    stopped. on_checkpoint(kind, directory, step) publishes one (another worker
    may resume). inject_oom {step: times} is a test hook: a CUDA out-of-memory
    error raised in that step's forward pass, that many times.
    on_selection_point(step, model, tokenizer), at every `selection_every`
    ("epoch", or a number of optimizer steps) and at the last step, with the model
    in eval mode: the caller answers with it and returns why to stop (or None).
    It runs before that step's checkpoint, so a resumed attempt never skips one.
    """
    import torch
    from transformers import get_linear_schedule_with_warmup, set_seed

    started = time.monotonic()
    say = log or (lambda line: None)
    seed = training["seed"]
    set_seed(seed)
    device, weights_dtype, autocast_dtype = training_precision(training.get("precision", "auto"), base_model_path)
    tokenizer = load_tokenizer(base_model_path)
    model = load_base_model(base_model_path, device=device, dtype=weights_dtype)
    examples = encode_rows(tokenizer, rows, training["max_seq_length"], prompt_format=prompt_format)
    if not examples:
        raise ValueError("no training examples")
    held_out = encode_rows(tokenizer, validation_rows, training["max_seq_length"], prompt_format=prompt_format) if validation_rows else []
    model = make_lora_model(model, training["lora"], gradient_checkpointing=training.get("gradient_checkpointing", False))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())

    batch_size = training["batch_size"]
    accumulation = training.get("gradient_accumulation_steps", 1)
    batches_per_epoch = math.ceil(len(examples) / batch_size)
    total_steps = planned_steps(len(examples), training)
    trainable_parameters = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW: one kernel for all LoRA tensors instead of several per tensor (CUDA only).
    optimizer = torch.optim.AdamW(trainable_parameters, lr=training["learning_rate"], weight_decay=0.0, fused=device == "cuda")
    warmup = int(total_steps * training.get("warmup_ratio", 0.0))
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    eval_every = training.get("eval_every")
    checkpoint_every = training.get("checkpoint_every")
    early = training.get("early_stopping") or {}
    patience, min_delta = early.get("patience"), float(early.get("min_delta") or 0.0)
    state = checkpoints.TrainingState(micro_batch_size=batch_size)
    resumed_from, best = None, None  # best: a CPU copy of the LoRA weights of the best validation loss
    if resume and checkpoint_dir is not None and checkpoints.has_checkpoint(checkpoint_dir, "last"):
        state = checkpoints.load_last(checkpoint_dir, model=model, optimizer=optimizer, scheduler=scheduler, device=device)
        resumed_from = state.step
        best_step, best = checkpoints.best_weights(checkpoint_dir)
        if best_step != state.best_step and state.best_step == state.step:
            best = checkpoints.lora_weights(model)  # killed between saving `last` and `best`: `last` is the best
        say(f"resumed from step {state.step} (epoch {state.epoch}, batch {state.batch}) of a checkpoint")

    def save(kind: str) -> None:
        if checkpoint_dir is None:
            return
        if kind == "last":
            checkpoints.save_last(checkpoint_dir, model=model, optimizer=optimizer, scheduler=scheduler, state=state)
        else:
            checkpoints.save_best(checkpoint_dir, model=model, step=state.best_step, val_loss=state.best_loss)
        if on_checkpoint:
            on_checkpoint(kind, checkpoint_dir / kind, state.step)

    model.train()
    loop_started = time.monotonic() - state.seconds  # a resumed attempt goes on from the checkpoint's training time
    loss_value = float("nan")
    pad_multiple = 8 if device == "cuda" else None
    trim_logits = supports_logits_to_keep(model)
    oom_left = dict(inject_oom or {})
    last_checkpoint_at = time.monotonic()
    done = state.step >= total_steps or bool(state.stopped_early)
    for epoch in range(state.epoch, training["epochs"]):
        if done:
            break
        batches = list(iter_batches(examples, batch_size=batch_size, seed=seed, epoch=epoch))
        first = state.batch if epoch == state.epoch else 0
        windows = [list(range(i, min(i + accumulation, len(batches)))) for i in range(0, len(batches), accumulation)]
        for window in windows:
            if window[-1] < first:
                continue
            while True:  # once, or again with a smaller micro-batch after an out-of-memory error
                try:
                    window_loss, window_tokens = None, 0
                    for batch_number in window:
                        batch_examples = batches[batch_number]
                        for chunk_start in range(0, len(batch_examples), state.micro_batch_size):
                            chunk = batch_examples[chunk_start : chunk_start + state.micro_batch_size]
                            if oom_left.get(state.step + 1, 0) > 0:
                                oom_left[state.step + 1] -= 1
                                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by a test)")
                            cpu_batch = collate(chunk, pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=pad_multiple)
                            # Decided on the CPU tensors: nothing here waits for the device.
                            first_logit = first_logit_needed(cpu_batch["labels"]) if trim_logits else None
                            window_tokens += sum(e.n_tokens for e in chunk)
                            batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
                            share = len(chunk) / len(batch_examples) / accumulation
                            with training_autocast(device, autocast_dtype):
                                loss = causal_lm_loss(model, batch, first_logit=first_logit) * share
                            loss.backward()
                            # Summed on the device; read once per optimizer step (one sync, not one per micro-batch).
                            window_loss = loss.detach() if window_loss is None else window_loss + loss.detach()
                    break
                except _out_of_memory_errors() as exc:
                    optimizer.zero_grad(set_to_none=True)
                    window_loss = loss = batch = None  # noqa: F841 - let the tensors go before emptying the cache
                    gc.collect()
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    longest = max(e.n_tokens for b in window for e in batches[b])
                    if state.micro_batch_size == 1:
                        raise TrainingOutOfMemory(
                            f"out of memory at step {state.step + 1} with micro-batch 1 (sequences up to {longest} tokens, "
                            f"max_seq_length {training['max_seq_length']}): turn on training.gradient_checkpointing "
                            "or lower training.max_seq_length"
                        ) from exc
                    halved = max(1, state.micro_batch_size // 2)
                    say(
                        f"out of memory at step {state.step + 1} (sequences up to {longest} tokens): micro-batch "
                        f"{state.micro_batch_size} -> {halved}, gradient accumulation x{batch_size // halved} "
                        f"(same effective batch of {batch_size * accumulation}); redoing the step"
                    )
                    state.micro_batch_size = halved
            torch.nn.utils.clip_grad_norm_(trainable_parameters, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += window_tokens
            state.epoch, state.batch = (epoch, window[-1] + 1) if window[-1] + 1 < len(batches) else (epoch + 1, 0)
            loss_value = window_loss.item() * accumulation / len(window)
            last_step = state.step >= total_steps
            validate = bool(held_out) and (
                last_step or (state.step % eval_every == 0 if eval_every else window is windows[-1])
            )
            val_loss = None
            if validate:
                val_loss = validation_loss(
                    model, held_out, batch_size=state.micro_batch_size, pad_token_id=tokenizer.pad_token_id, device=device, trim_logits=trim_logits,
                    autocast_dtype=autocast_dtype,
                )
                improved = state.best_loss is None or val_loss < state.best_loss - min_delta
                if improved:
                    state.best_loss, state.best_step, state.bad_evals = val_loss, state.step, 0
                    best = checkpoints.lora_weights(model)
                else:
                    state.bad_evals += 1
                if patience and state.bad_evals >= patience and not last_step:
                    state.stopped_early = (
                        f"early stopping at step {state.step}: validation loss has not improved by more than {min_delta:g} "
                        f"for {patience} evaluation(s) (best {state.best_loss:.4f} at step {state.best_step})"
                    )
            state.seconds = time.monotonic() - loop_started
            info = StepInfo(
                step=state.step, total_steps=total_steps, epoch=epoch + (window[-1] + 1) / batches_per_epoch,
                loss=loss_value, learning_rate=scheduler.get_last_lr()[0], tokens=state.tokens, val_loss=val_loss,
                elapsed_seconds=round(state.seconds, 3), device=device, peak_memory_bytes=peak_memory_bytes(device),
            )
            if on_step:
                on_step(info)
            if on_selection_point is not None and selection_every and not state.stopped_early:
                point = last_step or (window is windows[-1] if selection_every == "epoch" else state.step % int(selection_every) == 0)
                if point:
                    model.eval()
                    try:
                        stop = on_selection_point(state.step, model, tokenizer)
                    finally:
                        model.train()
                    if stop and not last_step:
                        state.stopped_early = f"early stopping at step {state.step} by selection: {stop}"
            due = (checkpoint_every and state.step % checkpoint_every == 0) or (
                not checkpoint_every and time.monotonic() - last_checkpoint_at >= checkpoint_seconds
            )
            if (validate or due) and not last_step and not state.stopped_early:
                save("last")
                last_checkpoint_at = time.monotonic()
            if validate and state.best_step == state.step:
                save("best")  # after `last`: a kill in between leaves `last` as the best (see the resume above)
            if check_cancelled:
                check_cancelled()  # raises when the run was cancelled: the loop ends here
            if last_step or state.stopped_early:
                done = True
                break
    if state.stopped_early:
        say(state.stopped_early)
    if resumed_from is not None and not math.isfinite(loss_value):
        loss_value = state.last_loss
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"training loss is {loss_value} at step {state.step}: lower the learning rate")
    state.last_loss = loss_value

    if state.best_step is not None and state.best_step != state.step:
        if best is None:
            raise RuntimeError(f"the weights of the best step ({state.best_step}) were not kept")
        checkpoints.apply_lora_weights(model, best, device=device)
        say(f"the adapter is the one of step {state.best_step} (best validation loss {state.best_loss:.4f}), not of the last step {state.step}")
    adapter_dir = Path(output_dir) / "adapter"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    return FinetuneOutcome(
        adapter_dir=adapter_dir, steps=state.step, final_loss=loss_value, tokens=state.tokens,
        seconds=time.monotonic() - started, device=device, dtype=str(autocast_dtype or weights_dtype).removeprefix("torch."),
        trainable_parameters=trainable, total_parameters=total_params,
        best_step=state.best_step, best_val_loss=state.best_loss, stopped_early=state.stopped_early,
        resumed_from=resumed_from, micro_batch_size=state.micro_batch_size, validation_rows=len(held_out),
        peak_memory_bytes=peak_memory_bytes(device),
    )
