"""A prototype RQ worker that imports the ML stack once, in the worker's parent process.

RQ forks a fresh work-horse per job, and each horse imports torch, transformers,
peft, ragas, sentence-transformers and mlflow again (several seconds on 2 CPU
cores) before the job's real work begins; the inline path pays those imports
once. Importing them in the parent makes every horse inherit them (fork is
copy-on-write). Only imports: no model is loaded, no CUDA context is created
(the parent must stay CUDA-free so that its forked horses can use the GPU), no
database or MLflow connection is opened.

    python manage.py rqworker gpu --worker-class bench.preloading_worker.PreloadingWorker

Measured by bench/bench_orchestration.py (`--preload`); see bench/README.md.
"""

from __future__ import annotations

import importlib
import logging
import time

from rq import Worker

log = logging.getLogger(__name__)

PRELOAD = (
    "torch", "transformers", "peft", "sentence_transformers", "ragas", "mlflow",
    "training.services", "evaluation.services", "evaluation.scoring", "evaluation.generation",
)


def preload() -> float:
    started = time.monotonic()
    for name in PRELOAD:
        importlib.import_module(name)
    from evaluation.metrics import _factories

    _factories()  # the ragas metric classes
    import torch

    if torch.cuda.is_initialized():  # pragma: no cover - a guard, never expected
        raise RuntimeError("preloading initialised CUDA in the worker parent: forked work-horses could not use the GPU")
    return time.monotonic() - started


class PreloadingWorker(Worker):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        log.info("preloaded the ML stack in %.1fs", preload())
