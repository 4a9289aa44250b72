"""Redis restarts (a test-owned redis-server, no persistence, like the machine's):
queued jobs vanish, sends fail while it is down. The database still says which
job each run waits for; the reaper sends lost jobs again, and the claim keeps
a job from running twice. No run is lost, none runs twice, no result doubles."""

from __future__ import annotations

import pytest
from rq import Queue
from rq.job import Job as RqJob

from runs.models import ACTIVE_STATUSES, Job, PipelineRun, RunEvent, RunResult, SampleResult
from runs.pipeline import run_job
from runs.queues import MAX_RESENDS, send_job
from runs.reaper import requeue_lost_jobs
from tests.conftest import status_changes, token_client
from tests.runs.factories import eval_only_config

from . import fault_tools
from .fault_tools import SHORT_FINETUNE, wait_until

owned_redis, owned_rq_settings, processes = fault_tools.owned_redis_fixture, fault_tools.owned_rq_settings_fixture, fault_tools.processes_fixture

pytestmark = [pytest.mark.reliability, pytest.mark.django_db(transaction=True)]

EVAL = eval_only_config()  # scored on the cpu queue: rouge_score + string_presence, 4 samples


def redis_conn(owned_redis):
    import redis

    return redis.Redis.from_url(owned_redis.url)


def assert_ran_once(run_id: int, statuses: list[str], results: int, samples: int) -> PipelineRun:
    run = PipelineRun.objects.get(pk=run_id)
    assert run.status == "completed", f"{run.error}\n{run.logs}"
    assert status_changes(run) == statuses
    assert RunResult.objects.filter(run=run).count() == results
    assert SampleResult.objects.filter(run=run).count() == samples
    return run


@pytest.mark.pipeline
def test_queued_jobs_lost_with_a_redis_restart_or_never_sent_are_sent_again(owned_rq_settings, owned_redis, processes, user, ledger):
    ledger.record("fault", "Redis restarted while a run is queued", "its job is gone; the reaper sends it again; the busy worker (same process) survives and completes it once")
    ledger.record("fault", "Redis down while a run is created", "POST /api/runs/ still 201 (run pending, job marked queued); sent by the reaper once Redis is back; completed once")
    api = token_client(user)
    worker = processes.worker("cpu")
    queue = Queue("cpu", connection=redis_conn(owned_redis))
    # Keep the worker busy, so the run's job waits in Redis when Redis goes.
    busy = queue.enqueue("time.sleep", 6, job_id="keeps-the-worker-busy")
    wait_until(lambda: busy.get_status(refresh=True) == "started", 60, "the worker to take the blocking job")

    queued = api.post("/api/runs/", EVAL, format="json")
    assert queued.status_code == 201
    queued_id = queued.json()["id"]
    assert queue.job_ids == [f"job-{Job.objects.get(run_id=queued_id).pk}"]
    owned_redis.restart()
    assert Queue("cpu", connection=redis_conn(owned_redis)).job_ids == []  # lost (and the suspension with it)

    owned_redis.stop()
    created = api.post("/api/runs/", {**EVAL, "name": "created-while-redis-is-down"}, format="json")
    assert created.status_code == 201, created.content
    created_id = created.json()["id"]
    owned_redis.start()
    for run_id in (queued_id, created_id):
        run = PipelineRun.objects.get(pk=run_id)
        assert (run.status, list(run.jobs.values_list("step", "state"))) == ("pending", [("score", "queued")])
    assert Queue("cpu", connection=redis_conn(owned_redis)).job_ids == []

    processes.reaper(stale_seconds=60, requeue_grace=2)
    try:
        wait_until(lambda: all(PipelineRun.objects.get(pk=i).is_terminal for i in (queued_id, created_id)), 120, "both runs to end")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{processes.logs()}") from exc
    assert worker.poll() is None, "the worker survives two Redis restarts"
    for run_id in (queued_id, created_id):
        run = assert_ran_once(run_id, ["pending", "evaluating", "completed"], results=2, samples=4)
        assert run.logs.count("the score job was not in Redis") == 1, run.logs
        assert run.logs.count("sent it again to the cpu queue") == 1
    assert requeue_lost_jobs(grace_seconds=0) == []


