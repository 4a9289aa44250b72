"""Import a JSONL file as a dataset, with the same validation as the upload API."""

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from datasets_app.services import DatasetImportError, dataset_import
from datasets_app.validation import validate_jsonl


class Command(BaseCommand):
    help = "Validate a JSONL file and register it as a train or eval dataset (nothing is stored on error)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("path", type=Path)
        parser.add_argument("--name", required=True)
        parser.add_argument("--type", required=True, choices=["train", "eval"], dest="kind")
        parser.add_argument("--description", default="")
        parser.add_argument("--dry-run", action="store_true", help="Validate only; store nothing.")

    def handle(self, *args, path: Path, name: str, kind: str, description: str, dry_run: bool, **options) -> None:
        if not path.is_file():
            raise CommandError(f"{path}: no such file")
        with open(path, "rb") as handle:
            if dry_run:
                report = validate_jsonl(handle, kind=kind, max_bytes=settings.DATASET_MAX_BYTES)
                if not report.ok:
                    raise CommandError(f"{path}: {report.summary()}")
                self.stdout.write(self.style.SUCCESS(f"{path}: valid, {report.row_count} rows (dry run, nothing stored)"))
                return
            try:
                dataset = dataset_import(name=name, kind=kind, fileobj=handle, description=description)
            except DatasetImportError as exc:
                raise CommandError(f"{exc.field}: {exc.message}") from None
        self.stdout.write(self.style.SUCCESS(f"imported {dataset.name}: {dataset.row_count} rows, sha256 {dataset.sha256}"))
