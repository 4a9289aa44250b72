"""The data check of a config before any run exists: the API, the New run form and `run_pipeline --check`.

One function answers all three, `check_config(config, owner)`: it validates the
config as run creation does, then runs the fine-tune step's own check
(`training.steps.data_check`, the report of training/data_check.py) on the
rows the run would use. Every fine-tune step runs the same check again before
training and stores its report with the run (runs/step_io.py
`record_data_check`), refusing to train when it finds a problem.

Where it runs: the check needs the base model's tokenizer (and builds a
`local:` model on first use). In the embedded default (settings.JOBS_INLINE)
that is this process. In served mode the web image has no model libraries, so
the check is a job on the `cpu` queue, whose return value is the report;
`check_config` waits for it up to CHECK_TIMEOUT_SECONDS.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from datasets_app.selectors import dataset_rows, datasets_by_names

from .config import validate_config
from .selectors import last_training_throughput, latest_difference_spreads
from .services import dataset_name_types

QUEUE = "cpu"
CHECK_TIMEOUT_SECONDS = 120
RESULT_TTL_SECONDS = 600


class DataCheckUnavailable(Exception):
    """No worker answered the check in time (served mode), or Redis is unreachable."""


class DataCheckFailed(Exception):
    """The check could not read what the config names: its base model (the tokenizer) or a dataset's rows.

    A problem of the config, so the API answers 400 naming `field` and the form shows it next to the field.
    """

    def __init__(self, *, field: str, message: str) -> None:
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


# Where an exception came from, by the frame it passed through -> the config field that names what failed to load.
FAILED_WHILE = {
    ("training.finetune", "load_tokenizer"): "model.base",
    ("training.local_models", "resolve_model_path"): "model.base",
    (__name__, "train_rows"): "datasets.train",
    (__name__, "validation_rows"): "training.validation_dataset",
    (__name__, "selection_rows"): "selection.rows",
    (__name__, "eval_sets"): "datasets.eval",
}


@dataclass
class EvalRows:
    name: str
    rows: list[dict[str, Any]]


class ConfigData:
    """A validated config's rows, as the fine-tune step's context gives them (training.steps.DataCheckContext)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.base_model: str = config["model"]["base"]

    def train_rows(self) -> list[dict[str, Any]]:
        by_name = datasets_by_names(self.config["datasets"]["train"])
        return [row for name in sorted(by_name) for row in dataset_rows(by_name[name])]

    def selection_rows(self) -> list[dict[str, Any]] | None:
        """The rows of the dataset selection.rows names; None for a share of the train rows, or no selection."""
        name = (self.config.get("selection") or {}).get("rows")
        return dataset_rows(datasets_by_names([name])[name]) if isinstance(name, str) else None

    def validation_rows(self) -> list[dict[str, Any]] | None:
        name = self.config["training"].get("validation_dataset")
        return dataset_rows(datasets_by_names([name])[name]) if name else None

    def eval_sets(self) -> list[EvalRows]:
        limit = self.config["evaluation"]["max_samples"]
        by_name = datasets_by_names(self.config["datasets"]["eval"])
        return [EvalRows(name=name, rows=dataset_rows(by_name[name], limit=limit)) for name in sorted(by_name)]

    def build_progress(self) -> Callable[[int, int], None]:
        return lambda step, total: None

    def throughput(self, device: str | None) -> dict[str, Any] | None:
        return last_training_throughput(base_model=self.base_model, device=device)

    def difference_spreads(self) -> dict[str, dict[str, dict[str, Any]]]:
        return latest_difference_spreads(self.config["datasets"]["eval"], self.config["evaluation"]["metrics"])


def check_validated(config: dict[str, Any], *, on_training_device: bool) -> dict[str, Any]:
    """The report for a validated config (here, in this process).

    Raises DataCheckFailed when the base model or a dataset cannot be read: a user's
    mistake (a folder without a tokenizer, a half-downloaded hub model) is a message
    about that field, not a server error.
    """
    from training.steps import data_check

    from .kinds import kind_named

    checked = kind_named(config["kind"]).data_check_config(config)
    if checked is None:
        return {"ok": True, "problems": [], "skipped": f"a {config['kind']} run trains nothing: there is no training data to check"}
    config = checked
    try:
        return data_check(ConfigData(config), on_training_device=on_training_device)
    except Exception as exc:
        field = _failed_while(exc)
        if field is None:
            raise  # not a model or a dataset that would not load: a fault of this server, logged as one
        what = f"the base model {config['model']['base']!r}" if field == "model.base" else "the rows of this dataset"
        detail = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
        raise DataCheckFailed(field=field, message=f"{what} could not be read to check the data: {type(exc).__name__}: {detail}") from exc


def _failed_while(exc: BaseException) -> str | None:
    """The field of FAILED_WHILE whose loader the exception passed through (the innermost), or None."""
    field, frame = None, exc.__traceback__
    while frame is not None:
        code = frame.tb_frame.f_code
        field = FAILED_WHILE.get((frame.tb_frame.f_globals.get("__name__", ""), code.co_name), field)
        frame = frame.tb_next
    return field


