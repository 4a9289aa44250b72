"""RQ jobs: answer generation (gpu queue) and RAGAS scoring (cpu queue). Thin."""

from runs.execution import execute_job
from runs.models import RunStatus


def generate_job(run_id: int) -> None:
    from .services import run_generate

    execute_job(run_id=run_id, job="generate", status=RunStatus.EVALUATING, body=run_generate)


def score_job(run_id: int) -> None:
    from .services import run_score

    execute_job(run_id=run_id, job="score", status=RunStatus.EVALUATING, body=run_score)
