"""Build the from-scratch offline `local:` models (tokenizer + short pre-training) from the bundled data.

Pipelines build `local:tiny-llama` on first use; this command builds it ahead of
time (e.g. in an image) or rebuilds it with --force. `manage.py build_model NAME`
builds any local model (SmolLM2 too); this one stays for the tiny ones.
"""

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from training.local_models import build_local_model
from training.tiny_model import SPECS, local_model_dir


class Command(BaseCommand):
    help = "Build local:<name> (default tiny-llama) under MLOPS_MODELS_DIR, deterministically and offline."

    def add_arguments(self, parser) -> None:
        parser.add_argument("name", nargs="?", default="tiny-llama", choices=sorted(SPECS))
        parser.add_argument("--force", action="store_true", help="Rebuild even if it exists.")
        parser.add_argument("--dry-run", action="store_true", help="Only say where it would be built.")

    def handle(self, *args, name: str, force: bool, dry_run: bool, **options) -> None:
        target = local_model_dir(name)
        if dry_run:
            state = "exists" if target.exists() else "missing"
            self.stdout.write(f"local:{name} -> {target} ({state})")
            return
        if target.exists() and not force:
            self.stdout.write(self.style.NOTICE(f"local:{name} already built at {target} (use --force to rebuild)"))
            return
        bar = tqdm(desc=f"pre-training local:{name}", unit="step", leave=True)

        def progress(step: int, total: int) -> None:
            bar.total = total
            bar.update(step - bar.n)

        try:
            path = build_local_model(name, force=force, progress=progress)
        except Exception as exc:
            raise CommandError(f"could not build local:{name}: {exc}") from exc
        finally:
            bar.close()
        self.stdout.write(self.style.SUCCESS(f"built local:{name} at {path}"))
