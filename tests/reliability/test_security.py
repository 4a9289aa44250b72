"""Security by default: no anonymous access, no cross-user access, login lockout,
no default account, secrets never echoed."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth import get_user_model
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.test import APIClient

from datasets_app.models import Dataset
from tests.runs.factories import eval_only_config, make_run

pytestmark = [pytest.mark.reliability]

PUBLIC = {"accounts/login/", "accounts/logout/", "healthz", "admin/login/", "admin/logout/", "favicon.ico"}


def all_routes(resolver=None, prefix="") -> list[str]:
    routes = []
    for entry in (resolver or get_resolver()).url_patterns:
        if isinstance(entry, URLResolver):
            routes += all_routes(entry, prefix + str(entry.pattern))
        elif isinstance(entry, URLPattern):
            routes.append(prefix + str(entry.pattern))
    return routes


def concrete(route: str) -> str | None:
    """A URL for a route pattern, with 1 for every id; None for regex-only routes."""
    import re

    path = re.sub(r"<(?:int:)?(?:pk|id|object_id|job_id|queue_index)>", "1", route)
    path = re.sub(r"<[^>]+>", "x", path)
    if "^" in path or "(?" in path or "\\" in path:
        return None
    return "/" + path.lstrip("/")


@pytest.mark.django_db
def test_every_route_refuses_anonymous_users(client, ledger):
    entry = ledger.record("security", "anonymous GET/POST on every route", "redirect to login, 401/403, or 404/405; never content")
    routes = [r for r in all_routes() if r.rstrip("$") not in PUBLIC and not r.startswith("accounts/password") and not r.startswith("accounts/reset")]
    checked = 0
    for route in routes:
        url = concrete(route)
        if url is None:
            continue
        for method in ("get", "post"):
            response = getattr(client, method)(url)
            assert response.status_code in (301, 302, 401, 403, 404, 405), (method, url, response.status_code)
            if response.status_code in (301, 302):
                assert "login" in response.url, (method, url, response.url)
            checked += 1
    entry.case += f" ({checked} requests)"
    assert checked > 40


@pytest.mark.django_db
def test_users_cannot_reach_each_others_runs_and_datasets(api, other_api, user, other_user, client, ledger):
    ledger.record("security", "another user's run and dataset (API and pages)", "404 everywhere; nothing changed")
    from django.utils import timezone

    run = make_run(user, status="training", jobs=({"step": "finetune", "state": "running", "attempts": 1, "heartbeat_at": timezone.now()},))
    upload = api.post("/api/datasets/", {"name": "alice-only", "type": "train", "file": __import__("io").BytesIO(b'{"question":"q","answer":"a","context":"c"}\n')}, format="multipart")
    dataset_id = upload.json()["id"]
    for method, path, body in [
        ("get", f"/api/runs/{run.pk}/", None), ("post", f"/api/runs/{run.pk}/cancel/", None),
        ("patch", f"/api/runs/{run.pk}/status/", {"status": "failed"}), ("patch", f"/api/runs/{run.pk}/logs/", {"logs": "x"}),
        ("get", f"/api/datasets/{dataset_id}/", None),
    ]:
        assert getattr(other_api, method)(path, body, format="json").status_code == 404, path
    client.force_login(other_user)
    for path in [f"/runs/{run.pk}/", f"/runs/{run.pk}/results/", f"/datasets/{dataset_id}/"]:
        assert client.get(path).status_code == 404
    assert client.post(f"/runs/{run.pk}/cancel/").status_code == 404
    run.refresh_from_db()
    assert run.status == "training" and run.logs == ""


@pytest.mark.django_db
@pytest.mark.parametrize("login_url", ["/accounts/login/", "/admin/login/"])
def test_logins_lock_after_repeated_failures(client, staff_user, settings, login_url, ledger):
    from django.core.cache import cache

    cache.clear()
    ledger.record("security", f"password guessing on {login_url}", f"locked after {settings.LOGIN_FAILURE_LIMIT} failures; the right password is refused while locked")
    for _ in range(settings.LOGIN_FAILURE_LIMIT):
        response = client.post(login_url, {"username": "root-admin", "password": "wrong"})
        assert response.status_code == 200  # the form again, with an error
    response = client.post(login_url, {"username": "root-admin", "password": "admin-long-passphrase"})
    assert response.status_code == 200, "the correct password must not get in while locked"
    assert "_auth_user_id" not in client.session
    cache.clear()  # the lockout expired
    response = client.post(login_url, {"username": "root-admin", "password": "admin-long-passphrase"})
    assert response.status_code == 302


@pytest.mark.django_db
def test_there_is_no_default_account(ledger):
    ledger.record("security", "default accounts after migrate + seed_datasets", "no user row exists (none with a usable password, none at all)")
    from django.core.management import call_command

    call_command("seed_datasets")
    assert not get_user_model().objects.exists()
    assert not any(u.has_usable_password() for u in get_user_model().objects.all())


def test_no_shipped_file_holds_a_usable_secret_or_creates_an_account(ledger):
    ledger.record(
        "security", "shipped secrets and account creation",
        ".env.example leaves SECRET_KEY, POSTGRES_PASSWORD, REDIS_PASSWORD empty; docker-compose.yml refuses to start without each (${VAR:?}); "
        "no migration, script, Dockerfile or compose file creates a user in code or with a literal password "
        "(a check script's user gets a password generated at run time)",
    )
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env_example = dict(
        line.split("=", 1) for line in (root / ".env.example").read_text().splitlines() if "=" in line and not line.lstrip().startswith("#")
    )
    compose = (root / "docker-compose.yml").read_text()
    for name in ("SECRET_KEY", "POSTGRES_PASSWORD", "REDIS_PASSWORD"):
        assert env_example.get(name) == "", f"{name} in .env.example must be empty, got {env_example.get(name)!r}"
        uses = re.findall(r"\$\{" + name + r"([^}]*)\}", compose)
        assert uses and all(use.startswith(":?") for use in uses), f"docker-compose.yml must require {name}: {uses}"
    shipped = [*root.glob("*/migrations/*.py"), *root.glob("scripts/*"), *root.glob("docker/**/*"), root / "docker-compose.yml", root / "Makefile"]
    creators = re.compile(r"create_(?:super)?user\(|DJANGO_SUPERUSER_PASSWORD\s*[=:]\s*[\"']?(?![\"'$\s])")
    offenders = [str(p.relative_to(root)) for p in shipped if p.is_file() and creators.search(p.read_text(errors="replace"))]
    assert offenders == [], offenders


@pytest.mark.pipeline
@pytest.mark.django_db(transaction=True)
def test_the_judge_key_never_leaves_its_environment_variable(tmp_path, monkeypatch, user, ledger):
    import yaml
    from django.core.management import call_command

    from tests.conftest import token_client
    from tests.judge_server import JudgeServer

    secret = "sk-test-SECRET-do-not-echo-0123456789"
    monkeypatch.setenv("TEST_JUDGE_KEY", secret)
    ledger.record("security", "judge API key in logs, config, events, results, API, MLflow", "the key appears nowhere; only the variable name is stored")
    with JudgeServer() as judge:
        config = eval_only_config(evaluation={
            "answers": "dataset", "metrics": ["faithfulness", "rouge_score"], "max_samples": 2,
            "judge": {"base_url": judge.base_url, "model": "judge", "api_key_env": "TEST_JUDGE_KEY", "timeout": 20, "max_retries": 0},
        })
        path = tmp_path / "judge.yaml"
        path.write_text(yaml.safe_dump(config))
        call_command("run_pipeline", str(path), "--user", "alice")
    from runs.models import PipelineRun
    from runs.tracking import client

    run = PipelineRun.objects.get()
    assert run.status == "completed", run.logs
    assert run.config["evaluation"]["judge"]["api_key_env"] == "TEST_JUDGE_KEY"
    haystacks = [run.logs, json.dumps(run.config), run.error, json.dumps(run.reproducibility)]
    haystacks += [e.message for e in run.events.all()]
    haystacks += [json.dumps(s.reasons) + s.answer for s in run.samples.all()]
    haystacks.append(token_client(user).get(f"/api/runs/{run.pk}/").content.decode())
    mlflow_run = client().get_run(run.mlflow_run_id)
    haystacks += [json.dumps(mlflow_run.data.params), json.dumps(mlflow_run.data.tags)]
    for text in haystacks:
        assert secret not in text


@pytest.mark.django_db
def test_api_errors_are_json_never_html(ledger):
    ledger.record("security", "unknown /api/ URLs", "JSON 404 (no HTML page or stack trace to an API client)")
    response = APIClient().get("/api/runs/-5/status/")
    assert response.status_code == 404 and response["Content-Type"] == "application/json"
    assert Dataset.objects.exists()
