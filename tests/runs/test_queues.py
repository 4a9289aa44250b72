"""RQ transport (runs/queues.py) on a real Redis: a job id taken by an RQ job that already ended (a database reset
since, or another database on the same Redis) makes way; one still waiting in RQ is a harmless duplicate."""

from __future__ import annotations

import pytest

from runs.models import Job
from runs.pipeline import run_job
from runs.queues import rq_job_id, send_job
from tests.conftest import token_client
from tests.runs.factories import eval_only_config

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_ended_rq_job_with_the_same_id_makes_way_and_a_waiting_one_is_kept(rq_settings, user):
    import django_rq
    from rq.job import Job as RqJob

    queue = django_rq.get_queue("cpu")
    run_id = token_client(user).post("/api/runs/", eval_only_config(), format="json").json()["id"]
    job_id = Job.objects.get(run_id=run_id).pk
    assert queue.job_ids == [rq_job_id(job_id)]
    assert send_job(func=run_job, queue="cpu", job_id=job_id)  # still waiting in RQ: a harmless duplicate
    assert queue.job_ids == [rq_job_id(job_id)]

    stale = RqJob.fetch(rq_job_id(job_id), connection=queue.connection)
    queue.remove(stale)
    stale.set_status("finished")  # as a finished job of an earlier database would be
    assert queue.job_ids == []
    assert send_job(func=run_job, queue="cpu", job_id=job_id)
    assert queue.job_ids == [rq_job_id(job_id)]
