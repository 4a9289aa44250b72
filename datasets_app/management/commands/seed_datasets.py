"""Register the six bundled datasets.

`migrate` already does this; the command exists for a database whose datasets were
deleted, and to show what is registered. Idempotent.
"""

from django.core.management.base import BaseCommand

from datasets_app.seeding import seed_datasets


class Command(BaseCommand):
    help = "Register the bundled train/eval datasets that are not registered yet (idempotent)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="Only say what would be registered.")

    def handle(self, *args, dry_run: bool = False, **options) -> None:
        for name, action in seed_datasets(dry_run=dry_run):
            style = self.style.SUCCESS if action == "created" else self.style.NOTICE
            self.stdout.write(style(f"{name}: {action}"))
