"""The pages in a real browser: Playwright driving Debian's headless chromium.

A real RQ worker (one process on both queues) runs the pipeline while the
browser watches the run page. Screenshots of every page go to
test-artifacts/screenshots/ for a person to look at.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from runs.models import PipelineRun
from tests.conftest import ROOT, worker_env

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = ROOT / "test-artifacts" / "screenshots"

pytestmark = [
    pytest.mark.pipeline,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (apt-get install chromium); .ci/run installs it"),
]

# Playwright's sync API keeps an event loop in this thread; the ORM calls the
# test makes between browser steps are synchronous and safe.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live_server, user):
    context = browser.new_context(viewport={"width": 1366, "height": 900}, base_url=live_server.url)
    page = context.new_page()
    page.goto("/accounts/login/")
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", "correct-horse-battery-staple")
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")
    yield page
    context.close()


@pytest.fixture
def worker(rq_settings, redis_url, tiny_model) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "rqworker", "gpu", "cpu"],
        env=worker_env(redis_url, HEARTBEAT_SECONDS="1"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    yield proc
    if proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_launch_from_the_form_watch_it_complete_and_see_the_results(page, worker):
    page.goto("/runs/new/")
    shot(page, "01-new-run")
    page.fill("input[name=name]", "browser-finetune")
    page.fill("input[name=epochs]", "1")
    page.fill("input[name=max_steps]", "6")
    page.fill("input[name=max_samples]", "4")
    page.fill("input[name=max_new_tokens]", "12")
    page.fill("input[name=learning_rate]", "0.005")
    # HTMX validation first: an error shows inline and the input stays.
    page.fill("input[name=epochs]", "0")
    page.click("button[value=validate]")
    page.wait_for_selector("#field-epochs .errorlist")
    assert page.input_value("input[name=name]") == "browser-finetune"
    shot(page, "02-new-run-validation-error")
    page.fill("input[name=epochs]", "1")
    page.click("button[value=launch]")
    page.wait_for_load_state()
    shot(page, "02b-after-launch")
    page.wait_for_url(re.compile(r".*/runs/\d+/$"))
    run = PipelineRun.objects.get(name="browser-finetune")
    page.wait_for_selector("#run-status-badge:has-text('training'), #run-status-badge:has-text('evaluating'), #run-status-badge:has-text('completed')", timeout=120_000)
    page.wait_for_selector("#loss-chart .main-svg", timeout=120_000)  # the live loss curve
    shot(page, "03-run-training")
    page.wait_for_selector("#run-status-badge:has-text('completed')", timeout=240_000)
    run.refresh_from_db()
    assert run.status == "completed", run.logs
    shot(page, "04-run-completed")
    page.click("a:has-text('Open the results')")
    page.wait_for_selector(".results-chart .main-svg")
    assert page.locator("table.scores").count() == 1
    page.locator("details.sample summary").first.click()
    shot(page, "05-results")
    page.goto("/")
    assert page.locator(f"#run-row-{run.pk} .badge.completed").count() == 1
    shot(page, "06-dashboard")


def test_compare_two_runs(page, worker):
    from tests.runs.factories import eval_only_config

    config = {**eval_only_config(), "name": "browser-eval"}
    page.goto("/runs/new/")
    page.fill("textarea[name=yaml_text]", json.dumps(config))  # JSON is YAML too
    page.click("button:has-text('Load into the form')")
    page.wait_for_selector("text=YAML loaded into the form")
    page.click("button[value=launch]")
    page.wait_for_load_state()
    shot(page, "07a-eval-run")
    page.wait_for_selector("#run-status-badge:has-text('completed')", timeout=180_000)
    first = PipelineRun.objects.get(name="browser-eval")
    page.goto(f"/runs/new/?clone={first.pk}")
    page.click("button[value=launch]")
    page.wait_for_selector("#run-status-badge:has-text('completed')", timeout=180_000)
    page.goto("/")
    for run in PipelineRun.objects.all():
        page.check(f"#run-row-{run.pk} input[type=checkbox]")
    page.click("button:has-text('Compare selected')")
    page.wait_for_selector("#compare-chart .main-svg")
    shot(page, "07-compare")


def test_upload_a_bad_dataset_and_see_the_line_numbered_error(page, tmp_path):
    bad = tmp_path / "bad.jsonl"
    row = json.dumps({"question": "q", "answer": "a", "context": "c"})
    bad.write_text(f"{row}\n{row}\n{{not json\n")
    page.goto("/datasets/")
    page.fill("input[name=name]", "bad-upload")
    page.select_option("select[name=type]", "train")
    page.set_input_files("input[name=file]", str(bad))
    page.click("button:has-text('Validate & upload')")
    page.wait_for_selector("#upload-problems")
    assert "line 3: invalid JSON" in page.inner_text("#upload-problems")
    shot(page, "08-dataset-upload-error")
    page.goto("/datasets/")
    page.click("a:has-text('ragas_eval')")
    shot(page, "09-dataset-preview")
