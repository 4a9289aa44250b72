"""The run pages as rendered: live figures, timeline, links, results, samples, compare, dashboard."""

from datetime import timedelta

import pytest
from django.utils import timezone

from datasets_app.models import Dataset
from runs.models import RunResult

from .factories import make_run
from .test_views import beating_run, form_data, scored_run

pytestmark = pytest.mark.django_db


@pytest.fixture
def logged_in(client, user):
    client.force_login(user)
    return client


def test_the_live_page_shows_elapsed_speed_eta_and_what_is_not_recorded(logged_in, user):
    now = timezone.now()
    history = [{"step": s, "loss": 2.0 - s / 100, "learning_rate": 1e-4, "epoch": s / 20, "elapsed_seconds": 3.0 * s, "tokens": 90 * s}
               for s in range(1, 11)]
    training = {"step": "finetune", "state": "running", "attempts": 1, "figures": {"total_steps": 40}, "progress": 0.25,
                "stage": "training step 10/40", "started_at": now - timedelta(minutes=1)}
    run = beating_run(user, status="training", progress=30, stage="training step 10/40, epoch 0.50, loss 1.9",
                      train_history=history, started_at=now - timedelta(minutes=2), jobs=(training,))
    page = logged_in.get(f"/runs/{run.pk}/status/").content.decode()
    assert "10 of 40" in page and "steps/s" in page and "ETA" in page and "min" in page
    assert "Not recorded yet: device" in page and "peak memory (measured when the training job ends)" in page
    assert 'data-terminal="false"' in page
    # each job with its own state and progress
    assert 'id="run-jobs"' in page and "finetune" in page and "25%" in page


def test_no_results_link_before_there_are_results(logged_in, user):
    run = beating_run(user, status="evaluating")
    page = logged_in.get(f"/runs/{run.pk}/").content.decode()
    assert 'id="results-link"' not in page and "data-results-url" not in page
    RunResult.objects.create(run=run, dataset=Dataset.objects.get(name="ragas_eval"), variant="base", metric="rouge_score", value=0.3, n_scored=1)
    # The polled fragment tells the page (static/js/app.js adds the link without a reload).
    fragment = logged_in.get(f"/runs/{run.pk}/status/").content.decode()
    assert f'data-results-url="/runs/{run.pk}/results/"' in fragment
    assert 'id="results-link"' in logged_in.get(f"/runs/{run.pk}/").content.decode()


def test_mlflow_ids_are_links(logged_in, user, settings):
    settings.MLFLOW_UI_URL = ""
    run = make_run(user, status="completed", mlflow_experiment_id="1", mlflow_run_id="0123456789abcdef")
    page = logged_in.get(f"/runs/{run.pk}/").content.decode()
    assert 'href="http://127.0.0.1:5000/#/experiments/1/runs/0123456789abcdef"' in page and "make mlflow-ui" in page


def test_the_reproducibility_record_travels_with_the_polled_fragment(logged_in, user):
    run = beating_run(user, status="training")
    assert "run-repro-data" not in logged_in.get(f"/runs/{run.pk}/status/").content.decode()
    run.reproducibility = {"seed": 42, "git_commit": "abc"}
    run.save()
    fragment = logged_in.get(f"/runs/{run.pk}/status/").content.decode()
    assert 'id="run-repro-data"' in fragment and '"git_commit": "abc"' in fragment


