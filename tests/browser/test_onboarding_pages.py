"""Issue 26's pages in a real Chromium against `make serve`: the playground's decoding controls and
cut-off mark, the API token page, and the admin's read-only run page and prefilled Add form."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from django.core.management import call_command

from runs.models import PipelineRun
from tests.browser.test_pages_in_chromium import CHROMIUM, log_in, servable_password, shot
from tests.runs.factories import finetune_config, make_run

pytestmark = [
    pytest.mark.pipeline,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (apt-get install chromium); .ci/run installs it"),
]

PLAYGROUND_RUN = finetune_config(
    name="browser-playground",
    training={"epochs": 1, "batch_size": 8, "max_seq_length": 256, "max_truncated_fraction": 1.0, "learning_rate": 5e-3, "max_steps": 2, "seed": 3},
    evaluation={"metrics": ["rouge_score"], "max_samples": 2, "max_new_tokens": 8, "batch_size": 1, "compare_base": True},
)


def test_the_playground_decodes_as_asked_marks_a_cut_off_answer_and_names_a_bad_field(page, watched, user, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(PLAYGROUND_RUN))
    call_command("run_pipeline", str(config))  # a real fine-tune: its adapter is in the run folder the server reads
    run = PipelineRun.objects.get(name=PLAYGROUND_RUN["name"])
    assert run.status == "completed", run.logs
    PipelineRun.objects.filter(pk=run.pk).update(owner=user)

    page.goto(f"/runs/{run.pk}/")
    page.select_option("#playground-prefill select[name=sample]", index=0)
    page.click("#playground-prefill button")
    page.wait_for_function("document.getElementById('playground-question').value.length > 0")
    assert page.get_attribute("#playground-max-new-tokens", "placeholder") == "8"
    page.fill("#playground-max-new-tokens", "1")
    page.click("#playground-form button[type=submit]")
    page.wait_for_selector("#playground-answers")
    assert "Greedy, at most 1 new tokens" in page.inner_text("#playground-decoding-used")
    assert "used all 1 new tokens" in page.inner_text("#playground-finetuned-cut-off")
    shot(page, "40-playground-cut-off")

    page.fill("#playground-max-new-tokens", "")
    page.fill("#playground-temperature", "0.9")
    page.fill("#playground-top-p", "0")  # allowed by the input, refused by the server: the field is named
    page.click("#playground-form button[type=submit]")
    page.wait_for_selector("#playground-error")
    assert "top_p: must be above 0" in page.inner_text("#playground-error")
    page.fill("#playground-top-p", "0.9")
    page.click("#playground-form button[type=submit]")
    page.wait_for_selector("#playground-decoding-used:has-text('Sampled at temperature 0.9')")
    shot(page, "41-playground-sampled")
    watched[1].check()


def test_a_user_creates_and_revokes_an_api_token_from_the_nav(page, watched):
    page.click("nav a:has-text('API token')")
    page.wait_for_url(re.compile(r".*/accounts/token/$"))
    assert "You have no API token" in page.inner_text("#api-token")
    page.click("button:has-text('Create a token')")
    key = page.inner_text("#api-token-key").strip()
    assert re.fullmatch(r"[0-9a-f]{40}", key)
    answer = page.request.get("/api/", headers={"Authorization": f"Token {key}"})
    assert answer.status == 200 and "endpoints" in answer.json()
    shot(page, "42-api-token-created")
    page.click("#api-token-revoke")
    page.wait_for_selector("text=API token revoked")
    refused = page.request.get("/api/runs/", headers={"Authorization": f"Token {key}", "Cookie": ""})
    assert refused.status == 401 and refused.headers["www-authenticate"] == "Token"
    shot(page, "43-api-token-revoked")
    watched[1].check()


def test_the_admin_run_page_is_read_only_and_add_starts_from_the_default_config(watched, user, staff_user):
    page, watch = watched
    servable_password(staff_user, "admin-long-passphrase")
    log_in(page, "root-admin", "admin-long-passphrase")
    run = make_run(user, status="training", data_check={"ok": True},
                   jobs=({"step": "finetune", "state": "running", "attempts": 1, "checkpoint_step": 4},))
    page.goto(f"/admin/runs/pipelinerun/{run.pk}/change/")
    assert page.locator("#pipelinerun_form input:not([type=hidden]), #pipelinerun_form textarea, #pipelinerun_form select").count() == 0
    content = page.inner_text("#content")
    assert page.locator("input[name=_save]").count() == 0 and "finetune" in content and "running" in content  # its jobs, shown
    shot(page, "44-admin-run-read-only")
    page.goto("/admin/runs/pipelinerun/add/")
    config = page.input_value("textarea[name=config]")
    assert '"train": [\n      "rag_qa_train"' in config and "null" != config.strip()
    shot(page, "45-admin-add-run-prefilled")
    page.goto("/admin/")
    page.click("a[href='/admin/django_rq/dashboard/']")
    page.wait_for_selector("text=Jobs run in-process")
    shot(page, "46-admin-queue-link")
    watch.check()
