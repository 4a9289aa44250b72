"""Fail runs whose worker stopped sending heartbeats.

A SIGKILLed RQ work-horse never runs on_failure, so its run would stay
`training` forever; this command (run periodically by the scheduler service,
or with --every) ends such runs `failed` with a reason saying so.
"""

import time

from django.conf import settings
from django.core.management.base import BaseCommand

from runs.reaper import reap_stale_runs, stale_runs


class Command(BaseCommand):
    help = "Mark runs with a stale heartbeat as failed (limit: REAPER_STALE_SECONDS)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--stale-seconds", type=int, default=None, help="Override REAPER_STALE_SECONDS.")
        parser.add_argument("--every", type=float, default=0, help="Repeat every N seconds (a scheduler loop).")
        parser.add_argument("--dry-run", action="store_true", help="Only list the runs that would be failed.")

    def handle(self, *args, stale_seconds: int | None, every: float, dry_run: bool, **options) -> None:
        limit = stale_seconds if stale_seconds is not None else settings.REAPER_STALE_SECONDS
        while True:
            if dry_run:
                for run in stale_runs(stale_seconds=limit):
                    self.stdout.write(f"would fail #{run.pk} {run.name} ({run.status}, heartbeat {run.heartbeat_at})")
            else:
                for run_id, reason in reap_stale_runs(stale_seconds=limit):
                    self.stdout.write(self.style.WARNING(f"failed #{run_id}: {reason}"))
            if not every:
                return
            time.sleep(every)
