"""The job table and the engine (runs/pipeline.py, runs/kinds/base.py): claims, double delivery, failures, cancels,
fan-out and fan-in, the derived status, lost attempts, and child runs.

Kinds made for these tests are registered for the test only (`test_kind`): small graphs whose bodies are plain
functions, so the engine's rules are seen without a model in the way.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Literal

import pytest
from django.db import connection

from runs import pipeline
from runs.config import RunConfig
from runs.kinds import KINDS
from runs.kinds.base import CPU, FINISHED_STATES, NO_QUEUE, Graph, JobView, Kind, Step
from runs.models import Job, PipelineRun, RunEvent, RunResult, RunStatus, SampleResult
from runs.pipeline import drive_inline, inline_foreground, run_job
from runs.services import job_claim, job_finish, run_cancel, run_create
from tests.runs.factories import eval_only_config, replace_step

pytestmark = pytest.mark.django_db(transaction=True)
EVALUATING = RunStatus.EVALUATING


def created(user, config) -> PipelineRun:
    with inline_foreground():  # created, not driven: the test runs the jobs
        return run_create(config=config, owner=user)


# --- the graph, as data


def views(*jobs: tuple[str, str, str]) -> list[JobView]:
    return [JobView(step=step, key=key, state=state, started=state != "queued") for step, key, state in jobs]


FAN = Graph((
    Step("plan", CPU, EVALUATING, None, "plan"),
    Step("part", CPU, EVALUATING, None, "part", spawned_by="plan"),
    Step("merge", CPU, EVALUATING, None, "merge", after=("plan", "part")),
))


def test_fan_in_waits_for_every_keyed_job_and_for_the_step_that_adds_them():
    assert [s.name for s in FAN.ready([])] == ["plan"]
    assert FAN.ready(views(("plan", "", "running"), ("part", "1", "done"))) == []  # plan may still add parts
    assert FAN.ready(views(("plan", "", "done"), ("part", "1", "done"), ("part", "2", "running"))) == []
    assert [s.name for s in FAN.ready(views(("plan", "", "done"), ("part", "1", "done"), ("part", "2", "done")))] == ["merge"]
    assert [s.name for s in FAN.ready(views(("plan", "", "done")))] == ["merge"]  # no part at all is fine


def test_the_status_is_derived_from_the_jobs():
    assert FAN.status_of([], "pending") == "pending"
    assert FAN.status_of(views(("plan", "", "queued")), "pending") == "pending"
    assert FAN.status_of(views(("plan", "", "running")), "pending") == EVALUATING
    done = views(("plan", "", "done"), ("part", "1", "done"), ("merge", "", "done"))
    assert FAN.status_of(done, EVALUATING) == "completed"
    assert FAN.status_of(done, "cancelled") == "cancelled"  # a terminal status stays
    assert FAN.progress({"plan": 1.0}) == 1 + 98 // 3 and FAN.progress({"plan": 1.0, "part": 1.0, "merge": 1.0}) == 99


def test_a_graph_refuses_unknown_or_later_steps_in_after():
    with pytest.raises(ValueError, match="unknown steps"):
        Graph((Step("a", CPU, EVALUATING, None, "a", after=("nope",)),))
    with pytest.raises(ValueError, match="later step"):
        Graph((Step("a", CPU, EVALUATING, None, "a", after=("b",)), Step("b", CPU, EVALUATING, None, "b")))
    assert FINISHED_STATES == {"done", "failed", "cancelled"}


# --- a kind made for these tests


class FanConfig(RunConfig):
    kind: Literal["fan"]  # type: ignore[assignment]


class FanKind(Kind):
    name = "fan"
    label = "fan test"
    config_model = FanConfig
    path = (RunStatus.PENDING, EVALUATING, RunStatus.COMPLETED)

    def __init__(self, graph: Graph) -> None:
        self._graph = graph

    def graph(self, config: Mapping[str, Any], *, has_parent: bool = False) -> Graph:
        return self._graph

    def main_variant(self, config: Mapping[str, Any]) -> str:
        return "base"

    def generated_variants(self, config: Mapping[str, Any]) -> list[str]:
        return []


@pytest.fixture
def test_kind(monkeypatch):
    def register(graph: Graph) -> str:
        monkeypatch.setitem(KINDS, "fan", FanKind(graph))
        return "fan"

    return register


def fan_config(**overrides) -> dict:
    return {"name": "fan", "kind": "fan", "datasets": {"eval": ["ragas_eval"]}, **overrides}


def test_a_step_starts_only_when_every_job_it_waits_for_is_done(user, test_kind):
    ran: list[str] = []

    def plan(ctx):
        ran.append("plan")
        for key in ("a", "b", "c"):
            assert ctx.add_job("part", key, {"n": key})
        assert not ctx.add_job("part", "a")  # a second add of the same key is refused, not doubled

    def part(ctx):
        assert not Job.objects.filter(run_id=ctx.run_id, step="merge").exists()  # merge waits for every part
        ran.append(f"part:{ctx.key}:{ctx.payload['n']}")

    def merge(ctx):
        ran.append("merge")

    test_kind(Graph((
        Step("plan", CPU, EVALUATING, plan, "plan"),
        Step("part", CPU, EVALUATING, part, "part", spawned_by="plan"),
        Step("merge", CPU, EVALUATING, merge, "merge", after=("plan", "part")),
    )))
    run = created(user, fan_config())
    drive_inline(run.pk)
    run.refresh_from_db()
    assert run.status == "completed", run.logs
    assert ran == ["plan", "part:a:a", "part:b:b", "part:c:c", "merge"]
    assert list(run.jobs.values_list("step", "key", "state")) == [
        ("plan", "", "done"), ("part", "a", "done"), ("part", "b", "done"), ("part", "c", "done"), ("merge", "", "done"),
    ]
    assert [(e.from_status, e.to_status) for e in run.events.all()] == [("pending", "pending"), ("pending", EVALUATING), (EVALUATING, "completed")]


@pytest.mark.skipif("connection.vendor != 'postgresql'", reason="SQLite serializes every writer: no two finishes at once to race")
def test_two_keyed_jobs_finishing_at_once_start_the_next_step_exactly_once(user, test_kind, rq_settings):
    """Served mode (real RQ queues, no worker): the test's threads are the workers."""
    gate = threading.Barrier(2, timeout=30)

    def plan(ctx):
        ctx.add_job("part", "1")
        ctx.add_job("part", "2")

    def part(ctx):
        gate.wait()  # both bodies end together; their finishing transactions race

    test_kind(Graph((
        Step("plan", CPU, EVALUATING, plan, "plan"),
        Step("part", CPU, EVALUATING, part, "part", spawned_by="plan"),
        Step("merge", CPU, EVALUATING, lambda ctx: None, "merge", after=("plan", "part")),
    )))
    run = created(user, fan_config())
    run_job(run.jobs.get(step="plan").pk)
    parts = list(run.jobs.filter(step="part").values_list("pk", flat=True))

    def work(job_id: int) -> None:
        try:
            run_job(job_id)
        finally:
            connection.close()

    threads = [threading.Thread(target=work, args=(pk,)) for pk in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert run.jobs.filter(step="merge").count() == 1
    assert list(run.jobs.filter(step="part").values_list("state", flat=True)) == ["done", "done"]
    run_job(run.jobs.get(step="merge").pk)
    assert PipelineRun.objects.get(pk=run.pk).status == "completed"


def test_a_job_delivered_twice_runs_once(user, monkeypatch):
    run = created(user, eval_only_config())
    calls = []
    from evaluation.steps import score_step

    def body(ctx):
        calls.append(ctx.job_id)
        return score_step(ctx)

    replace_step(monkeypatch, "score", body=body)
    (job,) = run.jobs.all()
    run_job(job.pk)
    run_job(job.pk)  # the redelivery finds the job done and does nothing
    assert calls == [job.pk]
    assert RunEvent.objects.filter(run=run, to_status="completed").count() == 1
    job.refresh_from_db()
    assert (job.state, job.attempts) == ("done", 1) and job.figures["seconds"] >= 0 and job.figures["peak_rss_bytes"] > 0


def test_the_last_job_completes_the_run_with_its_results(user):
    run = created(user, eval_only_config())
    drive_inline(run.pk)
    run.refresh_from_db()
    assert (run.status, run.progress) == ("completed", 100)
    assert RunResult.objects.filter(run=run).count() == 2 and SampleResult.objects.filter(run=run).count() == 4
    assert run.events.last().message == "score finished"
    assert run.jobs.get().output == {"scored": {"ragas_eval/dataset": 4}}


def test_a_body_that_raises_fails_its_job_and_the_run_and_stores_nothing(user, monkeypatch):
    run = created(user, eval_only_config())

    def body(ctx):
        raise ValueError("the engine broke")

    replace_step(monkeypatch, "score", body=body)
    with pytest.raises(ValueError):
        drive_inline(run.pk)
    run.refresh_from_db()
    assert run.status == "failed" and run.error == "score failed: ValueError: the engine broke"
    assert "Traceback" in run.logs and not run.results.exists()
    job = run.jobs.get()
    assert job.state == "failed" and job.error == run.error


def test_a_store_that_raises_leaves_neither_results_nor_completion(user, monkeypatch):
    """Storing a job's output, finishing it and moving the run on are one transaction."""
    from runs.step_io import store_scores

    run = created(user, eval_only_config())

    def store(ctx, output):
        store_scores(ctx, output)  # the samples and results are written...
        raise RuntimeError("the disk went away")  # ...and then rolled back with the rest

    replace_step(monkeypatch, "score", store=store)
    with pytest.raises(RuntimeError):
        drive_inline(run.pk)
    run.refresh_from_db()
    assert run.status == "failed" and run.jobs.get().state == "failed"
    assert not RunResult.objects.filter(run=run).exists() and not SampleResult.objects.filter(run=run).exists()


def test_a_run_cancelled_while_its_job_worked_keeps_no_results(user, monkeypatch):
    from evaluation.steps import score_step

    run = created(user, eval_only_config())

    def body(ctx):
        produced = score_step(ctx)
        run_cancel(run_id=ctx.run_id, message="cancelled by the test")
        return produced

    replace_step(monkeypatch, "score", body=body)
    drive_inline(run.pk)
    run.refresh_from_db()
    assert run.status == "cancelled" and run.jobs.get().state == "cancelled"
    assert not RunResult.objects.filter(run=run).exists() and not SampleResult.objects.filter(run=run).exists()
    assert "score stopped: run is cancelled" in run.logs


def test_a_lost_attempt_cannot_finish_a_job_given_to_the_next_attempt(user):
    from runs.services import job_requeue_lost

    run = created(user, eval_only_config())
    (job,) = run.jobs.all()
    first = job_claim(job_id=job.pk, worker="host-a:1")
    assert job_requeue_lost(job_id=job.pk, attempt=first, message="worker lost; sending the score job again")
    second = job_claim(job_id=job.pk, worker="host-b:2")
    assert (first, second) == (1, 2)
    assert not job_finish(job_id=job.pk, attempt=first)  # the first worker wakes up late: refused
    assert job_finish(job_id=job.pk, attempt=second)
    assert Job.objects.get(pk=job.pk).worker == "host-b:2"


# --- parent and child runs


def parent_graph(*, tolerate: bool) -> Graph:
    def spawn(ctx):
        for key, answers in (("ok", "dataset"), ("bad", "dataset")):
            ctx.add_child_run("child", key, eval_only_config(name=f"child-{key}", evaluation={"answers": answers, "metrics": ["rouge_score"],
                                                                                             "max_samples": 2}))

    return Graph((
        Step("spawn", CPU, EVALUATING, spawn, "spawn"),
        Step("child", NO_QUEUE, EVALUATING, None, "a child run", spawned_by="spawn", tolerate_failure=tolerate),
        Step("pick", CPU, EVALUATING, lambda ctx: {"children": sorted(j.state for j in Job.objects.filter(run_id=ctx.run_id, step="child"))},
             "pick", after=("spawn", "child")),
    ))


def wait_for(condition, seconds: float = 60) -> None:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not condition():
        time.sleep(0.1)
    assert condition()


@pytest.mark.parametrize("tolerate", [True, False], ids=["tolerated", "fails-the-parent"])
def test_a_child_failing_ends_its_parents_job_and_the_step_says_whether_the_parent_goes_on(user, test_kind, monkeypatch, tolerate):
    from evaluation.steps import score_step

    def score(ctx):
        if ctx.run.name == "child-bad":
            raise RuntimeError("this trial broke")
        return score_step(ctx)

    replace_step(monkeypatch, "score", body=score)
    test_kind(parent_graph(tolerate=tolerate))
    parent = created(user, fan_config())
    drive_inline(parent.pk)  # runs spawn, then waits while the children run in threads of their own
    wait_for(lambda: PipelineRun.objects.get(pk=parent.pk).is_terminal)
    parent.refresh_from_db()
    children = {c.name: c for c in PipelineRun.objects.filter(parent=parent)}
    jobs = {j.key: j for j in parent.jobs.filter(step="child")}
    assert children["child-bad"].status == "failed" and jobs["bad"].child_id == children["child-bad"].pk
    assert jobs["bad"].state == "failed" and "this trial broke" in jobs["bad"].error
    if tolerate:
        assert children["child-ok"].status == "completed" and jobs["ok"].state == "done"
        assert parent.status == "completed", parent.logs
        assert parent.jobs.get(step="pick").output == {"children": ["done", "failed"]}
    else:  # the parent failed: a child still running then was cancelled with it, one that had ended stays as it ended
        assert parent.status == "failed" and f"child run #{children['child-bad'].pk} ended failed" in parent.error
        # (a child that completed just after its parent failed keeps `completed`; the parent's job for it was cancelled)
        assert (children["child-ok"].status, jobs["ok"].state) in {("completed", "done"), ("completed", "cancelled"), ("cancelled", "cancelled")}
        assert not PipelineRun.objects.filter(parent=parent).exclude(status__in=["completed", "failed", "cancelled"]).exists()


def test_cancelling_a_parent_cancels_its_unfinished_children(user, test_kind, monkeypatch):
    started = threading.Event()

    def slow(ctx):
        started.set()
        while True:
            ctx.check_cancelled(now=True)
            import time

            time.sleep(0.05)

    replace_step(monkeypatch, "score", body=slow)
    test_kind(parent_graph(tolerate=True))
    parent = created(user, fan_config())
    driver = threading.Thread(target=lambda: (drive_inline(parent.pk), connection.close()))
    driver.start()
    assert started.wait(60)
    run_cancel(run_id=parent.pk, message="cancelled by the test")
    wait_for(lambda: not PipelineRun.objects.filter(parent=parent).exclude(status__in=["cancelled", "failed", "completed"]).exists())
    driver.join(timeout=30)
    assert set(PipelineRun.objects.filter(parent=parent).values_list("status", flat=True)) == {"cancelled"}
    assert not Job.objects.filter(run__parent=parent, state__in=["queued", "running", "waiting"]).exists()
    # every driver thread lets go of its run (a child's thread finishes its job's bookkeeping after the child ended)
    wait_for(lambda: pipeline._driven == set())


def test_the_api_and_the_run_page_show_a_childs_parent_and_a_parents_children(user, client):
    from tests.conftest import token_client
    from tests.runs.factories import make_run

    parent = make_run(user, status="training")
    child = make_run(user, status="pending", parent=parent)
    api = token_client(user)
    assert api.get(f"/api/runs/{child.pk}/").json()["parent"] == parent.pk
    body = api.get(f"/api/runs/{parent.pk}/").json()
    assert body["parent"] is None and body["children"] == [child.pk]
    assert api.get("/api/runs/").json()["results"][0]["parent"] == parent.pk  # the list too (newest first: the child)
    client.force_login(user)
    assert f'trial of <a href="/runs/{parent.pk}/">run #{parent.pk}</a>' in client.get(f"/runs/{child.pk}/").content.decode()


def test_an_on_demand_job_runs_on_a_completed_run_and_a_failed_one_fails_only_itself(user, test_kind):
    outcomes = iter(["ok", "broken"])

    def export(ctx):
        if next(outcomes) == "broken":
            raise RuntimeError("the disk is full")
        return {"exported": ctx.key}

    kind = test_kind(Graph((
        Step("work", CPU, EVALUATING, lambda ctx: None, "work"),
        Step("export", CPU, EVALUATING, export, "export", on_demand=True),
    )))
    run = created(user, fan_config())
    drive_inline(run.pk)
    run.refresh_from_db()
    assert run.status == "completed" and list(run.jobs.values_list("step", flat=True)) == ["work"]  # nothing waited for an export
    graph = KINDS[kind].graph(run.config)
    # Inline, each request is carried out by a driver thread of this process, as a page's would be.
    assert pipeline.add_job(run_id=run.pk, graph=graph, step="export", key="1")
    assert not pipeline.add_job(run_id=run.pk, graph=graph, step="export", key="1")  # asked twice: one job
    wait_for(lambda: run.jobs.get(key="1").state == "done")
    assert run.jobs.get(key="1").output == {"exported": "1"}
    assert pipeline.add_job(run_id=run.pk, graph=graph, step="export", key="2")
    wait_for(lambda: run.jobs.get(key="2").state == "failed")
    run.refresh_from_db()
    assert run.status == "completed" and run.jobs.get(key="2").state == "failed" and "the disk is full" in run.jobs.get(key="2").error
    with pytest.raises(ValueError, match="neither spawned_by"):
        pipeline.add_job(run_id=run.pk, graph=graph, step="work", key="x")
