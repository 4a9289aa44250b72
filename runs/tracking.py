"""MLflow tracking for pipeline runs, through MlflowClient (no global active run).

Jobs on different workers log into the same MLflow run: the first step creates
it (runs/step_io.py stores its id on the run through a service); later steps
write to that id. Nothing here touches the database.
"""

from __future__ import annotations

import functools
import re
import time
from pathlib import Path
from typing import Any

from django.conf import settings

from .config import flatten_config

MAX_PARAM_CHARS = 6000


@functools.cache
def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def client():
    return _client(settings.MLFLOW_TRACKING_URI)


def flatten(value: dict[str, Any]) -> dict[str, str]:
    """A nested dict as MLflow params/tags: dotted keys, string values cut to MLflow's limit."""
    return {key: str(item)[:MAX_PARAM_CHARS] for key, item in flatten_config(value).items()}


def experiment_id() -> str:
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(settings.MLFLOW_EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    served = settings.MLFLOW_TRACKING_URI.startswith(("http://", "https://", "databricks"))
    try:
        return mlflow_client.create_experiment(
            settings.MLFLOW_EXPERIMENT, artifact_location=None if served else settings.MLFLOW_ARTIFACT_ROOT
        )
    except Exception:  # Another worker created it first.
        return mlflow_client.get_experiment_by_name(settings.MLFLOW_EXPERIMENT).experiment_id


def mlflow_start(*, run_id: int, name: str, kind: str, config: dict[str, Any], tags: dict[str, str]) -> tuple[str, str]:
    """A new MLflow run for pipeline run `run_id`, with its config as params. Returns (experiment id, MLflow run id)."""
    from mlflow.entities import Param, RunTag

    mlflow_client = client()
    exp_id = experiment_id()
    created = mlflow_client.create_run(exp_id, run_name=f"{name} (#{run_id})", tags={"platform.run_id": str(run_id), "platform.kind": kind})
    config = dict(config)
    if (config.get("evaluation") or {}).get("judge"):
        # The judge is referenced by env-var name only; never a key.
        config["evaluation"] = {**config["evaluation"], "judge": {k: v for k, v in config["evaluation"]["judge"].items() if k != "api_key"}}
    params = [Param(k, v) for k, v in flatten(config).items()]
    for start in range(0, len(params), 100):
        mlflow_client.log_batch(created.info.run_id, params=params[start : start + 100])
    mlflow_client.log_batch(created.info.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])
    return exp_id, created.info.run_id


def log_datasets(mlflow_run_id: str, datasets: list[dict[str, Any]]) -> None:
    """The run's datasets as MLflow dataset inputs (the UI lists them with the run): name, digest from the file's sha256.

    Each item: {"name", "sha256", "rows", "context": "training" | "evaluation"}.
    """
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = [
        DatasetInput(
            # MLflow caps a digest at 36 characters: the sha256's first 36 hex digits; the whole one is in the profile.
            dataset=Dataset(name=d["name"], digest=d["sha256"][:36], source_type="local", source=json.dumps({"uri": f"platform-dataset:{d['name']}"}),
                            profile=json.dumps({"num_rows": d["rows"], "sha256": d["sha256"]})),
            tags=[InputTag(key="mlflow.data.context", value=d["context"])],
        )
        for d in datasets
    ]
    if inputs:
        _retry_on_conflict(lambda: client().log_inputs(mlflow_run_id, datasets=inputs), what="logging the run's datasets")


def _retry_on_conflict(call, *, what: str, attempts: int = 6):
    """MLflow's dataset table is check-then-insert: runs logging the same dataset at the same moment collide on its
    unique key (UNIQUE constraint / duplicate key; the server answers with the same message). The loser tries again
    and finds the row the winner inserted."""
    import random

    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return call()
        except MlflowException as exc:
            text = str(exc).lower()
            if attempt == attempts - 1 or not any(s in text for s in ("unique constraint", "duplicate key", "already exists", "integrityerror")):
                raise
            time.sleep(0.05 * (attempt + 1) + random.random() * 0.1)  # noqa: S311 - jitter, not security
    raise AssertionError(f"unreachable: {what}")


class MetricBuffer:
    """Batches step metrics into few log_batch calls (one HTTP request each in served mode)."""

    def __init__(self, mlflow_run_id: str, *, flush_every: float = 5.0) -> None:
        self.mlflow_run_id = mlflow_run_id
        self.flush_every = flush_every
        self.pending: list[Any] = []
        self.last_flush = time.monotonic()

    def add(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), now_ms, step) for key, value in values.items()]
        if time.monotonic() - self.last_flush >= self.flush_every or len(self.pending) >= 900:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            client().log_batch(self.mlflow_run_id, metrics=self.pending)
            self.pending = []
        self.last_flush = time.monotonic()