def check_config(config: Any, *, owner) -> dict[str, Any]:
    """Validate `config` for `owner` (ConfigError as run creation raises it) and return its data check report,
    with `run_estimate`: how long the whole run takes on this machine, stage by stage (runs/estimates.py).

    Raises DataCheckFailed when the base model or a dataset cannot be read, and
    DataCheckUnavailable when, in served mode, no cpu worker answers in time.
    """
    from .estimates import plan_for_config

    validated = validate_config(config, known_datasets=dataset_name_types(owner))
    report = check_validated(validated, on_training_device=True) if settings.JOBS_INLINE else _check_on_worker(validated)
    # How long the whole run takes here, from the paces this machine measured (the report's `estimate` is training's).
    return {**report, "run_estimate": plan_for_config(validated)}


def data_check_job(config: dict[str, Any]) -> dict[str, Any]:
    """The cpu queue's job: the report of an already validated config ({"check_failed": {field, message}} when it cannot run)."""
    try:
        return check_validated(config, on_training_device=False)
    except DataCheckFailed as exc:
        return {"check_failed": {"field": exc.field, "message": exc.message}}


def _check_on_worker(config: dict[str, Any]) -> dict[str, Any]:
    import django_rq
    from redis.exceptions import RedisError

    try:
        queue = django_rq.get_queue(QUEUE)
        job = queue.enqueue_call(
            data_check_job, args=(config,), job_id=f"data-check-{uuid.uuid4().hex[:16]}", timeout=CHECK_TIMEOUT_SECONDS,
            result_ttl=RESULT_TTL_SECONDS, failure_ttl=RESULT_TTL_SECONDS,
        )
        deadline = time.monotonic() + CHECK_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            status = str(getattr(job.get_status(refresh=True), "value", ""))
            if status == "finished":
                report = job.return_value()
                if isinstance(report, dict) and "check_failed" in report:
                    raise DataCheckFailed(**report["check_failed"])
                return report
            if status in ("failed", "stopped", "canceled"):
                lines = [line for line in (job.exc_info or "").strip().splitlines() if line.strip()]
                raise DataCheckUnavailable(f"the data check failed on the worker: {lines[-1][:500] if lines else status}")
            time.sleep(0.2)
        job.cancel()
    except RedisError as exc:
        raise DataCheckUnavailable(f"Redis cannot be reached, so no worker can check the data ({type(exc).__name__})") from exc
    raise DataCheckUnavailable(
        f"no cpu worker answered the data check within {CHECK_TIMEOUT_SECONDS}s: start one "
        "(`python manage.py rqworker cpu`, or the worker-cpu service of docker-compose.yml)"
    )


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The report as text lines (run_pipeline --check; the run's log has a one-line version)."""
    if report.get("skipped"):
        return [report["skipped"]]
    tokens, overlap, train_set, estimate = report["tokens"], report["overlap"], report["train_set"], report["estimate"]
    truncated = tokens["truncated"]

    def spread(summary: dict[str, Any] | None) -> str:
        return "-" if not summary else f"min {summary['min']}, median {summary['median']:g}, p95 {summary['p95']}, max {summary['max']}"

    lines = [
        f"base model {report['base_model']}, prompt format {tokens['prompt_format']}, max_seq_length {tokens['max_seq_length']}",
        f"train rows {tokens['rows']}, validation rows {report['validation']['rows']} ({report['validation']['source']})",
        f"prompt tokens: {spread(tokens['prompt_tokens'])}",
        f"answer tokens: {spread(tokens['answer_tokens'])}",
        f"cut by max_seq_length: {truncated['rows']} rows ({truncated['fraction']:.1%}): {truncated['context_cut']} lose context, "
        f"{truncated['answer_cut']} lose answer; longest row {tokens['longest']['row']}: {tokens['longest']['tokens']} tokens",
        f"train/eval overlap: {overlap['train_rows']} train rows ({overlap['exact']} exact, {overlap['near']} near pairs, "
        f"token-set ratio >= {overlap['threshold']:g})",
    ]
    lines += [
        f"  {p['kind']} {p['ratio']:g}: train row {p['train_row']} {p['train_question']!r} ~ {p['eval_dataset']} row {p['eval_row']} {p['eval_question']!r}"
        for p in overlap["pairs"][:10]
    ]
    lines.append(f"duplicate questions in the train rows: {train_set['duplicate_questions']}; empty answers: {train_set['empty_answers']}")
    seconds = estimate["seconds"]
    when = f"about {seconds / 60:.1f} min ({estimate['basis']})" if seconds is not None else estimate["basis"]
    lines.append(f"optimizer steps: {estimate['steps']}, {estimate['tokens']} tokens to train; training time: {when}")
    for dataset, by_metric in (report.get("power") or {}).items():
        for metric, power in by_metric.items():
            seen = (f"detects a mean difference of ±{power['mdd']:.3f} or more 80% of the time at 5% ({power['basis']}); "
                    + ", ".join(f"{n} rows for ±{t}" for t, n in (power.get("rows_for") or {}).items() if n) if power.get("mdd") is not None
                    else power["basis"])
            lines.append(f"power of {dataset} ({power['n']} pairs) on {metric}: {seen}")
    if report.get("selection"):
        selection = report["selection"]
        lines.append(f"selection rows {selection['rows']} ({selection['source']}); asking a question of the train / validation / eval rows: "
                     + " / ".join(str(selection["overlap"][k]["rows"]) for k in ("train", "validation", "eval")))
    return lines
