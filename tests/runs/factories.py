from __future__ import annotations

from typing import Any

from runs.config import validate_config
from runs.models import PipelineRun, RunEvent


def finetune_config(**overrides: Any) -> dict[str, Any]:
    config = {
        "name": "test-finetune",
        "kind": "finetune",
        "model": {"base": "local:tiny-llama"},
        "datasets": {"train": ["rag_qa_train"], "eval": ["ragas_eval"]},
        "training": {"epochs": 1, "batch_size": 8, "max_seq_length": 256, "max_truncated_fraction": 1.0, "learning_rate": 1e-3, "max_steps": 3},
        "evaluation": {"metrics": ["rouge_score", "exact_match"], "max_samples": 3, "max_new_tokens": 8},
    }
    config.update(overrides)
    return config


def eval_only_config(**overrides: Any) -> dict[str, Any]:
    config = {
        "name": "test-eval",
        "kind": "eval_only",
        "datasets": {"eval": ["ragas_eval"]},
        "evaluation": {"answers": "dataset", "metrics": ["rouge_score", "string_presence"], "max_samples": 4},
    }
    config.update(overrides)
    return config


def make_run(owner, *, kind: str = "finetune", status: str = "pending", **fields: Any) -> PipelineRun:
    """A run row in a given status, without queueing anything (for API and state tests)."""
    config = validate_config(finetune_config() if kind == "finetune" else eval_only_config())
    run = PipelineRun.objects.create(
        name=config["name"], kind=kind, status=status, config=config, base_model=config["model"]["base"], owner=owner, **fields
    )
    RunEvent.objects.create(run=run, from_status="pending", to_status="pending", message="created")
    return run


def replace_step_body(monkeypatch, step_name: str, body) -> None:
    """Every chain of the step registry runs `body` for `step_name` (a fault injected into a real step)."""
    import dataclasses

    from runs import pipeline

    for chain_name in ("FINETUNE", "EVAL_GENERATE", "EVAL_STORED_ANSWERS"):
        chain = getattr(pipeline, chain_name)
        monkeypatch.setattr(pipeline, chain_name, tuple(dataclasses.replace(s, body=body) if s.name == step_name else s for s in chain))
