"""What the run pages compute from the rows (runs/page_data.py): live figures, timeline, samples, compare, dashboard."""

from datetime import timedelta

import pytest
from django.utils import timezone

from datasets_app.models import Dataset
from runs import page_data
from runs.models import PipelineRun, RunEvent, RunResult, SampleResult, ScoreComparison

from .factories import make_run

pytestmark = pytest.mark.django_db


def at(run, status, when, message=""):
    event = RunEvent.objects.create(run=run, from_status="pending", to_status=status, message=message)
    RunEvent.objects.filter(pk=event.pk).update(at=when)


def test_timeline_gives_each_status_its_date_and_duration():
    now = timezone.now()
    user = _user()
    run = make_run(user, status="completed", started_at=now - timedelta(seconds=100), finished_at=now)
    RunEvent.objects.filter(run=run).update(at=now - timedelta(seconds=130))
    at(run, "training", now - timedelta(seconds=100))
    at(run, "evaluating", now - timedelta(seconds=40))
    at(run, "completed", now)
    run = PipelineRun.objects.prefetch_related("events").get(pk=run.pk)
    entries = page_data.run_timeline(run, now=now)
    assert [e["status"] for e in entries] == ["pending", "training", "evaluating", "completed"]
    assert [round(e["seconds"]) if e["seconds"] is not None else None for e in entries] == [30, 60, 40, None]
    assert entries[-1]["terminal"] and not any(e["current"] for e in entries)
    assert user.runs.count() == 1


def test_a_running_stage_counts_up_to_now():
    now = timezone.now()
    run = make_run(_user(), status="training")
    RunEvent.objects.filter(run=run).update(at=now - timedelta(seconds=90))
    at(run, "training", now - timedelta(seconds=75))
    entries = page_data.run_timeline(PipelineRun.objects.get(pk=run.pk), now=now)
    assert entries[-1]["current"] and round(entries[-1]["seconds"]) == 75


def test_live_stats_while_training_come_from_the_timed_history_and_the_training_job():
    now = timezone.now()
    history = [{"step": s, "loss": 2.0 - s / 100, "learning_rate": 1e-4, "epoch": s / 20, "elapsed_seconds": 2.0 * s, "tokens": 100 * s,
                "device": "cpu"} for s in range(1, 31)]
    training = {"step": "finetune", "state": "running", "attempts": 1, "figures": {"total_steps": 60, "device": "cpu"}}
    run = make_run(_user(), status="training", progress=40, stage="training step 30/60, epoch 1.50, loss 1.7",
                   train_history=history, started_at=now - timedelta(seconds=80), jobs=(training,))
    stats = page_data.run_live_stats(PipelineRun.objects.get(pk=run.pk), now=now)
    assert round(stats["elapsed_seconds"]) == 80
    assert (stats["steps"], stats["total_steps"]) == (30, 60)
    assert stats["steps_per_second"] == pytest.approx(0.5) and stats["tokens_per_second"] == pytest.approx(50.0)
    # the training job's own ETA: 30 steps left at 0.5 steps/s; the run's needs paces nothing here has measured yet
    assert stats["training_eta_seconds"] == pytest.approx(60) and "30 training steps left at 0.50 steps/s" in stats["training_eta_basis"]
    assert stats["eta_seconds"] is None and stats["eta_basis"].startswith("no estimate yet")
    assert stats["speed_basis"] == "between the first and the latest step" and stats["device"] == "cpu"
    # Peak memory is measured for the job when it ends: the page says so instead of guessing.
    assert [item.split(" (")[0] for item in stats["not_recorded"]] == ["peak memory"]