def test_the_late_sections_come_with_the_poll_that_finds_them_changed(logged_in, user):
    from runs import page_data

    run = beating_run(user, status="evaluating")
    page = logged_in.get(f"/runs/{run.pk}/").content.decode()
    key = page_data.run_sections_key(run)
    assert 'hx-include="#run-sections-key"' in page and f'id="run-sections-key" name="sections" value="{key}"' in page
    assert 'id="registry"' not in page and 'id="playground"' not in page
    # while nothing changed, the poll carries no sections
    fragment = logged_in.get(f"/runs/{run.pk}/status/", {"sections": key}).content.decode()
    assert "hx-swap-oob" not in fragment and 'id="run-end-sections"' not in fragment
    # the version registered and the data check recorded during the run: the next poll brings them, out of band
    run.registered_model_name, run.registered_model_version = "rag-lora", "3"
    run.data_check = {"ok": True, "problems": [], "skipped": "nothing to check here"}
    run.save()
    fragment = logged_in.get(f"/runs/{run.pk}/status/", {"sections": key}).content.decode()
    assert '<div id="run-end-sections" hx-swap-oob="true">' in fragment and 'id="registry"' in fragment and "rag-lora" in fragment
    assert '<div id="run-data-check-box" hx-swap-oob="true">' in fragment and "nothing to check here" in fragment
    new_key = page_data.run_sections_key(run)
    assert f'value="{new_key}"' in fragment and new_key != key
    # the run ends: the last poll (286, polling stops) brings the playground and the registry card with the gate's decision
    run.status = "completed"
    run.save()
    response = logged_in.get(f"/runs/{run.pk}/status/", {"sections": new_key})
    assert response.status_code == 286
    final = response.content.decode()
    assert 'hx-swap-oob="true"' in final and 'id="playground"' in final and 'id="registry"' in final
    assert "hx-swap-oob" not in logged_in.get(f"/runs/{run.pk}/status/").content.decode()  # no key sent: nothing extra


def test_the_jobs_table_shows_each_jobs_own_eta_and_the_memory_it_measured(logged_in, user):
    now = timezone.now()
    building = {"step": "finetune", "state": "running", "attempts": 1, "progress": 0.0, "started_at": now - timedelta(seconds=50),
                "stage": "building local:tiny-llama on first use: pre-training step 160/276",
                "figures": {"model_build": {"model": "local:tiny-llama", "step": 160, "total": 276, "seconds": 40.0, "done": False}}}
    run = beating_run(user, status="training", progress=1, stage=building["stage"], started_at=now - timedelta(seconds=50), jobs=(building,))
    page = logged_in.get(f"/runs/{run.pk}/status/").content.decode()
    assert "Building <span class=\"mono\">local:tiny-llama</span> on first use" in page and "build 58% (160 of 276)" in page
    assert "model build 58%" in page and "the build&#x27;s own pace: 160 of 276 in 40 s" in page
    assert "training starts after the model build" in page and "160 of 276</dd>" not in page  # never shown as training steps
    assert 'id="training-eta"' not in page and 'id="run-eta"' in page and "no estimate yet" in page
    done = {"step": "finetune", "state": "done", "attempts": 1, "started_at": now - timedelta(seconds=90), "finished_at": now - timedelta(seconds=10),
            "figures": {"peak_rss_bytes": 3 * 2**30, "rss_growth_bytes": 2**30,
                        "model_build": {"model": "local:tiny-llama", "step": 276, "total": 276, "seconds": 61.0, "done": True}}}
    generating = {"step": "generate", "state": "running", "attempts": 1, "progress": 0.5, "started_at": now - timedelta(seconds=10)}
    run = beating_run(user, status="evaluating", started_at=now - timedelta(seconds=90), jobs=(done, generating))
    page = logged_in.get(f"/runs/{run.pk}/status/").content.decode()
    assert "model built in 1 min 01 s" in page and "3.0\xa0GB" in page and "+1.0\xa0GB by this job" in page
    assert "this job&#x27;s own pace: 50% done in 10 s" in page and "when it ends" in page


def test_the_created_message_is_marked_to_go_when_the_run_starts(logged_in):
    response = logged_in.post("/runs/new/", {**form_data(), "action": "launch"}, follow=True)
    assert 'data-tags="until-run-starts"' in response.content.decode()


def test_results_say_retrieval_metrics_do_not_depend_on_the_model(logged_in, user):
    run = scored_run(user)
    dataset = Dataset.objects.get(name="ragas_eval")
    for variant in ("finetuned", "base"):
        RunResult.objects.create(run=run, dataset=dataset, variant=variant, metric="non_llm_context_precision", value=0.875, n_scored=2)
    page = logged_in.get(f"/runs/{run.pk}/results/").content.decode()
    assert "the same for every model" in page
    assert "+0.0000" not in page  # no difference shown as if it were a finding


def test_results_show_answers_side_by_side_with_marked_words_and_not_measured(logged_in, user):
    run = scored_run(user)
    run.samples.filter(index=0, variant="finetuned").update(answer="the truth is out there")
    page = logged_in.get(f"/runs/{run.pk}/results/").content.decode()
    assert "<mark>truth</mark>" in page
    assert page.count("Ground truth") == 2 and "fine-tuned</h4>" in page and "base model</h4>" in page
    assert "not measured (timeout)" in page


