"""RQ jobs of the runs app: the periodic reaper (scheduled by runs/cron.py)."""

from django.conf import settings

from .reaper import reap_stale_runs, requeue_lost_jobs


def reap_job() -> list[int]:
    """Send again the queued jobs Redis lost, then fail runs whose heartbeat went stale.

    Returns the ids of the runs it failed (kept as the job's result).
    """
    requeue_lost_jobs()
    return [run_id for run_id, _ in reap_stale_runs(stale_seconds=settings.REAPER_STALE_SECONDS)]
