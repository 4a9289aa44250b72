"""The training loop keeps the best model and loses nothing: validation loss, early stopping,
checkpoints that resume with the same numbers, out-of-memory recovery (injected on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import checkpoints
from training.data import split_validation
from training.finetune import TrainingOutOfMemory, finetune

ROWS = [json.loads(line) for line in (Path(__file__).resolve().parents[2] / "data/train/rag_qa_train.jsonl").read_text().splitlines()[:40]]
TRAINING = {
    "epochs": 2, "batch_size": 4, "max_seq_length": 96, "learning_rate": 5e-3, "seed": 11, "max_steps": 12,
    "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"},
}


class Killed(Exception):
    """Stands for a SIGKILL between two steps (the real one is in tests/reliability)."""


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def train(tmp: Path, tiny_model: str, *, training=None, rows=ROWS[:32], validation=ROWS[32:], **kwargs):
    steps = []
    outcome = finetune(
        base_model_path=tiny_model, rows=rows, validation_rows=validation, training={**TRAINING, **(training or {})},
        output_dir=tmp, checkpoint_dir=tmp / "checkpoints", prompt_format="plain", on_step=kwargs.pop("on_step", steps.append), **kwargs,
    )
    return outcome, steps


def test_the_validation_split_is_seeded_and_disjoint():
    rows = [{"question": f"q{i}", "context": "c", "answer": "a"} for i in range(50)]
    train, held = split_validation(rows, fraction=0.2, seed=5)
    again_train, again_held = split_validation(rows, fraction=0.2, seed=5)
    assert (train, held) == (again_train, again_held)
    assert len(held) == 10 and len(train) == 40
    assert not {r["question"] for r in train} & {r["question"] for r in held}
    assert sorted(r["question"] for r in train + held) == sorted(r["question"] for r in rows)
    assert split_validation(rows, fraction=0.2, seed=6)[1] != held
    assert split_validation(rows, fraction=0.0, seed=5) == (rows, [])


def test_a_resumed_run_ends_with_the_adapter_of_an_uninterrupted_one(tmp_path, tiny_model):
    whole, whole_steps = train(tmp_path / "whole", tiny_model, training={"eval_every": 4, "checkpoint_every": 3})

    def kill_after_step_7(info):
        if info.step == 7:
            raise Killed
    with pytest.raises(Killed):
        train(tmp_path / "resumed", tiny_model, training={"eval_every": 4, "checkpoint_every": 3}, on_step=kill_after_step_7)
    assert checkpoints.checkpoint_step(tmp_path / "resumed" / "checkpoints") == 6
    resumed, resumed_steps = train(tmp_path / "resumed", tiny_model, training={"eval_every": 4, "checkpoint_every": 3}, resume=True)

    assert resumed.resumed_from == 6 and whole.resumed_from is None
    assert [s.step for s in resumed_steps] == list(range(7, 13))
    assert [s.loss for s in resumed_steps] == pytest.approx([s.loss for s in whole_steps[6:]], abs=1e-6)
    assert [s.step for s in resumed_steps if s.val_loss is not None] == [8, 12]
    assert [s.val_loss for s in resumed_steps if s.val_loss] == pytest.approx([s.val_loss for s in whole_steps[6:] if s.val_loss], abs=1e-6)
    assert resumed.best_step == whole.best_step
    a, b = adapter(whole.adapter_dir), adapter(resumed.adapter_dir)
    assert a.keys() == b.keys() and a
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def test_validation_runs_once_per_epoch_and_at_the_end_by_default_and_the_best_step_is_the_adapter(tmp_path, tiny_model):
    outcome, steps = train(tmp_path, tiny_model, training={"max_steps": None, "learning_rate": 5e-2})
    validated = [s.step for s in steps if s.val_loss is not None]
    assert validated == [8, 16]  # 32 rows / batch 4 = 8 steps per epoch, 2 epochs
    losses = {s.step: s.val_loss for s in steps if s.val_loss is not None}
    assert outcome.best_step == min(losses, key=losses.get) and outcome.best_val_loss == pytest.approx(min(losses.values()))
    best_step, best = checkpoints.best_weights(tmp_path / "checkpoints")
    assert best_step == outcome.best_step
    saved = adapter(outcome.adapter_dir)
    assert {k: v for k, v in saved.items()}.keys() == best.keys()


def test_best_not_last_adapter_is_kept_when_validation_gets_worse(tmp_path, tiny_model):
    # Training teaches one fixed answer to every question; the more it does, the less likely the real
    # answers of the validation rows become, so validation loss gets worse after its first evaluations.
    rows = [{**row, "answer": "No comment."} for row in ROWS[:8]]
    outcome, steps = train(
        tmp_path, tiny_model, rows=rows, validation=ROWS[8:16], training={"max_steps": 12, "eval_every": 2, "learning_rate": 0.05, "epochs": 6},
    )
    losses = {s.step: s.val_loss for s in steps if s.val_loss is not None}
    assert outcome.best_step == min(losses, key=losses.get)
    assert outcome.best_step != outcome.steps, losses
    _, best = checkpoints.best_weights(tmp_path / "checkpoints")
    saved = adapter(outcome.adapter_dir)
    assert max(float((saved[k] - best[k]).abs().max()) for k in best) == 0.0


def test_early_stopping_stops_at_the_expected_evaluation(tmp_path, tiny_model):
    outcome, steps = train(
        tmp_path, tiny_model, rows=ROWS[:8],
        training={"max_steps": 40, "epochs": 20, "eval_every": 2, "learning_rate": 0.1, "early_stopping": {"patience": 2, "min_delta": 0.0}},
    )
    evaluations = [(s.step, s.val_loss) for s in steps if s.val_loss is not None]
    best, bad, expected_stop = None, 0, None
    for step, loss in evaluations:
        if best is None or loss < best:
            best, bad = loss, 0
        else:
            bad += 1
        if bad >= 2:
            expected_stop = step
            break
    assert expected_stop is not None and outcome.steps == expected_stop == evaluations[-1][0] < 40
    assert outcome.stopped_early.startswith(f"early stopping at step {expected_stop}")


def test_an_out_of_memory_step_halves_the_micro_batch_and_training_goes_on(tmp_path, tiny_model):
    lines = []
    plain, plain_steps = train(tmp_path / "plain", tiny_model, validation=[])
    outcome, steps = train(tmp_path / "oom", tiny_model, validation=[], inject_oom={3: 1, 5: 1}, log=lines.append)
    assert outcome.steps == 12 and [s.step for s in steps] == list(range(1, 13))
    assert outcome.micro_batch_size == 1
    assert any("out of memory at step 3" in line and "micro-batch 4 -> 2" in line for line in lines), lines
    assert any("out of memory at step 5" in line and "micro-batch 2 -> 1" in line for line in lines), lines
    # Same effective batch: the steps before the error are identical, the ones after close (same in expectation).
    assert [s.loss for s in steps[:2]] == pytest.approx([s.loss for s in plain_steps[:2]], abs=1e-6)
    assert outcome.final_loss == pytest.approx(plain.final_loss, rel=0.1)


def test_out_of_memory_at_micro_batch_one_names_the_sequence_length_and_what_to_do(tmp_path, tiny_model):
    with pytest.raises(TrainingOutOfMemory) as caught:
        train(tmp_path, tiny_model, validation=[], training={"batch_size": 2}, inject_oom={2: 5})
    message = str(caught.value)
    assert "micro-batch 1" in message and "max_seq_length 96" in message and "tokens" in message
    assert "gradient_checkpointing" in message