def test_results_sort_by_the_biggest_losses(logged_in, user):
    run = scored_run(user)
    run.samples.filter(index=1, variant="base").update(scores={"rouge_score": 0.9, "exact_match": None})
    page = logged_in.get(f"/runs/{run.pk}/results/?metric=rouge_score&sort=losses").content.decode()
    assert page.index("question 1") < page.index("question 0")
    only = logged_in.get(f"/runs/{run.pk}/results/?metric=rouge_score&show=worse").content.decode()
    assert "question 1" in only and "question 0" not in only


def test_compare_keeps_base_scores_beside_the_fine_tuned_ones(logged_in, user):
    a = scored_run(user)
    b = scored_run(user, kind="eval_only")
    page = logged_in.get(f"/compare/?runs={a.pk},{b.pk}").content.decode()
    assert "base model</td>" in page and "0.3000" in page and "+0.2000" in page
    assert "stored answers" in page
    # What the eval-only run does not use is no difference: train sets, training, the model, generation.
    assert ">kind<" in page and ">evaluation.answers<" in page
    for unused in ("datasets.train", "training.epochs", "model.base", "evaluation.max_new_tokens"):
        assert f">{unused}<" not in page


def test_a_gain_is_coloured_only_by_its_paired_verdict_on_the_dashboard_and_results(logged_in, user):
    from runs.models import ScoreComparison

    run = scored_run(user)
    dataset = Dataset.objects.get(name="ragas_eval")
    comparison = ScoreComparison.objects.create(run=run, dataset=dataset, metric="rouge_score", n_pairs=2, delta=0.2, ci_low=-0.1, ci_high=0.5,
                                                p_adjusted=0.6, verdict="no significant difference")
    row = logged_in.get("/").content.decode().split(f'id="run-row-{run.pk}"')[1].split("</tr>")[0]
    assert '<div class="delta ">+0.2000 vs base <span class="hint">(no significant difference)</span>' in row
    assert "delta-pos" not in logged_in.get(f"/runs/{run.pk}/results/").content.decode()
    comparison.verdict = "better"
    comparison.save()
    assert '<div class="delta delta-pos">+0.2000 vs base <span class="hint">(better)</span>' in logged_in.get("/").content.decode()
    results = logged_in.get(f"/runs/{run.pk}/results/").content.decode()
    assert '<td class="num ">+0.2000<div class="significance verdict-better">' in results  # the verdict is coloured (app.css), the bare number not
    assert '"differences": [{"metric": "rouge_score", "delta": 0.2, "ci_low": -0.1, "ci_high": 0.5, "verdict": "better", "n_pairs": 2}]' in results
    assert 'class="chart diff-chart"' in results


def test_dashboard_headline_says_the_variant_and_its_gain(logged_in, user):
    scored_run(user)
    eval_run = scored_run(user, kind="eval_only")
    page = logged_in.get("/").content.decode()
    assert "fine-tuned" in page and "+0.2000 vs base" in page
    assert "stored answers" in page and eval_run.base_model not in page.split(f'id="run-row-{eval_run.pk}"')[1].split("</tr>")[0]
    assert "Tick two or more runs" in page and 'id="compare-button"' in page


def test_dashboard_searches_by_name_and_sorts(logged_in, user):
    first, second = make_run(user), make_run(user)
    second.name = "zebra-run"
    second.save()
    page = logged_in.get("/?q=zebra").content.decode()
    assert f"run-row-{second.pk}" in page and f"run-row-{first.pk}" not in page
    by_name = logged_in.get("/?sort=-name").content.decode()
    assert by_name.index(f"run-row-{second.pk}") < by_name.index(f"run-row-{first.pk}")
    assert "No run matches" in logged_in.get("/?q=nothing-like-this").content.decode()


def test_the_new_run_page_carries_the_train_row_counts_for_the_step_count(logged_in):
    page = logged_in.get("/runs/new/").content.decode()
    rows = Dataset.objects.get(name="rag_qa_train").row_count
    assert 'id="train-dataset-rows"' in page and f'"rag_qa_train": {rows}' in page