def test_live_stats_after_training_read_the_training_jobs_figures():
    now = timezone.now()
    figures = {"device": "cuda:0", "dtype": "bfloat16", "steps": 6, "tokens_per_second": 1234.0, "step_seconds": 0.5,
               "peak_memory_bytes": 3 * 1024**3}
    run = make_run(_user(), status="evaluating", progress=80, stage="generating answers", started_at=now - timedelta(seconds=50),
                   train_history=[{"step": 6, "loss": 5.3, "learning_rate": 0.0, "epoch": 1.0}],
                   jobs=({"step": "finetune", "state": "done", "attempts": 1, "figures": figures},))
    stats = page_data.run_live_stats(run, now=now)
    assert (stats["device"], stats["dtype"], stats["steps"]) == ("cuda:0", "bfloat16", 6)
    assert stats["steps_per_second"] == pytest.approx(2.0) and stats["tokens_per_second"] == 1234
    assert stats["eta_seconds"] is None and "answer generation" in stats["eta_basis"]  # no constant, no guess from the run's bar
    assert stats["peak_memory_bytes"] == 3 * 1024**3 and "GPU" in stats["peak_memory_basis"] and stats["not_recorded"] == []


def test_no_figure_is_read_from_a_log_line():
    logs = "[t] trained 6 steps on cuda:0 (bfloat16) in 3.0s: final loss 5.3081, 1234 tokens/s, peak memory 9.2 GiB\n"
    run = make_run(_user(), status="evaluating", logs=logs, jobs=({"step": "finetune", "state": "done", "attempts": 1},))
    stats = page_data.run_live_stats(run)
    assert stats["device"] == "" and stats["tokens_per_second"] is None and stats["peak_memory_bytes"] is None


def test_an_eval_only_run_reports_no_training_figures():
    stats = page_data.run_live_stats(make_run(_user(), kind="eval_only", status="evaluating", progress=0))
    assert stats["not_recorded"] == [] and stats["steps"] is None and stats["eta_seconds"] is None


def test_mlflow_links_point_at_make_mlflow_ui_for_the_local_store(settings):
    run = make_run(_user(), mlflow_experiment_id="3", mlflow_run_id="abc", registered_model_name="rag-lora", registered_model_version="2")
    settings.MLFLOW_UI_URL, settings.MLFLOW_TRACKING_URI = "", "sqlite:////tmp/mlflow.db"
    links = page_data.mlflow_ui_links(run)
    assert links == {"needs_local_ui": "make mlflow-ui", "run": "http://127.0.0.1:5000/#/experiments/3/runs/abc",
                     "model": "http://127.0.0.1:5000/#/models/rag-lora/versions/2"}
    settings.MLFLOW_TRACKING_URI = "http://mlflow:5000/"
    assert page_data.mlflow_ui_links(run)["run"] == "http://mlflow:5000/#/experiments/3/runs/abc"
    assert "needs_local_ui" not in page_data.mlflow_ui_links(run)


def test_highlight_marks_the_ground_truths_words_but_not_the_common_ones():
    pieces = page_data.highlight("Water boils at 100 degrees, the Boiling point.", "At sea level water boils at 100 C.")
    assert [text for text, found in pieces if found] == ["Water", "boils", "100"]
    assert "".join(text for text, _ in pieces) == "Water boils at 100 degrees, the Boiling point."
    assert page_data.highlight("", "anything") == []


def scored(user, per_sample):
    """A fine-tune with rouge_score per sample: per_sample[i] = (finetuned, base); None is not measured."""
    run = make_run(user, status="completed")
    dataset = Dataset.objects.get(name="ragas_eval")
    run.eval_datasets.set([dataset])
    for index, pair in enumerate(per_sample):
        for variant, value in zip(("finetuned", "base"), pair, strict=True):
            SampleResult.objects.create(run=run, dataset=dataset, variant=variant, index=index, question=f"q{index}", contexts=["c"],
                                        ground_truth="paris is the capital", answer=f"{variant} says paris",
                                        scores={"rouge_score": value, "exact_match": 0.0},
                                        reasons={} if value is not None else {"rouge_score": "timeout"})
    return run


