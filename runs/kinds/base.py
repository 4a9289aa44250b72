"""What a kind of run is made of: its steps (a graph of jobs), the policies for lost jobs, and the Kind itself.

A run is a graph of jobs. Each kind module (runs/kinds/<kind>.py) declares its
`Graph`: the steps, which queue each runs on, the run's status while it is
unfinished, what it waits for (`after`: fan-in) and whether its jobs are added
by a running step (`spawned_by`: fan-out, one keyed job per checkpoint or
trial). The engine (runs/pipeline.py) reads the graph to know which jobs to
create next and what the run's status is (`Graph.status_of`, the one function
that derives it); the reaper reads each step's `on_lost` policy.

Nothing here touches the database: a graph is data, computed from a run's
validated config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..models import TERMINAL_STATUSES, JobState, RunStatus

if TYPE_CHECKING:
    from pydantic import BaseModel

    from ..models import PipelineRun

GPU, CPU = "gpu", "cpu"
# A step whose jobs wait for a child run, not for a worker.
NO_QUEUE = ""


# --- what happens to a job whose worker was lost (its heartbeat stopped)


@dataclass(frozen=True)
class Lost:
    """The reaper's decision for one lost job: send it again (`retry`), or fail the run with `reason`."""

    retry: bool
    message: str


class LostPolicy(Protocol):
    def decide(self, *, job: JobFacts, config: Mapping[str, Any], reason: str) -> Lost: ...


@dataclass(frozen=True)
class JobFacts:
    """What a lost-job policy may know of the job (plain values: the reaper reads them from the row)."""

    step: str
    key: str
    attempts: int
    checkpoint_step: int | None


@dataclass(frozen=True)
class FailRun:
    """The work cannot be redone safely or cheaply: the run fails, saying why."""

    def decide(self, *, job: JobFacts, config: Mapping[str, Any], reason: str) -> Lost:
        return Lost(retry=False, message=reason)


@dataclass(frozen=True)
class Retry:
    """An idempotent job (scoring, a registration): sent again, up to `attempts` in all."""

    attempts: int = 3

    def decide(self, *, job: JobFacts, config: Mapping[str, Any], reason: str) -> Lost:
        if job.attempts >= self.attempts:
            return Lost(retry=False, message=f"{reason}; {job.attempts} attempts of {self.attempts} used")
        return Lost(retry=True, message=f"{reason}; sending the {job.step} job again (attempt {job.attempts + 1} of {self.attempts})")


@dataclass(frozen=True)
class ResumeFromCheckpoint:
    """A fine-tune: sent again and resumed from its last checkpoint while training.max_attempts allows."""

    def decide(self, *, job: JobFacts, config: Mapping[str, Any], reason: str) -> Lost:
        limit = int((config.get("training") or {}).get("max_attempts", 1))
        if job.checkpoint_step is None or job.attempts >= limit:
            if job.attempts > 1:
                reason += f"; {job.attempts} attempts of training.max_attempts {limit} used"
            elif job.checkpoint_step is None and limit > 1:
                reason += "; no checkpoint to resume from yet"
            return Lost(retry=False, message=reason)
        return Lost(retry=True, message=(
            f"{reason}; resuming from step {job.checkpoint_step} after the worker was lost (attempt {job.attempts + 1} of {limit})"
        ))


FAIL = FailRun()
RETRY = Retry()
RESUME = ResumeFromCheckpoint()


# --- the graph


@dataclass(frozen=True)
class Step:
    name: str
    queue: str  # gpu, cpu, or NO_QUEUE for a job that waits for a child run
    status: str  # the run's status while this step is unfinished
    body: Callable[[Any], Any] | None
    label: str
    # Stores the body's output in the database; runs inside the transaction that finishes the job. No MLflow call here.
    store: Callable[[Any, Any], None] | None = None
    # Writes the body's work product to the run's MLflow run (artifacts, metrics); after the body, before the store's
    # transaction, never inside it. Registrations and aliases are follow-up steps of their own, not publishing.
    publish: Callable[[Any, Any], None] | None = None
    after: tuple[str, ...] = ()  # fan-in: this step's job is created once every job of these steps has ended
    spawned_by: str = ""  # fan-out: jobs of this step are added (keyed) by a running job of that step
    # A job of this step is added, keyed like it, each time a job of step `follows` ends (a sweep's `tell` after each trial).
    follows: str = ""
    # Jobs of this step are added on request by a service (an export of a completed fine-tune), also after the run
    # completed; nothing waits for them, and a failed one fails only itself.
    on_demand: bool = False
    on_lost: LostPolicy = FAIL
    tolerate_failure: bool = False  # a failed job of this step does not fail the run (its fan-in counts it as ended)
    # What the step measured, read from its output (a fine-tune's device, dtype, tokens/s), stored as the job's figures.
    figures: Callable[[Any], dict[str, Any]] | None = None
    weight: int = 1  # its share of the run's progress bar

    @property
    def spawned(self) -> bool:
        return bool(self.spawned_by or self.follows)

    @property
    def spawner(self) -> str:
        return self.spawned_by or self.follows


@dataclass(frozen=True)
class JobView:
    """A job as the graph sees it."""

    step: str
    key: str
    state: str
    started: bool  # claimed at least once


