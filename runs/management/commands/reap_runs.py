"""Apply each lost job's policy (resume, retry or fail its run); send again the jobs Redis lost.

A SIGKILLed RQ work-horse never runs on_failure, so its job would stay running
and its run `training` forever; and a job lost with a Redis restart (or never
sent, Redis being down) would leave its run waiting forever. This command (run
periodically by the scheduler service, or with --every) gives the first kind
its step's policy (runs/kinds/base.py: a fine-tune resumes from its checkpoint,
a scoring job is sent again, anything else fails the run with a reason saying
so) and sends the second kind again.
"""

import time

from django.conf import settings
from django.core.management.base import BaseCommand

from runs.promotion import apply_pending_decisions
from runs.reaper import REQUEUE_GRACE_SECONDS, reap_stale_jobs, requeue_lost_jobs, stale_jobs, waiting_jobs


class Command(BaseCommand):
    help = "Apply the lost-job policy to jobs with a stale heartbeat (limit: REAPER_STALE_SECONDS) and re-send queued jobs Redis lost."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--stale-seconds", type=int, default=None, help="Override REAPER_STALE_SECONDS.")
        parser.add_argument(
            "--requeue-grace", type=int, default=REQUEUE_GRACE_SECONDS,
            help=f"Seconds a run may wait for a queued job before RQ is asked whether it still has it (default {REQUEUE_GRACE_SECONDS}).",
        )
        parser.add_argument("--every", type=float, default=0, help="Repeat every N seconds (a scheduler loop).")
        parser.add_argument("--dry-run", action="store_true", help="Only list the jobs that would be reaped or sent again.")

    def handle(self, *args, stale_seconds: int | None, requeue_grace: int, every: float, dry_run: bool, **options) -> None:
        limit = stale_seconds if stale_seconds is not None else settings.REAPER_STALE_SECONDS
        while True:
            if dry_run:
                for job in stale_jobs(stale_seconds=limit):
                    self.stdout.write(f"would reap #{job.run_id} {job.run.name} ({job.run.status}, {job.label} heartbeat {job.heartbeat_at})")
                if not settings.JOBS_INLINE:
                    for job in waiting_jobs(grace_seconds=requeue_grace):
                        self.stdout.write(f"would check #{job.run_id}: waits for {job.label} since {job.heartbeat_at}")
            else:
                for run_id, outcome in requeue_lost_jobs(grace_seconds=requeue_grace):
                    self.stdout.write(self.style.WARNING(f"#{run_id}: {outcome}"))
                for run_id, reason in reap_stale_jobs(stale_seconds=limit):
                    self.stdout.write(self.style.WARNING(f"#{run_id}: {reason}"))
                apply_pending_decisions()
            if not every:
                return
            time.sleep(every)
