"""Pages: status codes, login redirects, forms, HTMX fragments, polling stop, CSV."""

import csv
import io

import pytest
import yaml

from datasets_app.models import Dataset
from runs.models import PipelineRun, RunResult, SampleResult

from .factories import finetune_config, make_run

pytestmark = pytest.mark.django_db

PAGES = ["/", "/runs/new/", "/runs/{id}/", "/runs/{id}/status/", "/runs/{id}/row/", "/runs/{id}/results/", "/runs/{id}/samples.csv", "/compare/?runs={id}", "/datasets/", "/datasets/{ds}/"]


@pytest.fixture
def logged_in(client, user):
    client.force_login(user)
    return client


def scored_run(owner, *, kind="finetune", status="completed", cut_off: dict[str, list[bool | None]] | None = None):
    """Two samples per variant, scored; `cut_off`: {variant: [per sample]} where the token limit cut answers off (default: not recorded)."""
    run = make_run(owner, kind=kind, status=status)
    dataset = Dataset.objects.get(name="ragas_eval")
    run.eval_datasets.set([dataset])
    variants = ["finetuned", "base"] if kind == "finetune" else ["dataset"]
    for variant, offset in zip(variants, (0.2, 0.0), strict=False):
        RunResult.objects.create(run=run, dataset=dataset, variant=variant, metric="rouge_score", value=0.3 + offset, n_scored=2)
        RunResult.objects.create(run=run, dataset=dataset, variant=variant, metric="exact_match", value=None, n_scored=0, n_failed=2, failure_reasons={"timeout": 2})
        for index in range(2):
            SampleResult.objects.create(
                run=run, dataset=dataset, variant=variant, index=index, question=f"question {index}", contexts=["ctx"],
                ground_truth="truth", answer=f"=answer {variant} {index}", scores={"rouge_score": 0.1 * index + offset, "exact_match": None},
                reasons={"exact_match": "timeout"}, cut_off=(cut_off or {}).get(variant, [None, None])[index],
            )
    return run


@pytest.mark.parametrize("path", PAGES)
def test_anonymous_users_are_sent_to_login(client, user, path):
    run = make_run(user)
    response = client.get(path.format(id=run.pk, ds=Dataset.objects.first().pk))
    assert response.status_code == 302
    assert response.url.startswith("/accounts/login/")


@pytest.mark.parametrize("path", PAGES)
def test_every_page_renders_for_its_owner(logged_in, user, path):
    run = scored_run(user)
    response = logged_in.get(path.format(id=run.pk, ds=Dataset.objects.get(name="ragas_eval").pk))
    assert response.status_code in (200, 286), response.content[:500]


@pytest.mark.parametrize("path", ["/runs/{id}/", "/runs/{id}/status/", "/runs/{id}/results/", "/runs/{id}/samples.csv", "/runs/new/?clone={id}"])
def test_other_users_runs_are_not_found(client, other_user, user, path):
    run = scored_run(user)
    client.force_login(other_user)
    assert client.get(path.format(id=run.pk)).status_code == 404


def beating_run(owner, **fields):
    """A run whose job is alive: it beat just now. (Without a heartbeat an active run
    is what the embedded reaper, run by the dashboard and run pages, fails.)"""
    return make_run(owner, **fields)


def test_dashboard_filters_and_shows_headline_scores(logged_in, user):
    scored_run(user)
    beating_run(user, status="training")
    page = logged_in.get("/").content.decode()
    assert "rouge_score" in page and "+0.2000" in page
    assert page.count('hx-trigger="every 2s"') == 1  # only the unfinished run polls
    filtered = logged_in.get("/?status=training").content.decode()
    assert "+0.2000" not in filtered


def test_polling_fragments_stop_for_terminal_runs(logged_in, user):
    done, running = make_run(user, status="completed"), beating_run(user, status="training")
    assert logged_in.get(f"/runs/{done.pk}/status/").status_code == 286
    assert logged_in.get(f"/runs/{done.pk}/row/").status_code == 286
    assert logged_in.get(f"/runs/{running.pk}/status/").status_code == 200
    row = logged_in.get(f"/runs/{running.pk}/row/", HTTP_HX_REQUEST="true")
    assert row.status_code == 200 and row.content.decode().lstrip().startswith("<tr")


def test_run_page_shows_timeline_logs_error_and_loss_data(logged_in, user):
    run = make_run(user, status="failed", error="finetune failed: boom", logs="line one\n", train_history=[{"step": 1, "loss": 2.5, "learning_rate": 0.001, "epoch": 0.1}])
    page = logged_in.get(f"/runs/{run.pk}/").content.decode()
    assert "finetune failed: boom" in page and "line one" in page and "train-history" in page and '"loss": 2.5' in page
    assert "Cancel run" not in page


