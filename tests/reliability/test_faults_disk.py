"""The artifact directory cannot take the adapter: not a directory (ENOTDIR), or a
disk that is full (ENOSPC, from /dev/full). Root ignores file permissions here,
so these are errors the kernel returns even to root. The run fails with a
message saying what to fix."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import yaml
from django.core.management import call_command
from django.core.management.base import CommandError

from runs.models import ACTIVE_STATUSES, PipelineRun
from tests.conftest import status_changes

from .fault_tools import SHORT_FINETUNE

pytestmark = [pytest.mark.reliability, pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]


def run_inline(tmp_path: Path, config: dict) -> PipelineRun:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(CommandError, match="ended failed"):
        call_command("run_pipeline", str(path))
    return PipelineRun.objects.get()


def test_a_runs_directory_that_is_a_file_fails_the_run_before_training(tmp_path, settings, ledger):
    ledger.record("fault", "artifact directory unusable: a regular file where the runs directory should be (ENOTDIR)", "run failed before any training step, with 'cannot write the adapter to DIR: Not a directory (disk full or directory not writable)'")
    blocker = tmp_path / "runs"
    blocker.write_text("a file, not a directory")
    settings.RUNS_DIR = blocker
    run = run_inline(tmp_path, SHORT_FINETUNE)
    assert run.status == "failed"
    assert run.error == (
        f"finetune failed: ArtifactWriteError: cannot write the adapter to {blocker / str(run.pk) / 'adapter'}: "
        "Not a directory (disk full or directory not writable)"
    )
    assert run.train_history == []  # found out before loading the model, not after training
    from runs.tracking import client

    assert client().get_run(run.mlflow_run_id).info.status == "FAILED"  # the MLflow run the registry opened says so too
    assert status_changes(run) == ["pending", "training", "failed"]
    assert not PipelineRun.objects.filter(status__in=ACTIVE_STATUSES).exists()


def test_a_full_disk_when_the_adapter_is_saved_fails_the_run_with_that_reason(tmp_path, settings, ledger):
    ledger.record("fault", "disk full while the adapter is saved (ENOSPC from /dev/full)", "run failed after training with 'cannot write the adapter to DIR: No space left on device (disk full ...)'; nothing registered")
    runs_dir = tmp_path / "runs"
    settings.RUNS_DIR = runs_dir
    stop = threading.Event()

    def fill_the_disk() -> None:
        # Once the job has checked its directory, the adapter's config file becomes /dev/full:
        # every write to it fails with ENOSPC, as on a full disk.
        while not stop.wait(0.05):
            for run_dir in runs_dir.glob("*") if runs_dir.is_dir() else []:
                adapter = run_dir / "adapter"
                adapter.mkdir(exist_ok=True)
                (adapter / "adapter_config.json").symlink_to("/dev/full")
                return

    filler = threading.Thread(target=fill_the_disk, daemon=True)
    filler.start()
    try:
        run = run_inline(tmp_path, SHORT_FINETUNE)
    finally:
        stop.set()
        filler.join(timeout=5)
    assert run.status == "failed"
    adapter = runs_dir / str(run.pk) / "adapter"
    assert run.error == (
        f"finetune failed: ArtifactWriteError: cannot write the adapter to {adapter}: No space left on device (disk full or directory not writable)"
    )
    assert len(run.train_history) == SHORT_FINETUNE["training"]["max_steps"]  # it trained, then could not save
    assert run.registered_model_name == ""
    assert status_changes(run) == ["pending", "training", "failed"]
