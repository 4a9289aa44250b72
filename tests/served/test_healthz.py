"""GET /healthz: database, Redis and a live worker per queue, and the container health checks."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
import redis
from django.db import OperationalError
from rq import Worker

from tests.conftest import free_port

from .compose_helpers import ROOT

pytestmark = pytest.mark.django_db


@pytest.fixture
def register_worker(rq_settings, redis_url) -> Iterator:
    """Register RQ workers in Redis, as a running `rqworker QUEUE` does, without running one."""
    registered = []

    def register(*queues: str) -> Worker:
        worker = Worker(list(queues), connection=redis.Redis.from_url(redis_url))
        worker.register_birth()
        registered.append(worker)
        return worker

    yield register
    for worker in registered:
        worker.register_death()


def test_inline_mode_needs_only_the_database(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "missing": [], "database": "ok", "redis": "not used (jobs run inline)", "workers": {}}
    assert "no-cache" in response["Cache-Control"]


def test_it_names_the_queues_without_a_live_worker(client, register_worker):
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "missing": ["worker:gpu", "worker:cpu"], "database": "ok", "redis": "ok", "workers": {"gpu": 0, "cpu": 0}}

    register_worker("gpu")
    body = client.get("/healthz").json()
    assert body["missing"] == ["worker:cpu"] and body["workers"] == {"gpu": 1, "cpu": 0}


def test_it_is_ok_with_a_worker_on_each_queue(client, register_worker):
    register_worker("gpu")
    register_worker("cpu")
    register_worker("gpu", "cpu")
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "missing": [], "database": "ok", "redis": "ok", "workers": {"gpu": 2, "cpu": 2}}


def test_a_worker_that_shut_down_no_longer_counts(client, register_worker):
    register_worker("gpu")
    register_worker("cpu").register_death()
    assert client.get("/healthz").json()["missing"] == ["worker:cpu"]


def test_unreachable_redis_is_reported_without_its_address(client, rq_settings):
    url = f"redis://:s3cret-password@127.0.0.1:{free_port()}/0"
    rq_settings.RQ_QUEUES = {name: {**conf, "URL": url} for name, conf in rq_settings.RQ_QUEUES.items()}
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable", "missing": ["redis", "worker:gpu", "worker:cpu"],
        "database": "ok", "redis": "unreachable", "workers": {"gpu": None, "cpu": None},
    }
    assert b"s3cret" not in response.content and b"127.0.0.1" not in response.content


def test_an_unreachable_database_is_reported(client, monkeypatch):
    class BrokenConnection:
        def cursor(self):
            raise OperationalError("connection to server at 10.0.0.5 failed: password authentication failed")

    monkeypatch.setattr("mlops_site.health.connection", BrokenConnection())
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["missing"] == ["database"] and response.json()["database"] == "unreachable"
    assert b"10.0.0.5" not in response.content


def test_it_answers_plain_http_while_everything_else_redirects_to_https(client, settings):
    settings.SECURE_SSL_REDIRECT = True
    assert client.get("/healthz").status_code == 200
    response = client.get("/api/runs/")
    assert response.status_code == 301 and response["Location"].startswith("https://")


def test_it_is_read_only(client):
    assert client.post("/healthz").status_code == 405
    assert client.head("/healthz").status_code == 200


# --- docker/healthcheck.py, the containers' health check command


@pytest.fixture
def healthcheck():
    spec = importlib.util.spec_from_file_location("container_healthcheck", ROOT / "docker" / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rq_worker_check_looks_for_a_worker_of_this_host_on_its_queue(healthcheck, register_worker, redis_url, monkeypatch):
    monkeypatch.setenv("REDIS_URL", redis_url)
    assert healthcheck.main(["rq-worker", "gpu"]) == 1
    register_worker("gpu")
    assert healthcheck.main(["rq-worker", "gpu"]) == 0
    assert healthcheck.main(["rq-worker", "cpu"]) == 1
    monkeypatch.setattr(healthcheck.socket, "gethostname", lambda: "another-container")
    assert healthcheck.main(["rq-worker", "gpu"]) == 1


def test_the_rq_cron_check_finds_the_scheduler_of_this_host(healthcheck, rq_settings, redis_url, monkeypatch):
    from rq.cron import CronScheduler

    monkeypatch.setenv("REDIS_URL", redis_url)
    assert healthcheck.main(["rq-cron"]) == 1
    scheduler = CronScheduler(connection=redis.Redis.from_url(redis_url))
    scheduler.register_birth()
    try:
        assert healthcheck.main(["rq-cron"]) == 0
    finally:
        scheduler.register_death()


def test_the_http_check_sends_an_allowed_host(healthcheck, live_server, monkeypatch):
    url = f"{live_server.url}/healthz"
    monkeypatch.setenv("ALLOWED_HOSTS", "testserver-not-allowed.example")
    assert healthcheck.main(["http", url]) == 1  # Django refuses the Host: 400
    monkeypatch.setenv("ALLOWED_HOSTS", "localhost,platform.example.com")
    assert healthcheck.main(["http", url]) == 0
    assert healthcheck.main(["http", url.replace("/healthz", "/no-such-page")]) == 1
    assert healthcheck.main(["bogus"]) == 2
