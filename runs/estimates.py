"""How long a run takes, from what this machine has measured: never a constant.

A run's time is the sum of its stages: the steps of its kind's graph, and a
`local:` model's build on first use. Each stage is its work in this config at
the pace an earlier job of that step measured on this database's workers
(`selectors.measured_jobs`); the job's figures say what its pace is counted in:

| figures of the earlier job          | this run's work                       | matched on          |
|-------------------------------------|---------------------------------------|---------------------|
| `step_seconds`, `steps`             | optimizer steps                       | the same base model |
| `answers_per_second`, `answers`     | answers to generate (eval rows x variants) | the same base model |
| `samples_per_second`, `samples`     | answers to score                      | the same metrics    |
| none of these (registry, compare)   | one job: its wall time                | the same base model, else any |
| `model_build` (done)                | the build, when the model is not built here | the same model |

What the earlier job spent besides its measured loop (loading the model,
saving the adapter) is added as it was. A stage that nothing comparable has
measured has no estimate, and then neither has the run: the page says "no
estimate yet" and names the stage. Every estimate's basis names the run that
measured the pace, so the user can judge it (a run measured under load is slow).

Used before launch (the dashboard, the New run page's *Check data*, `plan_for_config`)
and while a run goes (the run page's ETA, `remaining_for_run`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from datasets_app.selectors import dataset_row_counts
from training.data import planned_steps

from .kinds import kind_named
from .kinds.base import FINISHED_STATES, Graph, Kind
from .models import Job, JobState, PipelineRun
from .selectors import measured_jobs

# (pace figure, work figure it was measured over, the unit's name and plural, this run's work key, the figure is seconds per unit)
PACES = (
    ("step_seconds", "steps", ("optimizer step", "optimizer steps"), "optimizer_steps", True),
    ("answers_per_second", "answers", ("answer", "answers"), "answers_generated", False),
    ("samples_per_second", "samples", ("answer scored", "answers scored"), "answers_scored", False),
)
MODEL_PACES = frozenset({"step_seconds", "answers_per_second"})  # paces that depend on the model


def run_work(config: Mapping[str, Any], *, kind: Kind, rows: Mapping[str, int], optimizer_steps: int | None = None) -> dict[str, int | None]:
    """What a run of `config` has to do, in the units steps measure their pace in.

    `rows`: {dataset name: rows}; `optimizer_steps`: the trainer's own count once it is known.
    """
    evaluation = config.get("evaluation") or {}
    limit = evaluation.get("max_samples")
    datasets = config.get("datasets") or {}
    eval_rows = sum(min(rows.get(name, 0), limit) if limit else rows.get(name, 0) for name in datasets.get("eval", []))
    generated = len(kind.generated_variants(config))
    training = config.get("training")
    if optimizer_steps is None and training and datasets.get("train"):
        train = sum(rows.get(name, 0) for name in datasets["train"])
        split = training.get("validation_split") or 0.0
        if not training.get("validation_dataset") and split > 0 and train >= 2:  # as training.data.split_validation holds rows out
            train -= min(train - 1, max(1, round(train * split)))
        optimizer_steps = planned_steps(train, dict(training))
    return {"optimizer_steps": optimizer_steps, "answers_generated": eval_rows * generated, "answers_scored": eval_rows * max(generated, 1)}


def _pace_of(figures: Mapping[str, Any]) -> tuple[str, str, tuple[str, str], str, bool] | None:
    return next((p for p in PACES if figures.get(p[0]) and figures.get(p[1])), None)


def _build_seconds(figures: Mapping[str, Any]) -> float:
    build = figures.get("model_build") or {}
    return float(build.get("seconds") or 0.0) if build.get("done") else 0.0


def _comparable(job: Mapping[str, Any], *, base_model: str, metrics: list[str], device: str = "") -> bool:
    figures = job["figures"]
    pace = _pace_of(figures)
    if pace is None:
        return job["base_model"] == base_model
    if pace[0] in MODEL_PACES:
        return job["base_model"] == base_model and (not device or figures.get("device", device) == device)
    return sorted(figures.get("metrics") or []) == sorted(metrics)


def _pace_text(figures: Mapping[str, Any], pace: tuple[str, str, tuple[str, str], str, bool]) -> str:
    key, _, (unit, units), _, per_unit = pace
    value = float(figures[key])
    return f"{value:.3g} s per {unit}" if per_unit else f"{value:.3g} {units}/s"


def stage_from(job: Mapping[str, Any], work: Mapping[str, int | None]) -> tuple[float | None, str]:
    """(seconds, basis) of one stage of this run, at the pace `job` (an earlier job of the same step) measured."""
    figures = job["figures"]
    where = f"run #{job['run_id']}" + (f" on {figures['device']}" if figures.get("device") else "")
    pace = _pace_of(figures)
    if pace is None:
        return max(job["seconds"] - _build_seconds(figures), 0.0), f"as long as it took {where}"
    key, done_key, names, work_key, per_unit = pace
    units = work.get(work_key)
    if units is None:
        return None, f"the number of {names[1]} is not known yet"
    seconds_per_unit = float(figures[key]) if per_unit else 1.0 / float(figures[key])
    overhead = max(job["seconds"] - _build_seconds(figures) - seconds_per_unit * float(figures[done_key]), 0.0)
    basis = f"{units} {names[units != 1]} at {_pace_text(figures, pace)}, measured by {where}"
    if overhead >= 1:
        basis += f", plus {overhead:.0f} s of loading and saving as there"
    return units * seconds_per_unit + overhead, basis


def _model_used(work: Mapping[str, int | None]) -> bool:
    return bool(work.get("optimizer_steps") or work.get("answers_generated"))


def model_built_here(base_model: str) -> bool:
    """Whether a `local:` model is already built where the run's jobs will run (any other reference: True, nothing to
    build). Known only in the embedded default, where they run in this process; in served mode the workers' disks are
    not this server's, so no build is predicted (a build that happens still shows, with its own pace)."""
    from django.conf import settings

    if not base_model.startswith("local:") or not settings.JOBS_INLINE:
        return True
    from training.tiny_model import local_model_dir

    return local_model_dir(base_model.removeprefix("local:")).exists()


