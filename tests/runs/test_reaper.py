"""The reaper (runs/reaper.py): lost jobs get their step's policy, queued jobs Redis lost are sent again."""

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from runs.jobs import reap_job
from runs.models import Job, PipelineRun

from .factories import make_run

pytestmark = pytest.mark.django_db


def running(step: str, *, seconds_ago: float, attempts: int = 1, **fields) -> dict:
    return {"step": step, "state": "running", "attempts": attempts, "heartbeat_at": timezone.now() - timedelta(seconds=seconds_ago), **fields}


def test_the_reaper_fails_only_runs_whose_job_lost_its_heartbeat(user, settings):
    settings.REAPER_STALE_SECONDS = 60
    stale = make_run(user, status="training", jobs=(running("finetune", seconds_ago=300),))
    fresh = make_run(user, status="evaluating", jobs=(running("generate", seconds_ago=0),))
    pending = make_run(user, status="pending", jobs=({"step": "finetune", "state": "queued", "heartbeat_at": timezone.now() - timedelta(hours=1)},))
    done = make_run(user, status="completed", jobs=({"step": "compare", "state": "done", "heartbeat_at": timezone.now() - timedelta(hours=1)},))
    settings.JOBS_INLINE = False
    assert reap_job() == [stale.pk]
    statuses = dict(PipelineRun.objects.values_list("pk", "status"))
    assert statuses == {stale.pk: "failed", fresh.pk: "evaluating", pending.pk: "pending", done.pk: "completed"}
    stale.refresh_from_db()
    assert "no heartbeat for 300s (limit 60s) while training (finetune:running)" in stale.error
    assert "no checkpoint to resume from yet" in stale.error  # max_attempts 2, but nothing to resume from
    assert stale.events.last().to_status == "failed" and "worker lost" in stale.logs
    assert Job.objects.get(run=stale).state == "failed"


def test_a_lost_scoring_job_is_sent_again_and_fails_the_run_after_its_attempts(user, settings):
    settings.JOBS_INLINE = False
    settings.RQ_QUEUES = {name: {**conf, "URL": "redis://127.0.0.1:1/0"} for name, conf in settings.RQ_QUEUES.items()}  # sending fails quietly
    run = make_run(user, kind="eval_only", status="evaluating", jobs=(running("score", seconds_ago=300),))
    from runs.reaper import reap_stale_jobs

    (outcome,) = reap_stale_jobs(stale_seconds=60)
    assert "sending the score job again (attempt 2 of 3)" in outcome[1]
    job = Job.objects.get(run=run)
    assert (job.state, job.attempts) == ("queued", 1) and PipelineRun.objects.get(pk=run.pk).status == "evaluating"
    Job.objects.filter(pk=job.pk).update(state="running", attempts=3, heartbeat_at=timezone.now() - timedelta(seconds=300))
    reap_stale_jobs(stale_seconds=60)
    run.refresh_from_db()
    assert run.status == "failed" and "3 attempts of 3 used" in run.error


def test_a_lost_fine_tune_with_a_checkpoint_is_sent_again_to_resume(user, settings):
    settings.JOBS_INLINE = False
    settings.RQ_QUEUES = {name: {**conf, "URL": "redis://127.0.0.1:1/0"} for name, conf in settings.RQ_QUEUES.items()}
    run = make_run(user, status="training", jobs=(running("finetune", seconds_ago=300, checkpoint_step=6),))
    from runs.reaper import reap_stale_jobs

    (outcome,) = reap_stale_jobs(stale_seconds=60)
    assert "resuming from step 6 after the worker was lost (attempt 2 of 2)" in outcome[1]
    assert Job.objects.get(run=run).state == "queued"
    assert "resuming from step 6" in run.events.last().message


def test_reap_runs_command_dry_run_changes_nothing(user, capsys, settings):
    settings.JOBS_INLINE = False
    run = make_run(user, status="training", jobs=(running("finetune", seconds_ago=3600),))
    call_command("reap_runs", "--dry-run")
    assert f"would reap #{run.pk}" in capsys.readouterr().out
    assert PipelineRun.objects.get(pk=run.pk).status == "training"
    call_command("reap_runs")
    assert PipelineRun.objects.get(pk=run.pk).status == "failed"


def test_the_cron_config_schedules_the_reaper_on_the_cpu_queue():
    import redis
    from rq.cron import CronScheduler

    scheduler = CronScheduler(connection=redis.Redis())  # never connects: only the config is loaded
    scheduler.load_config_from_file("runs.cron")
    (job,) = scheduler.get_jobs()
    assert job.queue_name == "cpu" and job.func is reap_job and job.interval == 30


def test_pages_reap_stale_runs_in_the_embedded_default(client, user, settings):
    from runs import reaper

    settings.JOBS_INLINE = True
    reaper._last_embedded_reap[0] = 0.0
    run = make_run(user, status="training", jobs=(running("finetune", seconds_ago=3600),))
    client.force_login(user)
    client.get("/")
    assert PipelineRun.objects.get(pk=run.pk).status == "failed"


def test_a_job_waiting_in_a_queue_is_not_a_lost_worker(user, settings):
    settings.JOBS_INLINE = False  # served mode: the job waits in RQ for a free worker
    old = timezone.now() - timedelta(hours=1)
    waiting = make_run(user, status="evaluating", jobs=({"step": "generate", "state": "queued", "heartbeat_at": old},))
    lost = make_run(user, status="evaluating", jobs=({"step": "generate", "state": "running", "attempts": 1, "heartbeat_at": old},))
    from runs.reaper import reap_stale_jobs

    assert [run_id for run_id, _ in reap_stale_jobs(stale_seconds=60)] == [lost.pk]
    assert PipelineRun.objects.get(pk=waiting.pk).status == "evaluating"
    settings.JOBS_INLINE = True  # inline, a queued job runs at once: stale means its thread is gone
    assert [run_id for run_id, _ in reap_stale_jobs(stale_seconds=60)] == [waiting.pk]


def test_the_reaper_resends_nothing_inline(user, settings):
    from runs.reaper import requeue_lost_jobs

    settings.JOBS_INLINE = True
    make_run(user, status="pending", jobs=({"step": "score", "state": "queued", "heartbeat_at": timezone.now() - timedelta(hours=1)},))
    assert requeue_lost_jobs(grace_seconds=0) == []
