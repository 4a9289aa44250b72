"""Time estimates from this machine's measured paces (runs/estimates.py): before launch and while a run goes."""

from datetime import timedelta

import pytest
from django.utils import timezone

from runs import estimates, page_data
from runs.config import validate_config
from runs.models import PipelineRun

from .factories import finetune_config, make_run

pytestmark = pytest.mark.django_db

METRICS = ["exact_match", "rouge_score"]


def done(step, seconds, figures=None, *, ago=600):
    """A finished job that took `seconds` of wall time, with the figures it measured."""
    finished = timezone.now() - timedelta(seconds=ago)
    return {"step": step, "state": "done", "attempts": 1, "figures": figures or {}, "started_at": finished - timedelta(seconds=seconds),
            "finished_at": finished}


def measured_run(owner, **build):
    """A completed fine-tune of local:tiny-llama whose jobs measured their paces (and, with `build`, the model build)."""
    finetune = {"device": "cpu", "steps": 10, "step_seconds": 0.5, "tokens_per_second": 900.0, "seconds": 5.0}
    if build:
        finetune["model_build"] = {"model": "local:tiny-llama", "step": 276, "total": 276, "seconds": build["seconds"], "done": True}
    return make_run(owner, status="completed", jobs=(
        done("finetune", 20 + build.get("seconds", 0), finetune),  # 10 steps x 0.5 s + 15 s of loading and saving
        done("register", 3),
        done("generate", 8, {"device": "cpu", "answers": 20, "answers_per_second": 4.0}),  # 5 s generating + 3 s loading
        done("score", 12, {"samples": 20, "samples_per_second": 2.0, "metrics": METRICS}),  # 10 s scoring + 2 s
        done("compare", 1),
        done("promote", 1),
    ))


def test_before_anything_is_measured_there_is_no_estimate_and_it_says_which_stages(user):
    plan = estimates.plan_for_config(validate_config(finetune_config()))
    assert plan["seconds"] is None and plan["work"] == {"optimizer_steps": 3, "answers_generated": 6, "answers_scored": 6}
    assert plan["basis"].startswith("no estimate yet") and "fine-tuning" in plan["missing"] and "scoring" in plan["missing"]


def test_each_stage_is_its_work_at_the_pace_an_earlier_job_measured_here(user):
    earlier = measured_run(user)
    plan = estimates.plan_for_config(validate_config(finetune_config()))
    by_step = {stage["step"]: stage for stage in plan["stages"]}
    assert by_step["finetune"]["seconds"] == pytest.approx(3 * 0.5 + 15)
    assert by_step["finetune"]["basis"] == f"3 optimizer steps at 0.5 s per optimizer step, measured by run #{earlier.pk} on cpu, plus 15 s of loading and saving as there"
    assert by_step["generate"]["seconds"] == pytest.approx(6 / 4.0 + 3)
    assert by_step["score"]["seconds"] == pytest.approx(6 / 2.0 + 2)
    assert by_step["register"]["seconds"] == pytest.approx(3) and by_step["register"]["basis"] == f"as long as it took run #{earlier.pk}"
    assert plan["seconds"] == pytest.approx(16.5 + 3 + 4.5 + 5 + 1 + 1) and plan["missing"] == []


def test_a_pace_is_taken_only_from_a_comparable_job(user):
    measured_run(user)
    other_model = validate_config(finetune_config(model={"base": "local:smollm2-135m-instruct"}))
    plan = estimates.plan_for_config(other_model)
    by_step = {stage["step"]: stage for stage in plan["stages"]}
    assert by_step["finetune"]["seconds"] is None and "local:smollm2-135m-instruct" in by_step["finetune"]["basis"]
    assert by_step["generate"]["seconds"] is None and plan["seconds"] is None
    other_metrics = validate_config(finetune_config(evaluation={"metrics": ["bleu_score"], "max_samples": 3}))
    score = next(s for s in estimates.plan_for_config(other_metrics)["stages"] if s["step"] == "score")
    assert score["seconds"] is None  # scoring other metrics runs at another pace