@pytest.mark.pipeline
def test_redis_down_while_a_job_runs_and_when_it_ends(owned_rq_settings, owned_redis, processes, user, ledger):
    ledger.record(
        "fault", "Redis stopped mid-training, still down when the job ends, then started",
        "training goes on; the next job (never sent) is sent again by the reaper; workers survive or are restarted; "
        "run completed once: one event per status, one training, no duplicate results",
    )
    api = token_client(user)
    processes.worker("gpu")
    processes.worker("cpu")
    processes.reaper(stale_seconds=30, requeue_grace=2)
    run_id = api.post("/api/runs/", SHORT_FINETUNE, format="json").json()["id"]
    try:
        wait_until(lambda: len(PipelineRun.objects.get(pk=run_id).train_history) >= 1, 180, "training to start")
        owned_redis.stop()
        wait_until(lambda: Job.objects.filter(run_id=run_id, step="generate", state="queued").exists(), 120, "the fine-tune job to end")
        assert PipelineRun.objects.get(pk=run_id).status == "evaluating"
        owned_redis.start()

        def done() -> bool:
            processes.supervise("gpu")  # restarts a worker that died with Redis, as a supervisor would
            processes.supervise("cpu")
            return PipelineRun.objects.get(pk=run_id).is_terminal

        wait_until(done, 240, "the run to end", every=0.5)
        run = assert_ran_once(run_id, ["pending", "training", "evaluating", "completed"], results=1, samples=2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{processes.logs()}") from exc
    assert len(run.train_history) == SHORT_FINETUNE["training"]["max_steps"]
    assert run.logs.count("trained 16 steps") == 1
    assert run.logs.count("the generate job was not in Redis") == 1, run.logs
    assert RunEvent.objects.filter(run=run).count() == 4
    assert not PipelineRun.objects.filter(status__in=ACTIVE_STATUSES).exists()


def test_requeue_leaves_held_jobs_alone_and_gives_up_on_a_job_failing_before_its_claim(owned_rq_settings, owned_redis, user, ledger):
    ledger.record(
        "fault", "a queued job that RQ still holds; one that fails in RQ before its claim, again and again",
        f"never re-sent while held; re-sent {MAX_RESENDS} times, then the run fails with the reason",
    )
    run_id = token_client(user).post("/api/runs/", EVAL, format="json").json()["id"]
    conn = redis_conn(owned_redis)
    queue = Queue("cpu", connection=conn)
    assert requeue_lost_jobs(grace_seconds=0) == []
    assert requeue_lost_jobs(grace_seconds=0) == []
    rq_id = f"job-{Job.objects.get(run_id=run_id).pk}"
    assert queue.job_ids == [rq_id]

    for attempt in range(1, MAX_RESENDS + 2):
        job = RqJob.fetch(rq_id, connection=conn)
        queue.remove(job)
        job.set_status("failed")  # as if the work-horse died before its first query
        outcome = requeue_lost_jobs(grace_seconds=0)
        if attempt <= MAX_RESENDS:
            assert outcome == [(run_id, "the score job ended failed in RQ before it started: sent it again to the cpu queue")]
            assert queue.job_ids == [rq_id]
            assert RqJob.fetch(rq_id, connection=conn).meta["resends"] == attempt
    run = PipelineRun.objects.get(pk=run_id)
    assert run.status == "failed"
    assert run.error == f"score job lost: the score job ended failed in RQ before it started, {MAX_RESENDS + 1} times; not sending it again"
    assert requeue_lost_jobs(grace_seconds=0) == []


def test_with_redis_down_nothing_crashes_and_nothing_is_marked_lost(owned_rq_settings, owned_redis, user, ledger):
    ledger.record("fault", "Redis down: send, cancel, reaper pass", "send returns False (logged); cancel answers 200; the reaper pass returns quietly")
    api = token_client(user)
    run_id = api.post("/api/runs/", EVAL, format="json").json()["id"]
    other_id = api.post("/api/runs/", {**EVAL, "name": "to-cancel"}, format="json").json()["id"]
    owned_redis.stop()
    assert send_job(func=run_job, queue="cpu", job_id=Job.objects.get(run_id=run_id).pk) is False
    assert requeue_lost_jobs(grace_seconds=0) == []
    response = api.post(f"/api/runs/{other_id}/cancel/")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert PipelineRun.objects.get(pk=run_id).status == "pending"