def _build_stage(base_model: str, measured: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    label = f"building {base_model} (first use)"
    for job in measured:
        build = job["figures"].get("model_build") or {}
        if build.get("done") and build.get("model") == base_model and build.get("seconds") is not None:
            return {"step": "", "label": label, "seconds": float(build["seconds"]), "basis": f"as long as the build took in run #{job['run_id']}"}
    return {"step": "", "label": label, "seconds": None, "basis": f"no build of {base_model} measured on this machine yet"}


def _prior(step_name: str, label: str, *, measured: list[dict[str, Any]], work: Mapping[str, int | None], base_model: str,
           metrics: list[str], device: str = "") -> dict[str, Any]:
    """A stage's estimate from the newest comparable earlier job of that step."""
    for job in measured:
        if job["step"] == step_name and _comparable(job, base_model=base_model, metrics=metrics, device=device):
            seconds, basis = stage_from(job, work)
            return {"step": step_name, "label": label, "seconds": seconds, "basis": basis}
    return {"step": step_name, "label": label, "seconds": None, "basis": f"no earlier {label} of {base_model} measured on this machine"}


def _total(stages: list[dict[str, Any]]) -> dict[str, Any]:
    missing = [s["label"] for s in stages if s["seconds"] is None]
    if missing:
        return {"seconds": None, "stages": stages, "missing": missing,
                "basis": "no estimate yet: nothing on this machine has measured " + ", ".join(missing)}
    return {"seconds": sum(s["seconds"] for s in stages), "stages": stages, "missing": [],
            "basis": "the stages left, at the pace this machine measured for each (see each stage's basis)"}


def _steps(graph: Graph) -> list:
    """The steps a run's time is the sum of: not on-demand ones (an export), and not spawned ones (their number is
    decided while the run goes, and they run beside the step that adds them)."""
    return [step for step in graph.steps if not step.on_demand and not step.spawned]


def plan_for_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Before launch: how long a run of this validated config takes here, stage by stage.

    {"work", "stages": [{"label", "seconds", "basis"}], "seconds" (None unless every stage has a measured pace),
    "missing", "basis"}.
    """
    kind = kind_named(config["kind"])
    graph = kind.graph(config)
    datasets = config.get("datasets") or {}
    work = run_work(config, kind=kind, rows=dataset_row_counts([*datasets.get("train", []), *datasets.get("eval", [])]))
    base_model = (config.get("model") or {}).get("base", "")
    metrics = list((config.get("evaluation") or {}).get("metrics", []))
    measured = measured_jobs(steps=[s.name for s in _steps(graph)])
    stages = []
    if _model_used(work) and not model_built_here(base_model):
        stages.append(_build_stage(base_model, measured))
    stages += [_prior(s.name, s.label, measured=measured, work=work, base_model=base_model, metrics=metrics) for s in _steps(graph)]
    return {"work": work, **_total(stages)}


def remaining_for_run(run: PipelineRun, jobs: list[Job], *, own: Mapping[int, dict[str, Any]], now: datetime) -> dict[str, Any]:
    """While a run goes: the time left, stage by stage.

    A running job counts with its own measured pace (`own`: {job id: {"seconds", "basis", "building"}}, from
    runs/page_data.py); a job that has not started, or has no pace of its own yet, with an earlier job's.
    A running model build counts its own remaining time, then the step's work at the earlier pace.
    """
    graph = run.spec.graph_of(run)
    config = run.config
    datasets = config.get("datasets") or {}
    total_steps = next((j.figures.get("total_steps") for j in jobs if (j.figures or {}).get("total_steps")), None)
    work = run_work(config, kind=run.spec, optimizer_steps=total_steps,
                    rows=dataset_row_counts([*datasets.get("train", []), *datasets.get("eval", [])]))
    metrics = list((config.get("evaluation") or {}).get("metrics", []))
    device = next((j.figures.get("device") for j in jobs if (j.figures or {}).get("device")), "")
    measured = measured_jobs(steps=[s.name for s in _steps(graph)], exclude_run=run.pk)
    stages: list[dict[str, Any]] = []
    building = any((j.figures or {}).get("model_build") for j in jobs)
    if _model_used(work) and not building and not model_built_here(run.base_model):
        stages.append(_build_stage(run.base_model, measured))
    for step in _steps(graph):
        mine = [j for j in jobs if j.step == step.name]
        if mine and all(j.state in FINISHED_STATES for j in mine):
            continue
        prior = _prior(step.name, step.label, measured=measured, work=work, base_model=run.base_model, metrics=metrics, device=device)
        running = [j for j in mine if j.state == JobState.RUNNING]
        if not running:
            stages.append(prior)
            continue
        for job in running:
            mine_own = own.get(job.pk) or {}
            if mine_own.get("building"):
                seconds = None if mine_own.get("seconds") is None or prior["seconds"] is None else mine_own["seconds"] + prior["seconds"]
                stages.append({"step": step.name, "label": f"{step.label} (the model build first)", "seconds": seconds,
                               "basis": f"the build at its own pace, then {prior['basis']}"})
            elif mine_own.get("seconds") is not None:
                stages.append({"step": step.name, "label": step.label, "seconds": mine_own["seconds"], "basis": mine_own["basis"]})
            elif prior["seconds"] is not None and job.started_at is not None:
                so_far = max((now - job.started_at).total_seconds(), 0.0)
                stages.append({**prior, "seconds": max(prior["seconds"] - so_far, 0.0), "basis": f"{prior['basis']}, less the {so_far:.0f} s it has run"})
            else:
                stages.append(prior)
    return _total(stages)


def plan_line(plan: Mapping[str, Any]) -> str:
    """The plan as one line of text (`run_pipeline --check`)."""
    if plan["seconds"] is None:
        return f"the whole run on this machine: {plan['basis']}"
    return f"the whole run on this machine: about {plan['seconds'] / 60:.1f} min (each stage at a pace measured here)"
