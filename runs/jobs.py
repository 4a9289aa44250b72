"""RQ jobs of the runs app: the periodic reaper (scheduled by runs/cron.py)."""

from django.conf import settings

from .reaper import reap_stale_runs


def reap_job() -> list[int]:
    """Fail runs whose heartbeat went stale; returns their ids (kept as the job's result)."""
    return [run_id for run_id, _ in reap_stale_runs(stale_seconds=settings.REAPER_STALE_SECONDS)]