def log_metrics(mlflow_run_id: str, values: dict[str, float], step: int = 0) -> None:
    buffer = MetricBuffer(mlflow_run_id)
    buffer.add({k: v for k, v in values.items() if v is not None}, step)
    buffer.flush()


def log_text(mlflow_run_id: str, text: str, artifact_file: str) -> None:
    client().log_text(mlflow_run_id, text, artifact_file)


def set_tags(mlflow_run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    if tags:
        client().log_batch(mlflow_run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def log_artifacts(mlflow_run_id: str, local_dir: Path, artifact_path: str) -> None:
    client().log_artifacts(mlflow_run_id, str(local_dir), artifact_path)


def log_artifact(mlflow_run_id: str, local_file: Path, artifact_path: str | None = None) -> None:
    client().log_artifact(mlflow_run_id, str(local_file), artifact_path)


def download_artifacts(mlflow_run_id: str, artifact_path: str, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    return Path(client().download_artifacts(mlflow_run_id, artifact_path, str(dst)))


def registered_model_name(*, base_model: str, train_datasets: list[str]) -> str:
    """One registered model per base model + train datasets."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", base_model.removeprefix("local:")).strip("-")
    return f"rag-lora.{base}.{'+'.join(sorted(train_datasets))}"[:250]


def log_answer_model(run, *, adapter_dir: Path, example_rows: list[dict[str, Any]]) -> str:
    """The fine-tuned model as an MLflow pyfunc model (base reference + adapter + prompt format + generation settings)."""
    from training.pyfunc_model import log_pyfunc_model

    config = run.config
    training, evaluation = config.get("training") or {}, config["evaluation"]
    return log_pyfunc_model(
        tracking_uri=settings.MLFLOW_TRACKING_URI, run_id=run.mlflow_run_id, adapter_dir=adapter_dir, base_model=run.base_model,
        prompt_format=config["model"].get("prompt_format", "auto"), max_new_tokens=evaluation["max_new_tokens"],
        max_seq_length=training.get("max_seq_length", 512), batch_size=evaluation["batch_size"],
        input_example_rows=example_rows, precision=training.get("precision", "auto"),
    )


def register_model(*, name: str, model_uri: str, mlflow_run_id: str, description: str = "") -> str:
    """A new version of registered model `name` from a logged model. Returns the version."""
    from training.pyfunc_model import register

    version = register(tracking_uri=settings.MLFLOW_TRACKING_URI, name=name, model_uri=model_uri, run_id=mlflow_run_id,
                       tags={"platform.source": "rag-finetune-platform"})
    if description:
        client().update_model_version(name, version, description=description)
    return version


def versions_of_run(name: str, mlflow_run_id: str) -> list[str]:
    """The versions of registered model `name` made from this MLflow run (oldest first); [] when the model does not exist."""
    if not mlflow_run_id:
        return []
    found = client().search_model_versions(f"name='{name}' and run_id='{mlflow_run_id}'")
    return sorted((str(v.version) for v in found), key=int)


def delete_version(name: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client().delete_model_version(name, version)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" not in str(exc) and "not found" not in str(exc).lower():
            raise


def delete_run(mlflow_run_id: str) -> None:
    """The MLflow run deleted (its lifecycle stage) and its artifacts and logged models removed from the artifact store."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    mlflow_client = client()
    try:
        run = mlflow_client.get_run(mlflow_run_id)
    except MlflowException:
        return  # gone already
    try:
        models = mlflow_client.search_logged_models(experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id='{mlflow_run_id}'")
    except MlflowException:
        models = []
    for model in models:
        _delete_artifacts(get_artifact_repository, model.artifact_location)
        mlflow_client.delete_logged_model(model.model_id)
    _delete_artifacts(get_artifact_repository, run.info.artifact_uri)
    if run.info.lifecycle_stage != "deleted":
        mlflow_client.delete_run(mlflow_run_id)


def _delete_artifacts(get_artifact_repository, uri: str | None) -> None:
    if not uri:
        return
    try:
        get_artifact_repository(uri).delete_artifacts()
    except FileNotFoundError:
        pass


def mlflow_finish(mlflow_run_id: str, status: str) -> None:
    """FINISHED / FAILED / KILLED, matching the pipeline run's terminal status."""
    client().set_terminated(mlflow_run_id, status=status)


CHAMPION = "champion"


def champion_version(name: str) -> tuple[str, str] | None:
    """(version, MLflow run id) of the version holding the `champion` alias, or None."""
    from mlflow.exceptions import MlflowException

    try:
        version = client().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return str(version.version), version.run_id


def set_champion(name: str, version: str) -> None:
    client().set_registered_model_alias(name, CHAMPION, version)


def remove_champion(name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client().delete_registered_model_alias(name, CHAMPION)
    except MlflowException:
        pass  # no version held it


def set_version_tags(name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client().set_model_version_tag(name, version, key, str(value)[:5000])


def version_tags(name: str, version: str) -> dict[str, str]:
    return dict(client().get_model_version(name, version).tags)