def test_cancel_button_cancels_through_the_status_machine(logged_in, user):
    run = beating_run(user, status="training")
    response = logged_in.post(f"/runs/{run.pk}/cancel/")
    assert response.status_code == 302
    run.refresh_from_db()
    assert run.status == "cancelled" and run.events.last().to_status == "cancelled"
    logged_in.post(f"/runs/{run.pk}/cancel/")  # a second cancel is refused with a message, not a crash
    assert logged_in.get(f"/runs/{run.pk}/").status_code == 200


def form_data(**overrides):
    data = {
        "name": "from-the-form", "kind": "finetune", "base_model": "local:tiny-llama", "train_datasets": ["rag_qa_train"],
        "eval_datasets": ["ragas_eval"], "epochs": 2, "learning_rate": 0.001, "batch_size": 8, "max_seq_length": 256, "max_truncated_fraction": 1.0, "seed": 1,
        "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear", "gradient_accumulation_steps": 1,
        "answers": "generate", "compare_base": "on", "metrics": ["rouge_score"], "max_new_tokens": 16, "judge_api_key_env": "OPENAI_API_KEY",
    }
    data.update(overrides)
    return data


def test_new_run_form_launches_a_run(logged_in, user):
    response = logged_in.post("/runs/new/", {**form_data(), "action": "launch"})
    run = PipelineRun.objects.get()
    assert response.status_code == 302 and response.url == f"/runs/{run.pk}/"
    assert run.owner == user and run.config["training"]["epochs"] == 2 and run.status == "pending"


def test_validate_shows_field_errors_inline_and_keeps_input(logged_in):
    response = logged_in.post("/runs/new/", {**form_data(epochs=0, name="keep-me", metrics=["faithfulness"]), "action": "validate"}, HTTP_HX_REQUEST="true")
    page = response.content.decode()
    assert response.status_code == 200
    assert page.lstrip().startswith('<form id="run-form"')  # an HTMX partial, not the whole page
    assert 'value="keep-me"' in page
    assert "greater than or equal to 1" in page  # epochs
    assert "need an LLM judge" in page
    assert not PipelineRun.objects.exists()
    ok = logged_in.post("/runs/new/", {**form_data(), "action": "validate"}, HTTP_HX_REQUEST="true")
    assert "The config is valid" in ok.content.decode() and not PipelineRun.objects.exists()


def test_a_bad_launch_re_renders_with_errors_and_creates_nothing(logged_in):
    response = logged_in.post("/runs/new/", {**form_data(train_datasets=[]), "action": "launch"})
    assert response.status_code == 200
    assert "at least one train dataset" in response.content.decode()
    assert not PipelineRun.objects.exists()


def test_eval_only_from_the_form(logged_in):
    logged_in.post("/runs/new/", {**form_data(kind="eval_only", answers="dataset", train_datasets=[]), "action": "launch"})
    run = PipelineRun.objects.get()
    assert run.kind == "eval_only"
    assert run.config["training"] is None and run.config["datasets"]["train"] == []


def test_yaml_loads_into_the_form(logged_in):
    text = yaml.safe_dump(finetune_config(name="from-yaml"))
    page = logged_in.post("/runs/new/", {"action": "load_yaml", "yaml_text": text}).content.decode()
    assert 'value="from-yaml"' in page
    bad = logged_in.post("/runs/new/", {"action": "load_yaml", "yaml_text": "name: x\n\tkind: y"}).content.decode()
    assert "line 2" in bad
    assert not PipelineRun.objects.exists()


def test_clone_prefills_the_form(logged_in, user):
    run = make_run(user)
    page = logged_in.get(f"/runs/new/?clone={run.pk}").content.decode()
    assert f'value="{run.name}-copy"' in page


def test_results_page_shows_difference_unmeasured_reasons_and_samples(logged_in, user):
    run = scored_run(user)
    page = logged_in.get(f"/runs/{run.pk}/results/").content.decode()
    # a difference without a paired verdict is not coloured: neither green for +0.2 nor red
    assert "+0.2000" in page and "delta-pos" not in page and "delta-neg" not in page
    assert "not measured" in page and "timeout ×2" in page
    assert "question 1" in page and "results-chart-data" in page
    assert 'class="cut-off"' not in page  # the run did not record whether an answer was cut off: nothing said
    worst = logged_in.get(f"/runs/{run.pk}/results/?sort=rouge_score:finetuned&order=asc&worst=1").content.decode()
    assert "question 0" in worst and "question 1" not in worst