def test_a_model_not_built_here_adds_its_measured_build(user, settings, tmp_path):
    measured_run(user, seconds=40)
    settings.MODELS_DIR = tmp_path  # nothing built here
    plan = estimates.plan_for_config(validate_config(finetune_config()))
    build = plan["stages"][0]
    assert build["label"] == "building local:tiny-llama (first use)" and build["seconds"] == 40
    # the build's time is not counted again in the fine-tune's loading time
    assert next(s for s in plan["stages"] if s["step"] == "finetune")["seconds"] == pytest.approx(3 * 0.5 + 15)
    # served mode: the workers' disks are not this server's, so no build is predicted
    settings.JOBS_INLINE = False
    assert not any(s["label"].startswith("building") for s in estimates.plan_for_config(validate_config(finetune_config()))["stages"])


def test_while_training_the_run_eta_is_the_training_jobs_own_pace_plus_the_measured_stages_left(user):
    measured_run(user)
    now = timezone.now()
    history = [{"step": s, "loss": 2.0, "learning_rate": 1e-4, "epoch": 0.1, "elapsed_seconds": 2.0 * s, "tokens": 100 * s} for s in range(1, 11)]
    training = {"step": "finetune", "state": "running", "attempts": 1, "figures": {"total_steps": 30, "device": "cpu"}, "progress": 1 / 3,
                "started_at": now - timedelta(seconds=40)}
    run = make_run(user, status="training", train_history=history, started_at=now - timedelta(seconds=40), jobs=(training,))
    stats = page_data.run_live_stats(PipelineRun.objects.get(pk=run.pk), now=now)
    assert stats["training_eta_seconds"] == pytest.approx(40)  # 20 steps left at 0.5 steps/s
    assert stats["eta_seconds"] == pytest.approx(40 + 3 + (6 / 4.0 + 3) + (6 / 2.0 + 2) + 1 + 1)
    assert [stage["label"] for stage in stats["eta_stages"]][0] == "fine-tuning" and stats["eta_stages"][0]["basis"].startswith("20 training steps left")


def test_a_running_model_build_is_a_build_with_its_own_pace_not_training(user):
    measured_run(user)
    now = timezone.now()
    building = {"step": "finetune", "state": "running", "attempts": 1, "progress": 0.0, "started_at": now - timedelta(seconds=50),
                "stage": "building local:tiny-llama on first use: pre-training step 160/276",
                "figures": {"model_build": {"model": "local:tiny-llama", "step": 160, "total": 276, "seconds": 40.0, "done": False}}}
    run = PipelineRun.objects.get(pk=make_run(user, status="training", progress=1, started_at=now - timedelta(seconds=50), jobs=(building,)).pk)
    stats = page_data.run_live_stats(run, now=now)
    assert stats["build"]["percent"] == 58 and stats["build"]["eta_seconds"] == pytest.approx(116 * 40 / 160)
    assert stats["steps"] is None and stats["training_eta_seconds"] is None and stats["training_eta_basis"] == ""
    # the run's ETA: the build's remaining time at its own pace, then the fine-tune at the measured pace, then the rest
    assert stats["eta_seconds"] == pytest.approx(29 + 16.5 + 3 + 4.5 + 5 + 1 + 1)
    [row] = page_data.run_job_rows(run, now=now)
    assert row["building"] and row["build"]["percent"] == 58 and row["eta_basis"] == "the build's own pace: 160 of 276 in 40 s"


def test_any_other_job_estimates_from_its_own_progress_over_its_time(user):
    now = timezone.now()
    generating = {"step": "generate", "state": "running", "attempts": 1, "progress": 0.25, "started_at": now - timedelta(seconds=30)}
    run = make_run(user, status="evaluating", jobs=(done("finetune", 10), generating))
    rows = page_data.run_job_rows(PipelineRun.objects.get(pk=run.pk), now=now)
    assert rows[1]["eta_seconds"] == pytest.approx(90) and rows[1]["eta_basis"] == "this job's own pace: 25% done in 30 s"
    assert rows[0]["eta_seconds"] is None  # done


def test_each_basis_names_its_units_in_plain_words(user):
    earlier = measured_run(user)
    stages = {s["step"]: s for s in estimates.plan_for_config(validate_config(finetune_config()))["stages"]}
    assert stages["generate"]["basis"].startswith(f"6 answers at 4 answers/s, measured by run #{earlier.pk} on cpu")
    assert stages["score"]["basis"].startswith(f"6 answers scored at 2 answers scored/s, measured by run #{earlier.pk}")
