"""Concurrency through a real HTTP server (Django's threaded WSGI server, one thread
and one database connection per request): many clients create runs at once, and
many try to end the same run at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler
from django.core.wsgi import get_wsgi_application
from rest_framework.authtoken.models import Token

from runs.models import Job, PipelineRun, RunEvent
from tests.conftest import status_changes
from tests.runs.factories import eval_only_config, make_run

pytestmark = [pytest.mark.reliability, pytest.mark.django_db(transaction=True)]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:
        pass


class _Server(ThreadedWSGIServer):
    # live_server's server listens with a backlog of 10: fifty simultaneous
    # connects overflow it and get reset, which tests the kernel, not the app.
    request_queue_size = 128


@pytest.fixture
def http_server() -> Iterator[str]:
    """The app behind a real threaded HTTP server on a free port; its URL."""
    server = _Server(("127.0.0.1", 0), _QuietHandler)
    server.set_app(get_wsgi_application())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def all_at_once(count: int, call) -> list[requests.Response]:
    """`count` threads wait at a barrier, then call(i) together."""
    barrier = threading.Barrier(count)

    def one(i: int) -> requests.Response:
        barrier.wait(timeout=30)
        return call(i)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def test_fifty_concurrent_run_creations_are_all_stored_and_queued(http_server, rq_settings, user, ledger):
    ledger.record("fault", "50 concurrent POST /api/runs/ (threaded HTTP server, 50 client threads)", "50 x 201, 50 runs, 50 RunEvents 'created', 50 RQ jobs, one per run")
    import django_rq

    headers = {"Authorization": f"Token {Token.objects.create(user=user).key}"}
    responses = all_at_once(50, lambda i: requests.post(
        f"{http_server}/api/runs/", json={**eval_only_config(), "name": f"concurrent-{i}"}, headers=headers, timeout=120,
    ))
    assert [r.status_code for r in responses] == [201] * 50, [r.text[:200] for r in responses if r.status_code != 201]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 50
    assert set(PipelineRun.objects.values_list("pk", flat=True)) == ids
    assert set(PipelineRun.objects.values_list("status", flat=True).distinct()) == {"pending"}
    assert set(Job.objects.values_list("step", "state").distinct()) == {("score", "queued")} and Job.objects.count() == 50
    assert RunEvent.objects.filter(message="created").count() == 50
    assert sorted(RunEvent.objects.values_list("run_id", flat=True)) == sorted(ids)
    assert sorted(django_rq.get_queue("cpu").job_ids) == sorted(f"job-{pk}" for pk in Job.objects.values_list("pk", flat=True))
    assert django_rq.get_queue("gpu").job_ids == []


def test_twenty_concurrent_status_changes_on_one_run_have_one_winner(http_server, user, ledger):
    ledger.record("fault", "20 concurrent PATCH /status/ on one pending run (failed or cancelled)", "exactly one 200, nineteen 409 naming both states, one RunEvent for the transition")
    run = make_run(user, kind="eval_only")
    headers = {"Authorization": f"Token {Token.objects.create(user=user).key}"}
    targets = ["failed", "cancelled"] * 10
    responses = all_at_once(20, lambda i: requests.patch(
        f"{http_server}/api/runs/{run.pk}/status/", json={"status": targets[i], "message": f"client {i}"}, headers=headers, timeout=120,
    ))
    codes = [r.status_code for r in responses]
    assert sorted(codes) == [200] + [409] * 19, codes
    winner = codes.index(200)
    run.refresh_from_db()
    assert run.status == targets[winner]
    assert run.events.filter(to_status=targets[winner]).get().message == f"client {winner}"
    assert status_changes(run) == ["pending", targets[winner]]
    for response in responses:
        if response.status_code == 409:
            body = response.json()
            assert body["from"] == targets[winner] and body["to"] in ("failed", "cancelled")
            assert f"cannot go from '{targets[winner]}'" in body["detail"]
