"""RQ jobs of the runs app: the periodic reaper (scheduled by runs/cron.py)."""

from django.conf import settings

from .promotion import apply_pending_decisions
from .reaper import reap_stale_jobs, requeue_lost_jobs


def reap_job() -> list[int]:
    """Send again the queued jobs Redis lost, apply the lost workers' policies, give MLflow pending decisions.

    Returns the ids of the runs it acted on (kept as the job's result).
    """
    requeue_lost_jobs()
    acted = [run_id for run_id, _ in reap_stale_jobs(stale_seconds=settings.REAPER_STALE_SECONDS)]
    apply_pending_decisions()
    return acted
