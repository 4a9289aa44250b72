"""`manage.py build_tiny_model [NAME]`: the older name of `build_model` for the from-scratch tiny builds.

Kept so existing scripts and images keep working; it is `build_model` with
the name defaulting to tiny-llama and limited to the tiny builds.
"""

from training.tiny_model import SPECS

from .build_model import Command as BuildModelCommand


class Command(BuildModelCommand):
    help = "Build local:<name> (default tiny-llama) under MLOPS_MODELS_DIR, deterministically and offline (see build_model)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("name", nargs="?", default="tiny-llama", choices=sorted(SPECS))
        parser.add_argument("--force", action="store_true", help="Rebuild even if it exists.")
        parser.add_argument("--dry-run", action="store_true", help="Only say where it would be built.")