def test_samples_sort_by_the_per_sample_difference_and_filter_wins_and_losses():
    run = scored(_user(), [(0.5, 0.5), (0.9, 0.1), (0.2, 0.6), (None, 0.3), (0.4, 0.3)])
    order = lambda **kw: [r["index"] for r in page_data.sample_rows(run, **kw)["rows"]]  # noqa: E731
    assert order(sort="wins") == [1, 4, 0, 2, 3]  # not measured last
    assert order(sort="losses") == [2, 0, 4, 1, 3]
    assert order(show="better") == [1, 4] and order(show="worse") == [2] and order(show="same") == [0] and order(show="unmeasured") == [3]
    assert order(sort="score_desc", variant="base") == [2, 0, 3, 4, 1]
    data = page_data.sample_rows(run)
    assert data["metric"] == "rouge_score" and data["paired"]
    row = data["rows"][1]
    assert row["difference"] == pytest.approx(0.8)
    assert [c["variant"] for c in row["columns"]] == ["finetuned", "base"]
    assert ("paris", True) in row["columns"][0]["pieces"]
    unmeasured = data["rows"][3]["columns"][0]["scores"][0]
    assert unmeasured == {"metric": "rouge_score", "value": None, "reason": "timeout"}


def test_score_tables_flag_retrieval_metrics_and_attach_the_paired_comparison():
    run = make_run(_user(), status="completed")
    dataset = Dataset.objects.get(name="ragas_eval")
    for variant, value in (("finetuned", 0.8), ("base", 0.8)):
        RunResult.objects.create(run=run, dataset=dataset, variant=variant, metric="non_llm_context_recall", value=value, n_scored=4)
    for variant, value in (("finetuned", 0.4), ("base", 0.3)):
        RunResult.objects.create(run=run, dataset=dataset, variant=variant, metric="rouge_score", value=value, n_scored=4)
    ScoreComparison.objects.create(run=run, dataset=dataset, metric="rouge_score", n_pairs=4, base_mean=0.3, finetuned_mean=0.4, delta=0.1,
                                   ci_low=0.02, ci_high=0.18, p_value=0.03, p_adjusted=0.04, verdict="better")
    [table] = page_data.score_tables(run)
    rows = {r["metric"]: r for r in table["rows"]}
    assert rows["non_llm_context_recall"]["model_independent"] and not rows["rouge_score"]["model_independent"]
    assert rows["rouge_score"]["delta"] == pytest.approx(0.1) and rows["rouge_score"]["comparison"].verdict == "better"
    assert [r["metric"] for r in table["rows"]] == ["rouge_score", "non_llm_context_recall"]  # the config's order: rouge_score, exact_match
    chart = page_data.results_chart([table])["ragas_eval"]
    assert chart["metrics"] == ["rouge_score", "non_llm_context_recall"]
    assert chart["variants"] == {"finetuned": [0.4, 0.8], "base": [0.3, 0.8]} and chart["model_independent"] == [False, True]


def test_config_differences_leave_out_what_a_run_does_not_use():
    user = _user()
    finetune, other = make_run(user), make_run(user)
    other.config = {**other.config, "training": {**other.config["training"], "epochs": 5}}
    other.save()
    finetune.config["evaluation"].pop("judge", None)
    eval_only = make_run(user, kind="eval_only")
    eval_only.config["evaluation"]["judge"] = None  # null where another config has no key: no difference
    fields = {d["field"]: d["values"] for d in page_data.config_differences([finetune, other, eval_only])}
    assert fields["training.epochs"] == ["1", "5", "n/a"]
    assert "training.batch_size" not in fields  # the same in both fine-tunes; the eval-only run does not train
    assert "evaluation.judge" not in fields
    assert fields["kind"] == ["finetune", "finetune", "eval_only"]
    # Two identical fine-tunes: nothing differs.
    assert [d["field"] for d in page_data.config_differences([make_run(user), make_run(user)])] == []


