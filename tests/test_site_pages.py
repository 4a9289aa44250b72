"""Static files as `make serve` and gunicorn serve them, the favicon, the API docs' way back, the Queues page."""

import os
import subprocess
import sys

import pytest

from runs.models import Job, PipelineRun
from tests.conftest import ROOT

pytestmark = pytest.mark.django_db


def settings_in_a_fresh_process(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("STATIC_FROM_SOURCE", "STATIC_MANIFEST", "MLOPS_PRODUCTION", "DEBUG")}
    return subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); from django.conf import settings; {code}"],
        env={**clean, "DJANGO_SETTINGS_MODULE": "mlops_site.settings", **env}, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


def test_static_files_are_served_from_their_source_without_collectstatic(client):
    # The test settings are the embedded default's: nothing was collected (STATIC_ROOT does not exist).
    for path, kind in [("/static/css/app.css", "text/css"), ("/static/js/app.js", "text/javascript"),
                       ("/static/django_htmx/htmx-2.min.js", "text/javascript"), ("/static/vendor/plotly-basic-4.1.1.min.js", "text/javascript"),
                       ("/static/favicon.svg", "image/svg+xml"), ("/static/admin/css/base.css", "text/css")]:
        response = client.get(path)
        assert response.status_code == 200, path
        assert response["Content-Type"].startswith(kind), (path, response["Content-Type"])
    assert client.get("/static/no-such-file.css").status_code == 404
    assert client.get("/static/vendor/no-such-file.js").status_code == 404  # not a 500 from the vendored-files finder


def test_only_collected_files_are_served_under_gunicorn_and_in_production():
    out = settings_in_a_fresh_process("print(settings.WHITENOISE_USE_FINDERS, settings.WHITENOISE_AUTOREFRESH)")
    assert out.stdout.split() == ["True", "True"], out.stderr
    under_gunicorn = settings_in_a_fresh_process("import mlops_site.gunicorn_conf, os; print(os.environ['STATIC_FROM_SOURCE'])")
    assert under_gunicorn.stdout.strip() == "false", under_gunicorn.stderr
    out = settings_in_a_fresh_process("print(settings.WHITENOISE_USE_FINDERS)", STATIC_FROM_SOURCE="false")
    assert out.stdout.strip() == "False", out.stderr
    out = settings_in_a_fresh_process("print(settings.WHITENOISE_USE_FINDERS)", STATIC_MANIFEST="true")
    assert out.stdout.strip() == "False", out.stderr
    refused = settings_in_a_fresh_process("pass", STATIC_MANIFEST="true", STATIC_FROM_SOURCE="true")
    assert refused.returncode != 0 and "STATIC_FROM_SOURCE needs STATIC_MANIFEST=false" in refused.stderr


def test_favicon(client):
    response = client.get("/favicon.ico")
    assert response.status_code == 302 and response.url == "/static/favicon.ico"
    icon = client.get(response.url)
    assert icon.status_code == 200 and b"".join(icon.streaming_content)[:4] == b"\x00\x00\x01\x00"  # an ICO file


def test_pages_name_the_icon(client, user):
    client.force_login(user)
    page = client.get("/").content.decode()
    assert 'rel="icon" href="/static/favicon.svg"' in page


def test_the_api_docs_link_back_to_the_app(client, user):
    client.force_login(user)
    page = client.get("/api/docs/").content.decode()
    assert 'href="/"' in page and "back to the runs" in page and "swagger-ui" in page


def test_the_queues_page_says_jobs_run_in_process_in_the_embedded_default(client, staff_user, user):
    run = PipelineRun.objects.create(name="busy", kind="finetune", status="training", config={}, base_model="m", owner=user, stage="step 3/9")
    Job.objects.create(run=run, step="finetune", queue="gpu", state="running", attempts=1, stage="training step 3/9")
    client.force_login(staff_user)
    page = client.get("/admin/django-rq/").content.decode()
    assert "Jobs run in-process" in page and f"#{run.pk} busy" in page and "REDIS_URL" in page
    assert "finetune" in page and "training step 3/9" in page


def test_the_queues_page_is_rqs_dashboard_in_served_mode(client, staff_user, rq_settings):
    client.force_login(staff_user)
    page = client.get("/admin/django-rq/").content.decode()
    assert "Jobs run in-process" not in page and "gpu" in page and "cpu" in page


def test_the_queues_page_is_for_staff(client, user):
    client.force_login(user)
    assert client.get("/admin/django-rq/").status_code == 302
