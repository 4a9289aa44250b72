"""The database connection drops during a job: PostgreSQL terminates the backend
(pg_terminate_backend), as a failover, a restart or an idle-killer would. The job
either recovers (best-effort writes reconnect) or fails cleanly (the failure is
recorded on a new connection); the run's state stays consistent."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.conf import settings
from django.db import Error as DatabaseError
from django.db import connection
from django.utils import timezone

from evaluation.steps import score_step
from runs.execution import Pulse
from runs.models import ACTIVE_STATUSES, Job, PipelineRun
from runs.pipeline import drive_inline, inline_foreground
from runs.services import run_create
from tests.conftest import status_changes, token_client
from tests.runs.factories import eval_only_config, make_run, replace_step_body

from . import fault_tools
from .fault_tools import SHORT_FINETUNE, wait_until

owned_redis, owned_rq_settings, processes = fault_tools.owned_redis_fixture, fault_tools.owned_rq_settings_fixture, fault_tools.processes_fixture

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not settings.DATABASES["default"]["ENGINE"].endswith("postgresql"),
        reason="needs PostgreSQL: pg_terminate_backend drops a server connection; SQLite has none to drop",
    ),
]


def admin_connection():
    """A connection of its own (not Django's), to terminate Django's."""
    import psycopg

    db = connection.settings_dict
    return psycopg.connect(
        host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432, user=db["USER"], password=db["PASSWORD"] or None,
        dbname=db["NAME"], autocommit=True,
    )


def my_backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def terminate_backends(*, pids: list[int] | None = None, sparing: list[int] = ()) -> int:
    """Terminate the given backends, or every other client backend of the test database; returns how many."""
    with admin_connection() as admin:
        if pids is not None:
            rows = admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [pids]).fetchall()
        else:
            rows = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid() AND NOT pid = ANY(%s::int[])",
                [list(sparing)],
            ).fetchall()
    return sum(1 for (ok,) in rows if ok)


# Rows declared as marks: on SQLite the module is skipped before a body runs, and
# the ledger still shows these cases, as not verified.
@pytest.mark.ledger(
    "fault", "database connection terminated under a running job (score)",
    "the job fails cleanly: run failed with a reason naming the lost connection, traceback in its logs, "
    "events pending/evaluating/failed, no results, nothing left evaluating",
)
def test_a_connection_terminated_during_a_job_fails_it_cleanly(user, monkeypatch):
    with inline_foreground():
        run = run_create(config=eval_only_config(), owner=user)

    def body(ctx):
        assert terminate_backends(pids=[my_backend_pid()]) == 1
        return score_step(ctx)  # its first query meets the dead connection

    replace_step_body(monkeypatch, "score", body)
    with pytest.raises(DatabaseError):  # re-raised, so RQ records the job as failed too
        drive_inline(run.pk)
    run.refresh_from_db()
    assert run.status == "failed"
    assert run.error.startswith("score failed: the database connection was lost or refused the query (OperationalError:"), run.error
    assert "Traceback" in run.logs and "score failed:" in run.logs
    assert status_changes(run) == ["pending", "evaluating", "failed"]
    assert not run.results.exists()
    assert not PipelineRun.objects.filter(status__in=ACTIVE_STATUSES).exists()


@pytest.mark.ledger("fault", "database connection of the heartbeat thread terminated", "the thread reconnects: a heartbeat lands after the drop")
def test_the_heartbeat_thread_survives_a_terminated_connection(user):
    run = make_run(user, status="evaluating", jobs=({"step": "generate", "state": "running", "attempts": 1,
                                                     "heartbeat_at": timezone.now() - timedelta(hours=1)},))
    job = run.jobs.get()
    mine = my_backend_pid()
    with Pulse(job.pk, 1, every=0.2):
        first = Job.objects.get(pk=job.pk).heartbeat_at
        wait_until(lambda: Job.objects.get(pk=job.pk).heartbeat_at > first, 10, "the thread's first beat")
        assert terminate_backends(sparing=[mine]) >= 1  # the thread's connection
        dropped_at = timezone.now()
        time.sleep(0.3)
        wait_until(lambda: Job.objects.get(pk=job.pk).heartbeat_at > dropped_at + timedelta(seconds=0.3), 10, "a beat after the drop")


@pytest.mark.pipeline
@pytest.mark.ledger(
    "fault", "every database connection of a worker terminated mid-training",
    "two or more backends (the job's and its heartbeat's) terminated during training; the run completes with every step, one event per status, one measured result",
)
def test_connections_terminated_mid_training_on_a_worker_are_survived(owned_rq_settings, processes, user):
    processes.worker("gpu")
    processes.worker("cpu")
    # Long enough (about ten seconds of steps) that the drop lands while training writes its live updates.
    config = {**SHORT_FINETUNE, "training": {**SHORT_FINETUNE["training"], "epochs": 4, "max_steps": 120}}
    run_id = token_client(user).post("/api/runs/", config, format="json").json()["id"]
    mine = my_backend_pid()
    try:
        wait_until(lambda: len(PipelineRun.objects.get(pk=run_id).train_history) >= 1, 180, "training to start")
        assert terminate_backends(sparing=[mine]) >= 2  # the horse's job connection and its heartbeat thread's
        wait_until(lambda: PipelineRun.objects.get(pk=run_id).is_terminal, 240, "the run to end")
        run = PipelineRun.objects.get(pk=run_id)
        assert run.status == "completed", f"{run.error}\n{run.logs}"
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{processes.logs()}") from exc
    assert status_changes(run) == ["pending", "training", "evaluating", "completed"]
    assert len(run.train_history) == config["training"]["max_steps"]
    assert run.results.filter(value__isnull=False).count() == 1