def test_compare_keeps_base_scores_and_collects_loss_curves():
    user = _user()
    a = make_run(user, status="completed", train_history=[{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    b = make_run(user, kind="eval_only", status="completed")
    dataset = Dataset.objects.get(name="ragas_eval")
    RunResult.objects.create(run=a, dataset=dataset, variant="finetuned", metric="rouge_score", value=0.5, n_scored=2)
    RunResult.objects.create(run=a, dataset=dataset, variant="base", metric="rouge_score", value=0.3, n_scored=2)
    RunResult.objects.create(run=b, dataset=dataset, variant="dataset", metric="rouge_score", value=0.7, n_scored=2)
    data = page_data.compare_data(list(page_data.compare_queryset(PipelineRun.objects.filter(pk__in=[a.pk, b.pk]).order_by("pk"))))
    [row] = data["rows"]
    assert [(c["main"], c["value"], c["base"]) for c in row["cells"]] == [("finetuned", 0.5, 0.3), ("dataset", 0.7, None)]
    assert row["cells"][0]["delta"] == pytest.approx(0.2) and [c["n"] for c in row["cells"]] == [2, 2]
    assert not any("best" in c for c in row["cells"])  # no run is called best on a mean
    assert data["mains"] == ["fine-tuned", "stored answers"]
    assert data["losses"] == [{"run": f"#{a.pk} {a.name}", "steps": [1, 2], "loss": [2.0, 1.5]}]
    assert data["chart"]["panels"][0]["values"] == {"finetuned": [0.5, None], "base": [0.3, None], "dataset": [None, 0.7]}


def test_headline_names_its_variant_and_puts_retrieval_metrics_last():
    user = _user()
    run = make_run(user, status="completed")
    run.config["evaluation"]["metrics"] = ["non_llm_context_recall", "rouge_score"]
    run.save()
    dataset = Dataset.objects.get(name="ragas_eval")
    for metric, values in (("non_llm_context_recall", (1.0, 1.0)), ("rouge_score", (0.4, 0.25))):
        for variant, value in zip(("finetuned", "base"), values, strict=True):
            RunResult.objects.create(run=run, dataset=dataset, variant=variant, metric=metric, value=value, n_scored=1)
    heads = page_data.headline(PipelineRun.objects.prefetch_related("results__dataset").get(pk=run.pk))
    assert [(h["metric"], h["variant"]) for h in heads] == [("rouge_score", "fine-tuned"), ("non_llm_context_recall", "fine-tuned")]
    assert heads[0]["delta"] == pytest.approx(0.15)


def test_dashboard_search_and_duration_sort():
    user = _user()
    now = timezone.now()
    quick = make_run(user, status="completed", started_at=now - timedelta(seconds=10), finished_at=now)
    slow = make_run(user, status="completed", started_at=now - timedelta(seconds=900), finished_at=now)
    waiting = make_run(user)
    PipelineRun.objects.filter(pk=slow.pk).update(name="slow-one")
    qs = PipelineRun.objects.filter(owner=user)
    assert [r.pk for r in page_data.dashboard_order(qs, sort="-duration")] == [slow.pk, quick.pk, waiting.pk]
    assert [r.pk for r in page_data.dashboard_order(qs, sort="duration")] == [quick.pk, slow.pk, waiting.pk]
    assert [r.pk for r in page_data.dashboard_order(qs, search="SLOW")] == [slow.pk]
    assert page_data.run_duration(quick) == pytest.approx(10) and page_data.run_duration(waiting) is None
    assert page_data.model_label(make_run(user, kind="eval_only")) == "stored answers"
    assert page_data.model_label(quick) == "local:tiny-llama"


def _user():
    from django.contrib.auth import get_user_model

    count = get_user_model().objects.count()
    return get_user_model().objects.create_user(username=f"page-user-{count}", password="a-long-enough-passphrase")
