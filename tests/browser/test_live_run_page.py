"""Issue 26 §4-§6 in a real Chromium against `make serve`: a run launched from the page finishes on the page (the
banner goes when it starts; data check, playground and registry card appear without a reload), its jobs carry their
own ETAs, and Compare takes the first ticked run as the reference and draws the paired intervals as error bars."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from django.core.management import call_command

from runs.models import PipelineRun
from tests.browser.test_pages_in_chromium import CHROMIUM, shot
from tests.runs.factories import eval_only_config, finetune_config

pytestmark = [
    pytest.mark.pipeline,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (apt-get install chromium); .ci/run installs it"),
]

LIVE_RUN = finetune_config(
    name="browser-live",
    training={"epochs": 1, "batch_size": 8, "max_seq_length": 256, "max_truncated_fraction": 1.0, "learning_rate": 5e-3, "max_steps": 3, "seed": 3},
    evaluation={"metrics": ["rouge_score"], "max_samples": 3, "max_new_tokens": 8, "batch_size": 2, "compare_base": True},
)


def test_a_run_started_from_the_page_finishes_on_the_page_without_a_reload(page, watched):
    page.goto("/runs/new/")
    page.fill("textarea[name=yaml_text]", json.dumps(LIVE_RUN))  # JSON is YAML too
    page.click("button:has-text('Load into the form')")
    page.wait_for_selector("text=YAML loaded into the form")
    page.click("button[value=launch]")
    page.wait_for_url(re.compile(r".*/runs/\d+/$"))
    page.evaluate("window.__sameDocument = true")  # gone if anything reloads the page
    # "created and queued" is news only until the run starts
    page.wait_for_selector('.messages [data-tags~="until-run-starts"]', state="detached", timeout=60_000)
    assert page.locator("#run-status-badge").inner_text() != "pending"
    # each job in the table has its own ETA column, with the pace it comes from, or says it has none yet
    assert "ETA" in page.inner_text("#run-jobs thead")
    page.wait_for_selector("#run-status-badge:has-text('completed')", timeout=240_000)
    # the sections that exist only at the end come with the last poll
    page.wait_for_selector("#playground", timeout=10_000)
    page.wait_for_selector("#registry")
    page.wait_for_selector("#run-data-check")
    assert page.evaluate("window.__sameDocument === true"), "the page was reloaded"
    assert "Model registry" in page.inner_text("#registry") and "Playground" in page.inner_text("#playground")
    run = PipelineRun.objects.get(name="browser-live")
    assert run.status == "completed", run.logs
    assert f"{run.registered_model_name}" in page.inner_text("#registry")
    assert "ended" in page.inner_text("#run-eta")
    # the playground works where it appeared
    page.select_option("#playground-prefill select[name=sample]", index=0)
    page.click("#playground-prefill button")
    page.wait_for_function("document.getElementById('playground-question').value.length > 0")
    shot(page, "50-live-run-finished-without-reload")
    watched[1].check()


def test_compare_pairs_with_the_first_ticked_run_and_draws_the_intervals(page, watched, user, tmp_path):
    """Two runs on different rows of ragas_eval: ticked newest last, the older one is the reference; a warning
    says their means are over different rows; the paired differences are drawn with error bars."""
    config = tmp_path / "config.yaml"
    ids = []
    for spec in (eval_only_config(name="browser-ref", evaluation={"answers": "dataset", "metrics": ["rouge_score"], "max_samples": 4}),
                 {**LIVE_RUN, "name": "browser-other"}):
        config.write_text(yaml.safe_dump(spec))
        call_command("run_pipeline", str(config))
        run = PipelineRun.objects.get(name=spec["name"])
        assert run.status == "completed", run.logs
        PipelineRun.objects.filter(pk=run.pk).update(owner=user)
        ids.append(run.pk)
    reference, other = ids
    page.goto("/")
    page.check(f"#run-row-{reference} input[type=checkbox]")  # ticked first, though it is listed below the other
    page.check(f"#run-row-{other} input[type=checkbox]")
    assert page.input_value("#compare-order") == f"{reference},{other}"
    assert f"Reference: #{reference}" in page.inner_text("#compare-hint")
    page.click("button:has-text('Compare selected')")
    page.wait_for_selector("#compare-diff-chart .main-svg")
    assert page.locator("#reference-select").input_value() == str(reference)
    assert f"− #{reference}, paired by row" in page.inner_text("table.compare")
    assert "Different rows." in page.inner_text(".different-rows") and "cell-best" not in page.content()
    assert page.locator("#compare-diff-chart g.errorbar path.xerror").count() >= 1
    shot(page, "51-compare-first-ticked-reference")
    # choose the other one on the page: it becomes the reference, the tick order kept
    page.select_option("#reference-select", str(other))
    page.click("#reference-form button")
    page.wait_for_selector(f"text=− #{other}, paired by row")
    assert page.locator("#reference-select").input_value() == str(other)
    page.click(f"a[href='/runs/{other}/results/']")
    page.wait_for_selector(".diff-chart .main-svg")
    assert page.locator(".diff-chart g.errorbar path.xerror").count() >= 1
    shot(page, "52-results-difference-with-intervals")
    watched[1].check()
