"""runs.execution and the step registry under database errors, on any engine (the PostgreSQL-only tests
that terminate real connections are in tests/reliability/test_faults_database.py)."""

import threading
import time

import pytest
from django.db import OperationalError

from runs import execution
from runs.models import PipelineRun

from .factories import make_run

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_heartbeat_thread_outlives_database_errors(user, monkeypatch):
    run = make_run(user, status="evaluating")
    calls = []
    real = execution.run_heartbeat

    def flaky(*, run_id: int) -> None:
        calls.append(threading.current_thread().name)
        if len(calls) in (2, 3):  # the thread's first two beats fail
            raise OperationalError("server closed the connection unexpectedly")
        real(run_id=run_id)

    monkeypatch.setattr(execution, "run_heartbeat", flaky)
    with execution.heartbeat(run.pk, every=0.05):
        deadline = time.monotonic() + 10
        while len(calls) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(calls) >= 6, "the thread stopped beating after an error"
    assert PipelineRun.objects.get(pk=run.pk).heartbeat_at is not None


def test_a_database_error_in_a_job_is_reported_as_a_lost_connection(user, monkeypatch):
    from runs.pipeline import inline_foreground, run_step
    from runs.services import run_create
    from tests.runs.factories import eval_only_config, replace_step_body

    with inline_foreground():
        run = run_create(config=eval_only_config(), owner=user)

    def body(ctx) -> None:
        raise OperationalError("terminating connection due to administrator command\nmore detail")

    replace_step_body(monkeypatch, "score", body)
    with pytest.raises(OperationalError):
        run_step(run.pk, "score")
    run.refresh_from_db()
    assert run.status == "failed"
    assert run.error == (
        "score failed: the database connection was lost or refused the query "
        "(OperationalError: terminating connection due to administrator command)"
    )
