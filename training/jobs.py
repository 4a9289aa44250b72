"""RQ jobs of the gpu queue for training. Thin: load, claim, call the service."""

from runs.execution import execute_job
from runs.models import RunStatus


def finetune_job(run_id: int) -> None:
    from .services import run_finetune

    execute_job(run_id=run_id, job="finetune", status=RunStatus.TRAINING, body=run_finetune)
