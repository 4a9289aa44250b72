"""Fail runs whose worker stopped sending heartbeats; send again the jobs Redis lost.

A SIGKILLed RQ work-horse never runs on_failure, so its run would stay
`training` forever; and a job lost with a Redis restart (or never sent, Redis
being down) would leave its run waiting forever. This command (run
periodically by the scheduler service, or with --every) ends the first kind
`failed` with a reason saying so and sends the second kind's job again.
"""

import time

from django.conf import settings
from django.core.management.base import BaseCommand

from runs.reaper import REQUEUE_GRACE_SECONDS, reap_stale_runs, requeue_lost_jobs, stale_runs, waiting_runs


class Command(BaseCommand):
    help = "Mark runs with a stale heartbeat as failed (limit: REAPER_STALE_SECONDS) and re-send queued jobs Redis lost."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--stale-seconds", type=int, default=None, help="Override REAPER_STALE_SECONDS.")
        parser.add_argument(
            "--requeue-grace", type=int, default=REQUEUE_GRACE_SECONDS,
            help=f"Seconds a run may wait for a queued job before RQ is asked whether it still has it (default {REQUEUE_GRACE_SECONDS}).",
        )
        parser.add_argument("--every", type=float, default=0, help="Repeat every N seconds (a scheduler loop).")
        parser.add_argument("--dry-run", action="store_true", help="Only list the runs that would be failed or re-sent a job.")

    def handle(self, *args, stale_seconds: int | None, requeue_grace: int, every: float, dry_run: bool, **options) -> None:
        limit = stale_seconds if stale_seconds is not None else settings.REAPER_STALE_SECONDS
        while True:
            if dry_run:
                for run in stale_runs(stale_seconds=limit):
                    self.stdout.write(f"would fail #{run.pk} {run.name} ({run.status}, heartbeat {run.heartbeat_at})")
                if not settings.JOBS_INLINE:
                    for run in waiting_runs(grace_seconds=requeue_grace):
                        self.stdout.write(f"would check #{run.pk} {run.name}: waits for {run.current_job} since {run.heartbeat_at or run.created_at}")
            else:
                for run_id, outcome in requeue_lost_jobs(grace_seconds=requeue_grace):
                    self.stdout.write(self.style.WARNING(f"#{run_id}: {outcome}"))
                for run_id, reason in reap_stale_runs(stale_seconds=limit):
                    self.stdout.write(self.style.WARNING(f"failed #{run_id}: {reason}"))
            if not every:
                return
            time.sleep(every)
