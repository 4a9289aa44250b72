"""Deleting a run: the one service the API (`DELETE /api/runs/{id}/`), the run page and the admin call.

Refused while the run is active (cancel it first) and while a version registered
from it holds the `champion` alias (demote it first): the message says which.
Otherwise, in this order, so that a failure part-way leaves a run that can be
deleted again rather than rows pointing at nothing:

1. a sweep's children, each the same way;
2. MLflow: the registered versions made from the run, then its MLflow run
   (deleted, its artifacts and logged models removed from the artifact store);
3. the run's files (working copies, checkpoints) under the runs directory;
4. the rows (events, jobs, results, samples, comparisons, decisions), in one transaction.
"""

from __future__ import annotations

import logging
import shutil

from django.core.exceptions import PermissionDenied

from . import tracking
from .models import TERMINAL_STATUSES, PipelineRun
from .services import RunNotDeletable, run_delete_rows
from .step_io import run_dir

log = logging.getLogger(__name__)


def run_delete(*, run_id: int, by) -> None:
    """Delete a finished run of `by` (or any run, for staff) with everything it made. Raises RunNotDeletable (409)."""
    run = PipelineRun.objects.get(pk=run_id)
    if not (by.is_staff or run.owner_id == by.pk):
        raise PermissionDenied(f"run {run_id} belongs to another user")
    _check_deletable(run)
    for child_id in PipelineRun.objects.filter(parent_id=run_id).values_list("pk", flat=True):
        run_delete(run_id=child_id, by=by)
    if run.mlflow_run_id:
        if run.registered_model_name:
            for version in tracking.versions_of_run(run.registered_model_name, run.mlflow_run_id):
                tracking.delete_version(run.registered_model_name, version)
        if run.config.get("datasets", {}).get("train"):  # a fine-tune's exports: its <model>.merged versions
            from .export import merged_model_name

            name = merged_model_name(run)
            for version in tracking.versions_of_run(name, run.mlflow_run_id):
                tracking.delete_version(name, version)
        tracking.delete_run(run.mlflow_run_id)
    shutil.rmtree(run_dir(run_id), ignore_errors=True)
    run_delete_rows(run_id=run_id)
    log.info("run %s deleted by %s", run_id, by.get_username())


def _check_deletable(run: PipelineRun) -> None:
    if run.status not in TERMINAL_STATUSES:
        raise RunNotDeletable(f"run {run.pk} is '{run.status}': cancel it first, then delete it")
    active = list(PipelineRun.objects.filter(parent_id=run.pk).exclude(status__in=TERMINAL_STATUSES).values_list("pk", flat=True)[:5])
    if active:
        raise RunNotDeletable(f"run {run.pk} still has running children ({', '.join(f'#{pk}' for pk in active)}): cancel them first")
    from .export import running_export

    exporting = running_export(run)
    if exporting is not None:
        raise RunNotDeletable(f"run {run.pk} is exporting ({exporting.label} is {exporting.state}): wait for the export to end, then delete it")
    if run.registered_model_name:
        champion = tracking.champion_version(run.registered_model_name)
        if champion is not None and champion[0] == run.registered_model_version:
            raise RunNotDeletable(
                f"run {run.pk}'s model {run.registered_model} holds the champion alias: demote it first "
                "(the run page's Model registry card), then delete the run"
            )
