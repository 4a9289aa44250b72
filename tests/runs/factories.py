from __future__ import annotations

from typing import Any

from runs.config import validate_config
from runs.models import Job, PipelineRun, RunEvent


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


QUEUES = {"finetune": "gpu", "generate": "gpu"}


def make_run(owner, *, kind: str = "finetune", status: str = "pending", jobs: tuple[dict[str, Any], ...] = (), **fields: Any) -> PipelineRun:
    """A run row in a given status, without queueing anything (for API and state tests), with the job rows `jobs`
    ({"step", "state", and any Job field: heartbeat_at, attempts, figures, checkpoint_step, output})."""
    config = validate_config(finetune_config() if kind == "finetune" else eval_only_config())
    run = PipelineRun.objects.create(
        name=config["name"], kind=kind, status=status, config=config, base_model=config["model"]["base"], owner=owner, **fields
    )
    RunEvent.objects.create(run=run, from_status="pending", to_status="pending", message="created")
    for spec in jobs:
        Job.objects.create(run=run, queue=QUEUES.get(spec["step"], "cpu"), **spec)
    return run


def replace_step(monkeypatch, step_name: str, **changes) -> None:
    """Every kind's graph has `changes` (body=..., store=...) in its step `step_name` (a fault injected into a real step)."""
    import dataclasses

    from runs.kinds import KINDS
    from runs.kinds.base import Graph

    for kind in KINDS.values():
        original = kind.graph

        def graph(config, *, has_parent=False, original=original):
            built = original(config, has_parent=has_parent)
            return Graph(tuple(dataclasses.replace(s, **changes) if s.name == step_name else s for s in built.steps))

        monkeypatch.setattr(kind, "graph", graph)


def replace_step_body(monkeypatch, step_name: str, body) -> None:
    """Every kind's graph runs `body` for `step_name` (a fault injected into a real step)."""
    replace_step(monkeypatch, step_name, body=body)


def step_context(run, step_name: str = "finetune", *, key: str = ""):
    """A StepContext for one job of the run, created and claimed as the engine would (for tests of what a body records)."""
    from runs.models import Job
    from runs.services import job_add, job_claim
    from runs.step_io import StepContext

    graph = run.spec.graph_of(run)
    job = job_add(run_id=run.pk, step=step_name, key=key, queue=graph.step(step_name).queue) or Job.objects.get(run=run, step=step_name, key=key)
    job_claim(job_id=job.pk, worker="test")
    job.refresh_from_db()
    return StepContext(run, job, graph.step(step_name), graph)
