from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from runs.jobs import reap_job
from runs.models import PipelineRun

from .factories import make_run

pytestmark = pytest.mark.django_db


def test_the_reaper_fails_only_active_runs_with_a_stale_heartbeat(user, settings):
    settings.REAPER_STALE_SECONDS = 60
    old = timezone.now() - timedelta(seconds=300)
    stale = make_run(user, status="training", heartbeat_at=old)
    fresh = make_run(user, status="evaluating", heartbeat_at=timezone.now())
    pending = make_run(user, status="pending", heartbeat_at=old)
    done = make_run(user, status="completed", heartbeat_at=old)
    assert reap_job() == [stale.pk]
    statuses = dict(PipelineRun.objects.values_list("pk", "status"))
    assert statuses == {stale.pk: "failed", fresh.pk: "evaluating", pending.pk: "pending", done.pk: "completed"}
    stale.refresh_from_db()
    assert "no heartbeat for 300s (limit 60s) while training" in stale.error
    assert stale.events.last().to_status == "failed" and "worker lost" in stale.logs


def test_reap_runs_command_dry_run_changes_nothing(user, capsys):
    run = make_run(user, status="training", heartbeat_at=timezone.now() - timedelta(hours=1))
    call_command("reap_runs", "--dry-run")
    assert f"would fail #{run.pk}" in capsys.readouterr().out
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
    run = make_run(user, status="training", heartbeat_at=timezone.now() - timedelta(hours=1))
    client.force_login(user)
    client.get("/")
    assert PipelineRun.objects.get(pk=run.pk).status == "failed"


def test_a_run_waiting_in_a_queue_is_not_a_lost_worker(user, settings):
    settings.JOBS_INLINE = False  # served mode: the job waits in RQ for a free worker
    old = timezone.now() - timedelta(hours=1)
    waiting = make_run(user, status="evaluating", heartbeat_at=old, current_job="generate:queued")
    running = make_run(user, status="evaluating", heartbeat_at=old, current_job="generate:running")
    from runs.reaper import reap_stale_runs

    assert [run_id for run_id, _ in reap_stale_runs(stale_seconds=60)] == [running.pk]
    assert PipelineRun.objects.get(pk=waiting.pk).status == "evaluating"
    settings.JOBS_INLINE = True  # inline, a queued job runs at once: stale means its thread is gone
    assert [run_id for run_id, _ in reap_stale_runs(stale_seconds=60)] == [waiting.pk]


def test_the_reaper_resends_nothing_inline(user, settings):
    from runs.reaper import requeue_lost_jobs

    settings.JOBS_INLINE = True
    make_run(user, status="pending", current_job="score:queued")
    assert requeue_lost_jobs(grace_seconds=0) == []
