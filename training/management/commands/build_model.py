"""Build any offline `local:` model ahead of time (an image, a fresh clone), or rebuild it with --force.

Pipelines build `local:<name>` on first use; `manage.py build_model smollm2-135m-instruct`
does it now, with a progress bar. The known names: training/local_models.py.
"""

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from training.local_models import KNOWN_LOCAL_MODELS, build_local_model, describe_progress, local_model, local_model_info
from training.tiny_model import local_model_dir


class Command(BaseCommand):
    help = "Build local:<name> under MLOPS_MODELS_DIR, deterministically and offline."

    def add_arguments(self, parser) -> None:
        parser.add_argument("name", choices=KNOWN_LOCAL_MODELS, help="the model, without its local: prefix")
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
        counts_stages = local_model(name).stages is not None
        bar = tqdm(desc=f"building local:{name}", unit="stage" if counts_stages else "step", leave=True)

        def progress(step: int, total: int) -> None:
            bar.total = total
            if counts_stages:
                bar.set_description(describe_progress(name, step, total), refresh=False)
            bar.update(step - bar.n)

        try:
            path = build_local_model(name, force=force, progress=progress)
        except Exception as exc:
            raise CommandError(f"could not build local:{name}: {exc}") from exc
        finally:
            bar.close()
        seconds = local_model_info(path).get("seconds")
        took = f" in {seconds} s" if seconds is not None else ""
        self.stdout.write(self.style.SUCCESS(f"built local:{name} at {path}{took}"))