def test_results_page_marks_each_answer_the_token_limit_cut_off_and_counts_them_per_variant(logged_in, user):
    run = scored_run(user, cut_off={"finetuned": [False, True], "base": [True, True]})
    page = logged_in.get(f"/runs/{run.pk}/results/").content.decode()
    summary = page[page.index('id="cut-off-summary-ragas_eval"'):]
    summary = summary[:summary.index("</p>")]
    assert "1 of 2 fine-tuned answers cut off at 8 tokens; 2 of 2 base model answers cut off at 8 tokens." in summary
    assert 'title="A cut-off answer used all evaluation.max_new_tokens new tokens without reaching a stop token' in summary
    marks = [piece.split("</p>")[0] for piece in page.split('<p class="cut-off" title="It used all 8 new tokens')[1:]]
    assert len(marks) == 3 and all(m.endswith("Cut off: it used all 8 new tokens without finishing.") for m in marks)
    sample_0 = page[page.index('id="sample-ragas_eval-0"'):page.index('id="sample-ragas_eval-1"')]
    assert sample_0.count('class="cut-off"') == 1  # its base answer, not its fine-tuned one
    assert sample_0.index('class="cut-off"') > sample_0.index('<div class="answer base">')


def csv_rows(response) -> list[list[str]]:
    assert response.status_code == 200, response.content[:300]
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    return list(csv.reader(io.StringIO(response.content.decode())))


def test_samples_csv_has_every_column_and_row_neutralised(logged_in, user):
    run = scored_run(user, cut_off={"finetuned": [False, True]})
    response = logged_in.get(f"/runs/{run.pk}/samples.csv")
    assert response["Content-Disposition"] == f'attachment; filename="run-{run.pk}-samples.csv"'
    rows = csv_rows(response)
    assert len(rows) == 1 + 2  # the header, then one line per (dataset, index) with both variants side by side
    assert rows == [
        ["dataset", "index", "question", "ground_truth", "answer_finetuned", "answer_base",
         "rouge_score_finetuned", "exact_match_finetuned", "rouge_score_base", "exact_match_base", "cut_off_finetuned", "cut_off_base"],
        # exact_match was not measured on any sample: empty cells, never 0. Answers starting with = are neutralised.
        # Whether the token limit cut an answer off: true or false, empty where not recorded.
        ["ragas_eval", "0", "question 0", "truth", "'=answer finetuned 0", "'=answer base 0", "0.2", "", "0.0", "", "false", ""],
        ["ragas_eval", "1", "question 1", "truth", "'=answer finetuned 1", "'=answer base 1", str(0.1 + 0.2), "", "0.1", "", "true", ""],
    ]


def test_results_csv_linked_from_the_results_page_has_every_column_and_row(logged_in, user):
    run = scored_run(user)
    page = logged_in.get(f"/runs/{run.pk}/results/").content.decode()
    link = f"/api/runs/{run.pk}/export.csv"
    assert f'href="{link}"' in page
    response = logged_in.get(link)
    assert response["Content-Disposition"] == f'attachment; filename="run-{run.pk}-results.csv"'
    rows = csv_rows(response)
    assert len(rows) == 1 + 4  # the header, then one line per (dataset, metric, variant)
    no_comparison = [""] * 6
    assert rows == [
        ["run_id", "run_name", "dataset", "variant", "metric", "value", "n_scored", "n_failed",
         "n_pairs", "delta_vs_base", "ci_low", "ci_high", "p_adjusted", "verdict"],
        # Not measured: an empty value with n_scored 0 and every sample counted in n_failed.
        [str(run.pk), run.name, "ragas_eval", "base", "exact_match", "", "0", "2", *no_comparison],
        [str(run.pk), run.name, "ragas_eval", "finetuned", "exact_match", "", "0", "2", *no_comparison],
        [str(run.pk), run.name, "ragas_eval", "base", "rouge_score", "0.3", "2", "0", *no_comparison],
        [str(run.pk), run.name, "ragas_eval", "finetuned", "rouge_score", "0.5", "2", "0", *no_comparison],
    ]
    # With the compare step's result, the fine-tuned row carries it.
    from runs.services import run_record_comparisons

    run_record_comparisons(run_id=run.pk, comparisons=[{
        "dataset_id": Dataset.objects.get(name="ragas_eval").pk, "metric": "rouge_score", "n_pairs": 2, "n_excluded": 0,
        "base_mean": 0.3, "finetuned_mean": 0.5, "delta": 0.2, "ci_low": 0.1, "ci_high": 0.3, "p_value": 0.5, "p_adjusted": 0.5,
        "verdict": "too few pairs",
    }])
    rows = csv_rows(logged_in.get(link))
    assert rows[4] == [str(run.pk), run.name, "ragas_eval", "finetuned", "rouge_score", "0.5", "2", "0", "2", "0.2", "0.1", "0.3", "0.5", "too few pairs"]
    assert rows[3][-6:] == no_comparison  # the base row has none