FINISHED_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True)
class Graph:
    steps: tuple[Step, ...]
    _index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"a step appears twice in {names}")
        self._index.update({name: i for i, name in enumerate(names)})
        for step in self.steps:
            unknown = [a for a in (*step.after, step.spawned_by, step.follows) if a and a not in self._index]
            if unknown:
                raise ValueError(f"step {step.name} names unknown steps {unknown}")
            if any(self._index[a] >= self._index[step.name] for a in step.after):
                raise ValueError(f"step {step.name} waits for a later step: list the steps in the order they can run")

    def step(self, name: str) -> Step:
        return self.steps[self._index[name]]

    def has(self, name: str) -> bool:
        return name in self._index

    def position(self, name: str) -> int:
        return self._index[name]

    def followers(self, name: str) -> list[Step]:
        """The steps a job of `name` is followed by when it ends."""
        return [s for s in self.steps if s.follows == name]

    @property
    def queues(self) -> dict[str, str]:
        return {s.name: s.queue for s in self.steps}

    def _ended(self, step: Step, jobs: list[JobView]) -> bool:
        """Every job the step will ever have has ended (and a step that is not spawned has its job)."""
        if step.on_demand:
            return True
        mine = [j for j in jobs if j.step == step.name]
        ok = {JobState.DONE} | (FINISHED_STATES if step.tolerate_failure else set())
        if step.spawned:
            return self._ended(self.step(step.spawner), jobs) and all(j.state in ok for j in mine)
        return bool(mine) and all(j.state in ok for j in mine)

    def ready(self, jobs: Iterable[JobView]) -> list[Step]:
        """Steps whose job can be created now: not created yet, and everything they wait for has ended."""
        jobs = list(jobs)
        created = {j.step for j in jobs}
        return [
            s for s in self.steps
            if not s.spawned and not s.on_demand and s.name not in created and all(self._ended(self.step(a), jobs) for a in s.after)
        ]

    def complete(self, jobs: Iterable[JobView]) -> bool:
        jobs = list(jobs)
        return all(self._ended(s, jobs) for s in self.steps)

    def status_of(self, jobs: Iterable[JobView], current: str) -> str:
        """The run's status, derived from its jobs: the one rule.

        A terminal status stays. Every step ended: completed. Nothing claimed yet:
        pending. Otherwise the status of the earliest step (in graph order) that
        still has an unfinished job.
        """
        if current in TERMINAL_STATUSES:
            return current
        jobs = list(jobs)
        if self.complete(jobs):
            return RunStatus.COMPLETED
        if not any(j.started or j.state in FINISHED_STATES for j in jobs if not self.step(j.step).on_demand):
            return RunStatus.PENDING
        unfinished = [j for j in jobs if j.state not in FINISHED_STATES and not self.step(j.step).on_demand]
        if not unfinished:  # between a job's end and the next one's creation (the same transaction creates it)
            return current
        return self.step(min(unfinished, key=lambda j: self.position(j.step)).step).status

    def progress(self, fractions: Mapping[str, float]) -> int:
        """The run's progress bar (1-99 while it runs) from each step's progress (0-1); 100 is for `completed`."""
        total = sum(s.weight for s in self.steps) or 1
        done = sum(s.weight * min(max(fractions.get(s.name, 0.0), 0.0), 1.0) for s in self.steps)
        return 1 + int(98 * done / total)


# --- a kind


class Kind:
    """One kind of run, declared once in its module: config, graph, what its pages and API show, its status path.

    Pages, API, reaper and engine ask the kind (`runs.kinds.kind_of(run)`)
    rather than comparing `run.kind` with a name.
    """

    name: str = ""
    label: str = ""  # what the New run form calls it
    config_model: type[BaseModel]
    # The statuses a run of this kind goes through, in order (failed and cancelled may follow any unfinished one).
    path: tuple[str, ...] = ()
    # Page sections that apply: "training" (loss curve, steps, device), "data_check", "overlap", "playground", "registry".
    sections: frozenset[str] = frozenset()
    # Config sections (dotted prefixes) that play a part in the run (the compare page leaves the others out).
    config_sections: tuple[str, ...] = ("name", "kind", "model", "datasets.eval", "evaluation")

    def graph(self, config: Mapping[str, Any], *, has_parent: bool = False) -> Graph:
        raise NotImplementedError

    def graph_of(self, run: PipelineRun) -> Graph:
        return self.graph(run.config, has_parent=run.parent_id is not None)

    def main_variant(self, config: Mapping[str, Any]) -> str:
        """The variant the run is about (fine-tuned, stored answers, base)."""
        raise NotImplementedError

    def generated_variants(self, config: Mapping[str, Any]) -> list[str]:
        """The variants whose answers the run generates, in display order."""
        raise NotImplementedError

    def model_label(self, config: Mapping[str, Any], base_model: str) -> str:
        """What produced the answers, for the dashboard."""
        return base_model

    def data_check_config(self, config: Mapping[str, Any]) -> dict[str, Any] | None:
        """The fine-tune config whose data the check before launch reads (None: this kind trains nothing)."""
        return None

    def config_applies(self, field: str, config: Mapping[str, Any]) -> bool:
        """Whether a config field (dotted path) plays a part in a run of this kind with this config."""
        return any(field == s or field.startswith(s + ".") for s in self.config_sections)

    def transitions(self) -> dict[str, frozenset[str]]:
        """The status machine of this kind: each step of its path, and failed/cancelled from any unfinished status."""
        out: dict[str, frozenset[str]] = {}
        for current, following in zip(self.path, self.path[1:], strict=False):
            out[current] = frozenset({following, RunStatus.FAILED, RunStatus.CANCELLED})
        return out

    def shows(self) -> dict[str, bool]:
        return dict.fromkeys(self.sections, True)
