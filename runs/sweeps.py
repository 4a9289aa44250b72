"""Sweeps: many fine-tunes as one experiment. The job bodies of the sweep kind (runs/kinds/sweep.py).

- `plan_step` opens the Optuna study (ask-and-tell, stored in the project's database) and starts the first
  `parallel` trials, each a child fine-tune run (`ctx.add_child_run`) that the parent's `trial:<n>` job waits for.
- `tell_step` follows each trial's end: it tells Optuna the child's selection score (the objective; a failed or
  cancelled child is a failed trial) and starts the next trial while the sweep has trials left.
- `pick_step` chooses the winner on the children's selection scores (never on an eval score), and makes the sweep
  run carry the winner's answers, scores and comparisons: the claim is the winner's paired comparison with its
  base on the eval datasets, which no trial was chosen on. The sweep then registers the winner and runs the
  promotion gate as a fine-tune does; the children never compete for `champion`.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.db import connection

from .models import Job, JobState, PipelineRun, RunResult, RunStatus, SampleResult, ScoreComparison
from .services import run_record_comparisons, run_record_results, run_record_samples, run_update_progress

if TYPE_CHECKING:
    from .step_io import StepContext

log = logging.getLogger(__name__)


# --- the space: config paths -> Optuna distributions


def field_kind(path: str) -> tuple[str, Any]:
    """("int" | "float" | "choice", the pydantic field) of a fine-tune config path a sweep may vary."""
    import typing

    from .forms import _core_type, schema_field

    info = schema_field(path)
    annotation = _core_type(info.annotation)
    if annotation is bool or typing.get_origin(annotation) is typing.Literal:
        return "choice", info
    if annotation is int:
        return "int", info
    if annotation is float:
        return "float", info
    return "choice", info  # a list or a word (target modules): values only


def distributions(space: Mapping[str, Any]) -> dict[str, Any]:
    """The Optuna distribution of each swept path: a list is categorical, a range int or float (log if asked)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for path, spec in space.items():
        if isinstance(spec, list):
            out[path] = CategoricalDistribution([_hashable(v) for v in spec])
        elif field_kind(path)[0] == "int":
            out[path] = IntDistribution(int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")))
        else:
            out[path] = FloatDistribution(float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
    return out


def _hashable(value: Any) -> Any:
    """Optuna's categorical choices are None, bool, int, float or str: a list value (target modules) as a comma list."""
    return ",".join(value) if isinstance(value, list) else value


def _config_value(path: str, value: Any) -> Any:
    if path == "training.lora.target_modules" and isinstance(value, str) and value != "all-linear":
        return [v for v in value.split(",") if v]
    return value


def grid_points(space: Mapping[str, Any]) -> int:
    return len(list(itertools.product(*(spec for spec in space.values() if isinstance(spec, list)))))


def total_trials(config: Mapping[str, Any]) -> int:
    sweep = config["sweep"]
    return min(sweep["trials"], grid_points(sweep["space"])) if sweep["method"] == "grid" else sweep["trials"]


def trial_config(config: Mapping[str, Any], params: Mapping[str, Any], number: int) -> dict[str, Any]:
    """A trial's fine-tune config: the sweep's, with the trial's values at their paths."""
    trial = copy.deepcopy(dict(config))
    trial.pop("sweep", None)
    trial["kind"] = "finetune"
    trial["name"] = f"{config['name']} · trial {number}"[:200]
    for path, value in params.items():
        *parents, leaf = path.split(".")
        node = trial
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _config_value(path, value)
    return trial


# --- the study


def storage_url() -> str:
    """Optuna's storage in the project's own database (PostgreSQL served, SQLite embedded)."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or ""
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    return f"postgresql+psycopg://{auth}{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{db['NAME']}"


def study_name(run: PipelineRun) -> str:
    return f"sweep-{run.pk}-{run.created_at:%Y%m%d%H%M%S%f}"


def preload_study_storage() -> None:
    """Import Optuna and what its RDB storage loads on first use (SQLAlchemy, Alembic, the PostgreSQL dialect), by
    opening a throwaway in-memory SQLite study storage: a worker calls this before it forks its jobs, which then
    open the sweep's study in about 0.15 s instead of 1.3 s (measured). No connection to a real database is made."""
    import optuna
    import sqlalchemy.dialects.postgresql.psycopg  # noqa: F401 - the dialect served mode's storage URL names

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.storages.RDBStorage("sqlite://").engine.dispose()


def open_study(run: PipelineRun, *, create: bool = False):
    """The sweep's study. Only the plan step (`create`) creates Optuna's tables and checks their version; the
    bookkeeping jobs after it open the study as it is."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep = run.config["sweep"]
    engine_kwargs = {"connect_args": {"timeout": 30}} if storage_url().startswith("sqlite") else {"pool_pre_ping": True}
    storage = optuna.storages.RDBStorage(storage_url(), engine_kwargs=engine_kwargs,
                                         skip_table_creation=not create, skip_compatibility_check=not create)
    study = optuna.create_study(study_name=study_name(run), storage=storage, direction="maximize", load_if_exists=True)
    # Each job opens the study afresh: a sampler seeded alike every time would draw the same point again, so the
    # seed moves on with the trials asked so far (the sequence stays reproducible from sweep.seed).
    seed = sweep["seed"] + len(study.trials)
    samplers = {
        "grid": lambda: optuna.samplers.GridSampler({p: [_hashable(v) for v in s] for p, s in sweep["space"].items()}, seed=sweep["seed"]),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, sweep["trials"] // 3))),
    }
    study.sampler = samplers[sweep["method"]]()
    return study


def _start_trial(ctx: StepContext, study) -> int | None:
    """Ask Optuna for a trial and start it as a child run, while the sweep has room (trials left, fewer than
    `parallel` in flight); returns the child's id. Asked first, then the room is checked under the parent's lock:
    a trial that finds no room is told to Optuna as failed ("no room"), never run."""
    from .pipeline import add_child_run

    config = ctx.config
    trial = study.ask(distributions(config["sweep"]["space"]))
    try:
        child = add_child_run(run_id=ctx.run_id, graph=ctx.graph, step="trial", key=f"trial-{trial.number}",
                              config=trial_config(config, trial.params, trial.number),
                              payload={"optuna_trial": trial.number, "params": trial.params},
                              room=lambda jobs: _room(config, jobs))
    except Exception:
        _tell(study, trial.number, None)
        raise
    if child is None:
        _tell(study, trial.number, None)
        return None
    ctx.log(f"trial {trial.number} started as run #{child}: " + ", ".join(f"{p}={v}" for p, v in trial.params.items()))
    return child


def _room(config: Mapping[str, Any], jobs: list[Job]) -> bool:
    trials = [j for j in jobs if j.step == "trial"]
    in_flight = [j for j in trials if j.state == JobState.WAITING]
    return len(trials) < total_trials(config) and len(in_flight) < config["sweep"]["parallel"]


def _tell(study, number: int, value: float | None) -> None:
    """Tell Optuna a trial's value (None: failed). The grid sampler would call `study.stop()` when its grid is used up,
    which Optuna refuses outside `optimize` (ask-and-tell has no loop to stop): the telling is done with a sampler
    that does nothing after a trial, then the sweep's own is put back."""
    import optuna
    from optuna.trial import TrialState

    sampler, study.sampler = study.sampler, optuna.samplers.RandomSampler()
    try:
        if value is None:
            study.tell(number, state=TrialState.FAIL)
        else:
            study.tell(number, value)
    finally:
        study.sampler = sampler


def plan_step(ctx: StepContext) -> dict[str, Any]:
    """The study, and the first `parallel` trials."""
    study = open_study(ctx.run, create=True)
    first = min(ctx.config["sweep"]["parallel"], total_trials(ctx.config))
    started = [child for child in (_start_trial(ctx, study) for _ in range(first)) if child is not None]
    return {"study": study.study_name, "started": started, "trials": total_trials(ctx.config)}


def trial_score(child_id: int, metric: str) -> dict[str, Any] | None:
    """A child's objective: its chosen checkpoint's selection score (mean, interval, rows), or None."""
    chosen = Job.objects.filter(run_id=child_id, step="select", state=JobState.DONE).values_list("output", flat=True).first()
    if not chosen:
        return None
    point = next((p for p in chosen.get("points", []) if p["step"] == chosen.get("chosen_step")), None)
    if point is None or point.get("mean") is None:
        return None
    return {"step": chosen["chosen_step"], "metric": metric, **{k: point.get(k) for k in ("mean", "ci_low", "ci_high", "n")}}


def tell_step(ctx: StepContext) -> dict[str, Any]:
    """A trial ended: Optuna hears its selection score (a failed child: a failed trial); the next trial starts."""
    trial_job = Job.objects.get(pk=ctx.payload["followed"])
    number = trial_job.payload["optuna_trial"]
    study = open_study(ctx.run)
    score = trial_score(trial_job.child_id, ctx.config["selection"]["metric"]) if trial_job.child_id and trial_job.state == JobState.DONE else None
    if not study.trials[number].state.is_finished():
        _tell(study, number, None if score is None else score["mean"])
    ended = Job.objects.filter(run_id=ctx.run_id, step="trial", state__in=[JobState.DONE, JobState.FAILED, JobState.CANCELLED]).count()
    run_update_progress(run_id=ctx.run_id, progress=1 + int(85 * ended / max(total_trials(ctx.config), 1)),
                        stage=f"{ended} of {total_trials(ctx.config)} trials ended")
    ctx.log(f"trial {number} (run #{trial_job.child_id}) ended {trial_job.state}: "
            + (f"selection {score['metric']} {score['mean']:.4f}" if score else "no selection score: a failed trial"))
    started = _start_trial(ctx, study) if _room(ctx.config, list(Job.objects.filter(run_id=ctx.run_id))) else None
    return {"trial": number, "value": score["mean"] if score else None, "started": started}


@dataclass
class Winner:
    child_id: int
    trial: int
    params: dict[str, Any]
    score: dict[str, Any]
    reason: str
    trials: list[dict[str, Any]]


def pick_step(ctx: StepContext) -> Winner:
    """The winner: the highest selection score among the trials that completed (the earlier trial on a tie)."""
    metric = ctx.config["selection"]["metric"]
    rows = []
    for job in Job.objects.filter(run_id=ctx.run_id, step="trial").order_by("id"):
        status = PipelineRun.objects.filter(pk=job.child_id).values_list("status", flat=True).first() if job.child_id else None
        score = trial_score(job.child_id, metric) if status == RunStatus.COMPLETED else None
        rows.append({"trial": job.payload.get("optuna_trial"), "child": job.child_id, "params": job.payload.get("params", {}),
                     "status": status or "deleted", "score": score})
    scored = [r for r in rows if r["score"] is not None]
    if not scored:
        raise ValueError(f"no trial completed with a selection score ({len(rows)} trial(s): "
                         + ", ".join(f"#{r['child']} {r['status']}" for r in rows) + "): there is no winner")
    best = max(scored, key=lambda r: (r["score"]["mean"], -r["trial"]))
    runner = max((r for r in scored if r is not best), key=lambda r: (r["score"]["mean"], -r["trial"]), default=None)
    reason = (f"trial {best['trial']} (run #{best['child']}): the highest selection {metric} of {len(scored)} scored trial(s), "
              f"{best['score']['mean']:.4f} [{best['score']['ci_low']:.4f}, {best['score']['ci_high']:.4f}] over {best['score']['n']} rows")
    if runner is not None:
        reason += f"; next trial {runner['trial']} with {runner['score']['mean']:.4f}"
    ctx.log(f"sweep winner: {reason}")
    return Winner(child_id=best["child"], trial=best["trial"], params=best["params"], score=best["score"], reason=reason, trials=rows)


def store_winner(ctx: StepContext, winner: Winner) -> None:
    """The sweep carries the winner's answers, scores and results (its claim), by copy; the winner by reference."""
    samples = SampleResult.objects.filter(run_id=winner.child_id)
    run_record_samples(run_id=ctx.run_id, samples=[
        {"dataset_id": s.dataset_id, "variant": s.variant, "index": s.index, "question": s.question, "contexts": s.contexts,
         "ground_truth": s.ground_truth, "answer": s.answer, "cut_off": s.cut_off, "scores": s.scores, "reasons": s.reasons}
        for s in samples
    ])
    run_record_results(run_id=ctx.run_id, results=[
        {"dataset_id": r.dataset_id, "variant": r.variant, "metric": r.metric, "value": r.value, "n_scored": r.n_scored,
         "n_failed": r.n_failed, "failure_reasons": r.failure_reasons} for r in RunResult.objects.filter(run_id=winner.child_id)
    ])
    fields = ("dataset_id", "metric", "n_pairs", "n_excluded", "base_mean", "finetuned_mean", "delta", "ci_low", "ci_high", "p_value",
              "p_adjusted", "verdict", "method")
    run_record_comparisons(run_id=ctx.run_id, comparisons=[
        {f: getattr(c, f) for f in fields} for c in ScoreComparison.objects.filter(run_id=winner.child_id)
    ])
    ctx.output = {"winner": winner.child_id, "trial": winner.trial, "params": winner.params, "score": winner.score, "reason": winner.reason,
                  "trials": winner.trials}


def sweep_summary(run: PipelineRun) -> dict[str, Any] | None:
    """The sweep page and API: each trial (parameters, selection score with its interval, status, duration, the
    child), the winner and why, and (on request) each trial's eval verdict Holm-adjusted across the trials."""
    sweep = (run.config or {}).get("sweep")
    if not sweep:
        return None
    metric = run.config["selection"]["metric"]
    jobs = list(run.jobs.all())
    trial_jobs = [j for j in jobs if j.step == "trial"]
    children = {c.pk: c for c in PipelineRun.objects.filter(pk__in=[j.child_id for j in trial_jobs if j.child_id])}
    trials = []
    for job in trial_jobs:
        child = children.get(job.child_id)
        duration = (child.finished_at - child.started_at).total_seconds() if child and child.started_at and child.finished_at else None
        trials.append({
            "trial": job.payload.get("optuna_trial"), "key": job.key, "child": job.child_id, "params": job.payload.get("params", {}),
            "status": child.status if child else "deleted", "score": trial_score(child.pk, metric) if child else None,
            "seconds": duration, "started_at": child.started_at if child else None, "finished_at": child.finished_at if child else None,
        })
    pick = next((j.output for j in jobs if j.step == "pick" and j.state == JobState.DONE), None)
    return {
        "method": sweep["method"], "metric": metric, "space": sweep["space"], "planned": total_trials(run.config), "parallel": sweep["parallel"],
        "trials": trials, "winner": pick and {k: pick[k] for k in ("winner", "trial", "params", "score", "reason")},
    }


def trial_verdicts(run: PipelineRun) -> dict[str, Any]:
    """Every completed trial's eval verdict on the gate metric, its p-value Holm-adjusted across the trials (per
    eval dataset): looking at all of them is many tests, and the adjustment says so."""
    from statsmodels.stats.multitest import multipletests

    metric = (run.config.get("promotion") or {}).get("metric") or run.config["selection"]["metric"]
    children = [j.child_id for j in run.jobs.filter(step="trial") if j.child_id]
    rows = list(ScoreComparison.objects.filter(run_id__in=children, metric=metric).select_related("dataset").order_by("dataset_id", "run_id"))
    out: dict[str, list[dict[str, Any]]] = {}
    for dataset in sorted({r.dataset.name if r.dataset else "" for r in rows}):
        mine = [r for r in rows if (r.dataset.name if r.dataset else "") == dataset and r.p_value is not None]
        adjusted = multipletests([r.p_value for r in mine], method="holm")[1] if mine else []
        out[dataset] = [{"child": r.run_id, "delta": r.delta, "ci_low": r.ci_low, "ci_high": r.ci_high, "p_value": r.p_value,
                         "p_holm_across_trials": float(p),
                         "verdict": ("better" if r.delta > 0 else "worse") if p < 0.05 and r.delta else "no significant difference"}
                        for r, p in zip(mine, adjusted, strict=True)]
    return {"metric": metric, "trials": len(children), "datasets": out,
            "note": f"each trial's p-value Holm-adjusted across the {len(children)} trials of this sweep (per eval dataset)"}

