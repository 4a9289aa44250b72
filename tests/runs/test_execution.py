"""runs.execution and the step registry under database errors, on any engine (the PostgreSQL-only tests
that terminate real connections are in tests/reliability/test_faults_database.py)."""

import threading
import time

import pytest
from django.db import OperationalError

from runs import execution
from runs.models import Job

from .factories import make_run

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_heartbeat_thread_outlives_database_errors(user, monkeypatch):
    run = make_run(user, status="evaluating", jobs=({"step": "generate", "state": "running", "attempts": 1},))
    job = run.jobs.get()
    calls = []
    real = execution.job_heartbeat

    def flaky(*, job_id: int, attempt: int) -> bool:
        calls.append(threading.current_thread().name)
        if len(calls) in (2, 3):  # the thread's first two beats fail
            raise OperationalError("server closed the connection unexpectedly")
        return real(job_id=job_id, attempt=attempt)

    monkeypatch.setattr(execution, "job_heartbeat", flaky)
    with execution.Pulse(job.pk, 1, every=0.05) as pulse:
        deadline = time.monotonic() + 10
        while len(calls) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(calls) >= 6, "the thread stopped beating after an error"
    assert Job.objects.get(pk=job.pk).heartbeat_at is not None and not pulse.lost
    assert pulse.figures()["peak_rss_bytes"] > 0


def test_the_pulse_notices_when_its_attempt_no_longer_holds_the_job(user):
    run = make_run(user, status="evaluating", jobs=({"step": "generate", "state": "running", "attempts": 2},))
    with execution.Pulse(run.jobs.get().pk, 1, every=0.05) as pulse:  # attempt 1 was lost; the reaper gave the job to attempt 2
        deadline = time.monotonic() + 10
        while not pulse.lost and time.monotonic() < deadline:
            time.sleep(0.05)
    assert pulse.lost


def test_a_database_error_in_a_job_is_reported_as_a_lost_connection(user, monkeypatch):
    from runs.pipeline import drive_inline, inline_foreground
    from runs.services import run_create
    from tests.runs.factories import eval_only_config, replace_step_body

    with inline_foreground():
        run = run_create(config=eval_only_config(), owner=user)

    def body(ctx) -> None:
        raise OperationalError("terminating connection due to administrator command\nmore detail")

    replace_step_body(monkeypatch, "score", body)
    with pytest.raises(OperationalError):
        drive_inline(run.pk)
    run.refresh_from_db()
    assert run.status == "failed"
    assert run.error == (
        "score failed: the database connection was lost or refused the query "
        "(OperationalError: terminating connection due to administrator command)"
    )
