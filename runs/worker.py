"""The RQ worker the platform runs: it imports the ML stack once, in the worker's parent process.

RQ forks a fresh work-horse per job; with the stock worker each horse imports
torch, transformers, peft, ragas, sentence-transformers and mlflow again
(several seconds on 2 CPU cores) before the job's real work begins. Importing
them in the parent makes every horse inherit them (fork is copy-on-write).
Only imports: no model is loaded, no CUDA context is created (the parent must
stay CUDA-free so that its forked horses can use the GPU), no database or
MLflow connection is opened.

It is the default of `manage.py rqworker` (settings.RQ["WORKER_CLASS"], env
RQ_WORKER_CLASS), so `python manage.py rqworker gpu` and scripts/served_mode.sh
use it; docker-compose names it with --worker-class.
"""

from __future__ import annotations

import importlib
import logging
import time

from rq import Worker

log = logging.getLogger(__name__)

PRELOAD = (
    "torch", "transformers", "peft", "sentence_transformers", "ragas", "mlflow",
    "runs.pipeline", "training.finetune", "evaluation.scoring", "evaluation.generation", "evaluation.metrics",
)


def preload() -> float:
    """Import what every step needs; returns the seconds it took."""
    started = time.monotonic()
    for name in PRELOAD:
        importlib.import_module(name)
    from evaluation.metrics import metric_classes

    metric_classes()  # the ragas metric classes (their modules import lazily)
    from .sweeps import preload_study_storage

    preload_study_storage()  # a sweep's bookkeeping jobs open its Optuna study: 1.3 s per forked job otherwise
    import torch

    if torch.cuda.is_initialized():  # pragma: no cover - a guard, never expected
        raise RuntimeError("preloading initialised CUDA in the worker parent: forked work-horses could not use the GPU")
    return time.monotonic() - started


class PreloadingWorker(Worker):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        log.info("preloaded the ML stack in %.1fs", preload())