def test_compare_calls_no_run_best_on_its_mean_and_diffs_configs(logged_in, user):
    a, b = scored_run(user), scored_run(user)
    b.config = {**b.config, "name": "other"}
    b.save()
    RunResult.objects.filter(run=b, variant="finetuned", metric="rouge_score").update(value=0.9)
    page = logged_in.get(f"/compare/?runs={a.pk},{b.pk}").content.decode()
    assert "cell-best" not in page and "best" not in page.split('<table class="compare">')[1].split("</table>")[0]
    assert '<td class="num">0.9000 <span class="hint n-rows">n=2</span></td>' in page
    assert "Config differences" in page and ">name<" in page and ">other<" in page
    assert logged_in.get("/compare/").status_code == 302


def test_static_assets_are_served_locally():
    from django.contrib.staticfiles import finders

    assert finders.find("vendor/plotly-basic-4.1.1.min.js")
    assert finders.find("django_htmx/htmx-2.min.js")
    assert finders.find("css/app.css") and finders.find("js/app.js")


def test_retry_button_creates_a_new_run_with_the_same_config(logged_in, user):
    failed = make_run(user, status="failed", error="boom")
    assert "Retry" in logged_in.get(f"/runs/{failed.pk}/").content.decode()
    response = logged_in.post(f"/runs/{failed.pk}/retry/")
    retried = PipelineRun.objects.exclude(pk=failed.pk).get()
    assert response.status_code == 302 and response.url == f"/runs/{retried.pk}/"
    assert retried.config["training"] == failed.config["training"] and retried.status == "pending"
    done = make_run(user, status="completed")
    logged_in.post(f"/runs/{done.pk}/retry/")
    assert PipelineRun.objects.count() == 3  # a completed run is not retried


def test_the_form_leaves_validation_to_the_server_and_lists_every_problem_at_the_top(logged_in):
    page = logged_in.get("/runs/new/").content.decode()
    assert '<form id="run-form"' in page and "novalidate>" in page.split('<form id="run-form"', 1)[1].split("\n", 1)[0]
    assert '<details class="advanced" id="advanced">' in page  # closed: nothing wrong inside
    for action, headers in (("validate", {"HTTP_HX_REQUEST": "true"}), ("launch", {})):  # one style for both buttons
        response = logged_in.post("/runs/new/", {**form_data(base_model="", epochs=0, lora_r=0), "action": action}, **headers)
        page = response.content.decode()
        assert response.status_code == 200 and not PipelineRun.objects.exists()
        assert "3 problems; nothing was created" in page
        assert '<a href="#field-base_model">Base model</a> <code>model.base</code>: required' in page
        assert '<a href="#field-lora_r">LoRA r</a> <code>training.lora.r</code>' in page
        assert '<details class="advanced" id="advanced" open>' in page  # LoRA r is an advanced field


def test_a_yaml_that_is_refused_keeps_the_form_as_the_user_had_it_and_names_the_line(logged_in):
    response = logged_in.post("/runs/new/", {**form_data(name="my-edits", epochs=7, learning_rate=0.003), "action": "load_yaml",
                                             "yaml_text": "name: x\nkind: finetune\n  datasets: [oops\n"})
    page = response.content.decode()
    assert response.status_code == 200
    assert "The YAML was not loaded; the form is as you left it." in page and "invalid YAML at line 3" in page
    form = response.context["form"]
    assert form["name"].value() == "my-edits" and str(form["epochs"].value()) == "7" and str(form["learning_rate"].value()) == "0.003"
    assert form["train_datasets"].value() == ["rag_qa_train"] and not form.errors  # shown as typed, not judged
    assert 'value="my-edits"' in page
    assert "name: x\nkind: finetune\n  datasets: [oops" in page  # the YAML stays in its box, to fix
    assert not PipelineRun.objects.exists()


def test_a_yaml_sent_alone_and_refused_shows_the_defaults(logged_in):
    response = logged_in.post("/runs/new/", {"action": "load_yaml", "yaml_text": "- not a mapping\n"})
    assert "must be a mapping" in response.content.decode()
    assert response.context["form"]["name"].value() == "finetune-rag-qa"


def test_a_made_up_hub_model_is_refused_in_one_round_and_check_data_says_so(logged_in):
    for action in ("validate", "check"):
        response = logged_in.post("/runs/new/", {**form_data(base_model="nobody/made-up-model-xyz"), "action": action}, HTTP_HX_REQUEST="true")
        assert response.status_code == 200
        errors = response.context["form"].errors
        assert list(errors) == ["base_model"] and "not in this machine's Hugging Face cache and the hub is offline" in errors["base_model"][0]
        assert "The config is valid" not in response.content.decode()
    assert not PipelineRun.objects.exists()
