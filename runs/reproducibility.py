"""What it takes to reproduce a run: data hashes, seed, library versions, judge, commit."""

from __future__ import annotations

import os
import platform
import subprocess
from functools import cache
from importlib import metadata

from django.conf import settings

from .models import PipelineRun

LIBRARIES = ["torch", "transformers", "peft", "ragas", "mlflow", "django"]


@cache
def git_commit() -> str:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=settings.BASE_DIR, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def reproducibility_record(run: PipelineRun) -> dict:
    config = run.config
    judge = (config.get("evaluation") or {}).get("judge") or {}
    return {
        "datasets": {d.name: d.sha256 for d in [*run.train_datasets.all(), *run.eval_datasets.all()]},
        "seed": (config.get("training") or {}).get("seed"),
        "base_model": run.base_model,
        "libraries": library_versions(),
        "python": platform.python_version(),
        "judge_model": judge.get("model", ""),
        "git_commit": git_commit(),
    }
