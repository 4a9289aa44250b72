"""The pages in a real browser: Playwright driving Debian's headless chromium.

The app runs exactly as the README starts it: `make serve` (runserver, DEBUG off,
the embedded default with runs executing in the server process), on a free port,
against the test database. Every page visited must load every asset it asks for
(stylesheets, scripts, images, fonts, the favicon) and raise no script error.
Screenshots of every page go to test-artifacts/screenshots/ for a person to look at.
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
from urllib.parse import urlparse

import pytest

from runs.models import PipelineRun
from tests.conftest import ROOT, free_port, wait_for_port, worker_env

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = ROOT / "test-artifacts" / "screenshots"
ASSET_TYPES = {"stylesheet", "script", "image", "font", "media", "manifest"}

pytestmark = [
    pytest.mark.pipeline,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (apt-get install chromium); .ci/run installs it"),
]

# Playwright's sync API keeps an event loop in this thread; the ORM calls the
# test makes between browser steps are synchronous and safe.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


def serve_env() -> dict[str, str]:
    """What `make serve` sees on a developer's machine, pointed at the test database and var dir.

    No REDIS_URL (runs execute in the server process) and no DEBUG or static
    settings: the defaults are what is under test.
    """
    env = worker_env("")
    for name in ("REDIS_URL", "TEST_REDIS_URL", "DEBUG", "MLOPS_PRODUCTION", "STATIC_MANIFEST", "STATIC_FROM_SOURCE", "STATIC_ROOT",
                 "DJANGO_ALLOW_ASYNC_UNSAFE"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def app_url(django_db_setup, tiny_model) -> Iterator[str]:
    """`make serve` on a free port; its output goes to test-artifacts/make-serve.log."""
    port = free_port()
    venv = str(Path(sys.prefix))
    log_path = ROOT / "test-artifacts" / "make-serve.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        # -o: the virtual environment is the one running these tests; never reinstall it here.
        proc = subprocess.Popen(
            ["make", "--no-print-directory", "-o", f"{venv}/.installed", "serve", f"VENV={venv}", f"SERVE_ADDR=127.0.0.1:{port}"],
            cwd=ROOT, env=serve_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        try:
            wait_for_port(port, timeout=120)
        except TimeoutError:
            pytest.fail(f"make serve did not listen on {port}:\n{log_path.read_text()[-3000:]}")
        yield f"http://127.0.0.1:{port}"
    finally:
        # make, runserver's reloader and its child share the session started above.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


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


class AssetWatch:
    """Every asset request of a page and how it ended; problems name the page that asked."""

    def __init__(self, page) -> None:
        self.problems: list[str] = []
        self.loaded: set[str] = set()
        page.on("response", self._response)
        page.on("requestfailed", self._failed)
        page.on("pageerror", lambda error: self.problems.append(f"script error on {page.url}: {error}"))
        self.page = page

    @staticmethod
    def _is_asset(request) -> bool:
        path = urlparse(request.url).path
        return request.resource_type in ASSET_TYPES or path.startswith("/static/") or path == "/favicon.ico"

    def _response(self, response) -> None:
        if not self._is_asset(response.request):
            return
        if 200 <= response.status < 400:
            self.loaded.add(urlparse(response.url).path)
        else:
            self.problems.append(f"{response.status} {response.url} (on {self.page.url})")

    def _failed(self, request) -> None:
        if self._is_asset(request):
            self.problems.append(f"failed {request.url}: {request.failure} (on {self.page.url})")

    def check(self) -> None:
        assert not self.problems, "\n".join(self.problems)


def servable_password(user, password: str) -> None:
    """The test settings hash with MD5 (fast); `make serve` knows only the real hashers."""
    from django.contrib.auth.hashers import PBKDF2PasswordHasher

    user.password = PBKDF2PasswordHasher().encode(password, PBKDF2PasswordHasher().salt())
    user.save(update_fields=["password"])


def log_in(page, username: str = "alice", password: str = "correct-horse-battery-staple") -> None:
    page.goto("/accounts/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/accounts/login/" not in url)


@pytest.fixture
def watched(browser, app_url):
    """A fresh browser context on the app, its asset watch, checked once more at the end."""
    context = browser.new_context(viewport={"width": 1366, "height": 900}, base_url=app_url)
    page = context.new_page()
    watch = AssetWatch(page)
    yield page, watch
    context.close()
    watch.check()


@pytest.fixture
def page(watched, user):
    page, _ = watched
    servable_password(user, "correct-horse-battery-staple")
    log_in(page)
    return page


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def assert_styled(page) -> None:
    """The stylesheet applied (a 404 or a wrong MIME type leaves the default white top bar)."""
    colour = page.evaluate("getComputedStyle(document.querySelector('.topbar')).backgroundColor")
    assert colour == "rgb(17, 24, 39)", f"app.css not applied on {page.url}: top bar is {colour}"


def test_launch_from_the_form_watch_it_complete_and_see_the_results(page, watched):
    _, watch = watched
    page.goto("/runs/new/")
    assert_styled(page)
    shot(page, "01-new-run")
    # An eval-only run does not keep the fine-tune's default name; back again, it does.
    default_name = page.input_value("input[name=name]")
    page.check("input[name=kind][value=eval_only]")
    assert page.input_value("input[name=name]") == default_name.replace("finetune", "eval")
    page.check("input[name=kind][value=finetune]")
    assert page.input_value("input[name=name]") == default_name
    page.fill("input[name=name]", "browser-finetune")
    # The page is what this test checks; the tiny model keeps it to seconds (the default model runs in make run
    # and tests/reliability's shipped-config runs).
    page.fill("input[name=base_model]", "local:tiny-llama")
    page.fill("input[name=epochs]", "1")
    page.fill("input[name=max_steps]", "6")
    page.fill("input[name=max_samples]", "4")
    page.click("#advanced > summary")  # generation settings are past the basics
    page.fill("input[name=max_new_tokens]", "12")
    page.fill("input[name=learning_rate]", "0.005")
    # The optimizer steps this means, counted as the trainer counts them: cut to max steps.
    assert "This trains for 6 optimizer steps" in page.inner_text("#steps-implied")
    # HTMX validation first: an error shows inline and the input stays.
    page.fill("input[name=epochs]", "0")
    page.click("button[value=validate]")
    page.wait_for_selector("#field-epochs .errorlist")
    assert page.input_value("input[name=name]") == "browser-finetune"
    shot(page, "02-new-run-validation-error")
    page.fill("input[name=epochs]", "1")
    page.click("button[value=launch]")
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
    shot(page, "05-results")
    page.goto("/")
    assert page.locator(f"#run-row-{run.pk} .badge.completed").count() == 1
    shot(page, "06-dashboard")
    watch.check()
    # The plotted pages really fetched plotly.js and htmx, from the app itself.
    assert {"/static/vendor/plotly-basic-4.1.1.min.js", "/static/django_htmx/htmx-2.min.js", "/static/css/app.css", "/static/js/app.js"} <= watch.loaded


def test_compare_two_runs(page, watched):
    from tests.runs.factories import eval_only_config

    config = {**eval_only_config(), "name": "browser-eval"}
    page.goto("/runs/new/")
    page.fill("textarea[name=yaml_text]", json.dumps(config))  # JSON is YAML too
    page.click("button:has-text('Load into the form')")
    page.wait_for_selector("text=YAML loaded into the form")
    page.click("button[value=launch]")
    page.wait_for_url(re.compile(r".*/runs/\d+/$"))
    shot(page, "07a-eval-run")
    assert "browser-eval" in page.inner_text("h1") and "eval_only" in page.inner_text("h1")
    page.wait_for_selector("#run-status-badge:has-text('completed')", timeout=180_000)
    first = PipelineRun.objects.get(name="browser-eval")
    page.goto(f"/runs/new/?clone={first.pk}")
    page.click("button[value=launch]")
    page.wait_for_url(re.compile(rf".*/runs/(?!{first.pk}/)\d+/$"))
    page.wait_for_selector("#run-status-badge:has-text('completed')", timeout=180_000)
    page.goto("/")
    for run in PipelineRun.objects.all():
        page.check(f"#run-row-{run.pk} input[type=checkbox]")
    page.click("button:has-text('Compare selected')")
    page.wait_for_selector("#compare-chart .main-svg")
    shot(page, "07-compare")
    table = page.inner_text("table.compare")
    for run in PipelineRun.objects.all():
        assert f"#{run.pk}" in table, table  # every ticked run has its column
    assert "ragas_eval" in table and "paired by row" in table  # the second run is paired with the first
    watched[1].check()


def test_upload_a_bad_dataset_and_see_the_line_numbered_error(page, watched, tmp_path):
    page.on("dialog", lambda dialog: dialog.accept())
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
    # The errors came back in place (htmx): what was typed and the chosen file are still there.
    assert page.input_value("input[name=name]") == "bad-upload"
    assert page.eval_on_selector("input[name=file]", "el => el.files.length && el.files[0].name") == "bad.jsonl"
    assert page.locator("text=line 3: invalid JSON").count() == 1
    shot(page, "08-dataset-upload-error")
    good = tmp_path / "good.jsonl"
    good.write_text(f"{row}\n{row}\n")
    page.set_input_files("input[name=file]", str(good))
    page.click("button:has-text('Validate & upload')")
    page.wait_for_url(re.compile(r".*/datasets/\d+/$"))
    assert "2 rows" in page.inner_text(".messages")
    shot(page, "08b-dataset-uploaded")
    page.click("button:has-text('Delete')")  # the confirm() dialog is accepted by Playwright's default handler below
    page.wait_for_url(re.compile(r".*/datasets/$"))
    assert "deleted" in page.inner_text(".messages")
    page.goto("/datasets/")
    page.click("a:has-text('ragas_eval')")
    shot(page, "09-dataset-preview")
    preview = page.inner_text("table.preview")
    assert "QUESTION" in preview and "REFERENCE CONTEXTS" in preview  # an eval set's columns, reference_contexts included
    assert len([line for line in preview.splitlines() if line.strip()]) > 10  # a page of rows, not an empty table
    watched[1].check()


def training_run(owner) -> PipelineRun:
    """A fine-tune two minutes into its second epoch, as the trainer leaves it: history, stage, logs, heartbeat."""
    from datetime import timedelta

    from django.utils import timezone

    from runs.models import RunEvent
    from tests.runs.factories import make_run

    now = timezone.now()
    history = [{"step": s, "loss": round(2.4 * 0.97**s + 0.05 * (s % 3), 4), "learning_rate": 2e-4 * (1 - s / 60), "epoch": round(s / 20, 3)}
               for s in range(1, 31)]
    history[19]["val_loss"] = 2.1  # the trainer's validation at the end of epoch 1
    run = make_run(owner, status="training", progress=40, stage="training step 30/60, epoch 1.50, loss 1.0312", train_history=history,
                   started_at=now - timedelta(minutes=3), mlflow_run_id="0123456789abcdef0123456789abcdef",
                   mlflow_experiment_id="1", logs="[12:00:00] fine-tuning local:tiny-llama on rag_qa_train (166 rows)\n[12:00:09] MLflow run 0123\n",
                   jobs=({"step": "finetune", "state": "running", "attempts": 1, "heartbeat_at": now, "progress": 0.5,
                          "stage": "training step 30/60", "figures": {"total_steps": 60}},))
    RunEvent.objects.filter(run=run).update(at=now - timedelta(minutes=4))
    event = RunEvent.objects.create(run=run, from_status="pending", to_status="training", message="finetune started")
    RunEvent.objects.filter(pk=event.pk).update(at=now - timedelta(minutes=3))
    return run


def test_every_page_loads_every_asset(watched, user, staff_user):
    """A tour of every page, as a user and as staff: all styled, every asset 2xx/3xx, no script error."""
    from tests.runs.test_views import scored_run

    page, watch = watched
    servable_password(user, "correct-horse-battery-staple")
    servable_password(staff_user, "admin-long-passphrase")
    page.goto("/accounts/login/")
    assert_styled(page)
    shot(page, "10-login")
    log_in(page)
    finetune, eval_only, training = scored_run(user), scored_run(user, kind="eval_only"), training_run(user)
    from datasets_app.models import Dataset

    pages = {
        "11-dashboard": "/",
        "12-new-run": "/runs/new/",
        "13-run-page": f"/runs/{finetune.pk}/",
        "13b-run-training": f"/runs/{training.pk}/",
        "14-results": f"/runs/{finetune.pk}/results/",
        "15-results-eval-only": f"/runs/{eval_only.pk}/results/",
        "16-compare": f"/compare/?runs={finetune.pk},{eval_only.pk}",
        "17-datasets": "/datasets/",
        "18-dataset-train": f"/datasets/{Dataset.objects.get(name='rag_qa_train').pk}/",
        "19-dataset-eval": f"/datasets/{Dataset.objects.get(name='ragas_eval').pk}/",
        "19b-dataset-eval-page-3": f"/datasets/{Dataset.objects.get(name='ragas_eval').pk}/?page=3",
        "20-api-docs": "/api/docs/",
        "21-not-found": "/runs/999999/",
    }
    for name, path in pages.items():
        page.goto(path)
        page.wait_for_load_state("networkidle")
        if name != "20-api-docs":
            assert_styled(page)
        shot(page, name)
        watch.check()
    page.set_viewport_size({"width": 800, "height": 900})
    page.goto("/")
    # Nothing sticks out of an 800 px window: the runs table fits its card.
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the dashboard is {overflow}px wider than an 800 px window"
    shot(page, "11b-dashboard-800px")
    page.set_viewport_size({"width": 1366, "height": 900})
    favicon = page.request.get("/favicon.ico")  # what browsers ask for on pages that name no icon
    assert favicon.ok and favicon.headers["content-type"].startswith("image/"), (favicon.status, favicon.headers)
    page.goto("/")
    page.click("button:has-text('Log out')")
    page.wait_for_url(re.compile(r".*/accounts/logout/$"))
    shot(page, "22-logged-out")
    log_in(page, "root-admin", "admin-long-passphrase")
    for name, path in {"23-admin": "/admin/", "24-admin-runs": "/admin/runs/pipelinerun/", "25-queues": "/admin/django-rq/"}.items():
        page.goto(path)
        page.wait_for_load_state("networkidle")
        shot(page, name)
        watch.check()
    assert any(path.startswith("/static/admin/") for path in watch.loaded)
    assert any(path.startswith("/static/drf_spectacular_sidecar/") for path in watch.loaded)


# --- as a new user meets it: the New run form, a YAML that fails, the registry and a promotion by hand ---------------
def form_problems(page) -> list[str]:
    return [line.strip() for line in page.inner_text("#form-problems li").split("\n")] if page.locator("#form-problems").count() else []


def test_a_new_user_sees_every_problem_at_once_in_one_style(page):
    page.goto("/runs/new/")
    assert page.evaluate("document.getElementById('run-form').noValidate")  # no browser bubbles: the server's list is the one
    assert not page.evaluate("document.getElementById('advanced').open")
    offered = page.eval_on_selector_all("#base-model-choices option", "options => options.map(o => o.value)")
    assert {"local:smollm2-135m-instruct", "local:tiny-llama"} <= set(offered)
    help_text = page.inner_text("#field-base_model .helptext")
    assert "Qwen" not in help_text and "hub is offline here" in help_text
    shot(page, "26-01-new-run-basics")

    page.fill("input[name=name]", "")
    page.fill("input[name=base_model]", "nobody/made-up-model-xyz")
    page.fill("input[name=epochs]", "0")
    page.fill("input[name=learning_rate]", "")
    for box in page.query_selector_all("input[name=train_datasets]:checked"):
        box.uncheck()
    page.click("#advanced > summary")
    page.fill("input[name=lora_r]", "0")
    page.click("#advanced > summary")  # closed again: it must open by itself to show its error
    expected = {"name", "model.base", "training.epochs", "training.learning_rate", "datasets.train", "training.lora.r"}
    for button in ("validate", "launch"):  # htmx or a full page: the same list, the same inline errors
        with page.expect_response(lambda r: r.url.endswith("/runs/new/") and r.request.method == "POST") as answer:
            page.click(f"button[value={button}]")
        assert answer.value.status == 200
        page.wait_for_selector("#form-problems")
        listed = page.inner_text("#form-problems")
        assert "6 problems; nothing was created" in listed, listed
        assert all(f"{path}:" in listed for path in expected), listed
        assert "nobody/made-up-model-xyz' is not in this machine's Hugging Face cache and the hub is offline" in listed
        assert page.evaluate("document.getElementById('advanced').open")
        assert page.locator("#field-lora_r .errorlist").is_visible() and page.locator("#field-base_model .errorlist").is_visible()
        shot(page, f"26-02-new-run-every-problem-{button}")
    assert not PipelineRun.objects.exists()

    # Check data on a model that cannot load: an answer on the page, never a 500.
    page.fill("input[name=name]", "made-up")
    page.fill("input[name=epochs]", "1")
    page.fill("input[name=learning_rate]", "0.001")
    page.check("input[name=train_datasets][value=rag_qa_train]")
    page.fill("input[name=lora_r]", "8")
    with page.expect_response(lambda r: r.url.endswith("/runs/new/") and r.request.method == "POST") as answer:
        page.click("button[value=check]")
    assert answer.value.status == 200
    page.wait_for_selector("#form-problems:has-text('1 problem; nothing was created')")
    assert "hub is offline" in page.inner_text("#field-base_model .errorlist")
    shot(page, "26-03-check-data-made-up-model")


def test_a_yaml_that_fails_to_load_keeps_the_users_edits(page):
    page.goto("/runs/new/")
    page.fill("input[name=name]", "my-careful-edits")
    page.fill("input[name=epochs]", "7")
    page.uncheck("input[name=metrics][value=semantic_similarity]")
    page.fill("textarea[name=yaml_text]", "name: from-yaml\nkind: finetune\n  datasets: [oops\n")
    page.click("button:has-text('Load into the form')")
    page.wait_for_selector("#yaml-errors")
    assert "invalid YAML at line 3" in page.inner_text("#yaml-errors")
    assert page.input_value("input[name=name]") == "my-careful-edits" and page.input_value("input[name=epochs]") == "7"
    assert not page.is_checked("input[name=metrics][value=semantic_similarity]")
    assert "datasets: [oops" in page.input_value("textarea[name=yaml_text]")
    shot(page, "26-04-yaml-error-keeps-the-form")
    page.fill("textarea[name=yaml_text]", "name: from-yaml\nkind: eval_only\ndatasets: {eval: [ragas_eval]}\nevaluation: {answers: dataset}\n")
    page.click("button:has-text('Load into the form')")
    page.wait_for_selector("text=YAML loaded into the form")
    assert page.input_value("input[name=name]") == "from-yaml"


def registered_version(owner, name: str) -> PipelineRun:
    """A completed fine-tune with a registered version in the test MLflow store (the one `make serve` uses here)."""
    from runs import tracking
    from runs.services import run_set_mlflow_ids, run_set_registered_model
    from tests.runs.factories import make_run

    run = make_run(owner, status="completed")
    experiment_id, mlflow_run_id = tracking.mlflow_start(run_id=run.pk, name=run.name, kind=run.kind, config=run.config, tags={})
    run_set_mlflow_ids(run_id=run.pk, experiment_id=experiment_id, mlflow_run_id=mlflow_run_id)
    client = tracking.client()
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, source=f"runs:/{mlflow_run_id}/model", run_id=mlflow_run_id).version
    run_set_registered_model(run_id=run.pk, name=name, version=str(version))
    run.refresh_from_db()
    return run


def test_staff_promote_a_rejected_version_only_after_reading_the_gate_and_see_it_in_the_registry(watched, user, staff_user):
    import uuid

    from runs.services import run_record_promotion

    page, _ = watched
    servable_password(staff_user, "admin-long-passphrase")
    name = f"rag-lora.browser-{uuid.uuid4().hex[:6]}.rag_qa_train"
    first, second = registered_version(user, name), registered_version(user, name)
    reason = "rejected: rouge_score +0.004 [-0.010, +0.019] on ragas_eval is not significant (Holm-adjusted p=0.412)"
    run_record_promotion(run_id=second.pk, model_name=name, model_version=second.registered_model_version, decision="rejected",
                         alias="", reason=reason, automatic=True)
    log_in(page, "root-admin", "admin-long-passphrase")
    page.goto(f"/runs/{second.pk}/")
    page.locator("#registry").scroll_into_view_if_needed()
    shot(page, "26-05a-run-page-registry-card")
    page.click("button:has-text('Promote to champion')")
    page.wait_for_selector("#promotion-confirm")
    assert reason in page.inner_text("#gate-override")
    shot(page, "26-05-promote-confirm-gate-rejected")
    page.click("#promotion-confirm button.primary")  # no reason: refused on the same page
    page.wait_for_selector("#promotion-error")
    assert "say why" in page.inner_text("#promotion-error") and reason in page.inner_text("#gate-reason")
    page.fill("#promotion-reason-input", "read 50 answers: the gate's eval set was stale")
    page.click("#promotion-confirm button.primary")
    page.wait_for_url(re.compile(rf".*/runs/{second.pk}/$"))
    assert "@champion" in page.inner_text("#registry")
    page.click("nav a:has-text('Registry')")
    page.wait_for_url(re.compile(r".*/registry/$"))
    card = page.inner_text(f"section.registry-model:has-text('{name}')")
    assert f"Champion: version {second.registered_model_version}" in card, card
    assert "read 50 answers" in card and f"The gate had rejected it: {reason}" in card
    assert f"#{first.pk}" in card
    shot(page, "26-06-registry")
