"""The run config schema, validated once at the boundary.

Used by the API, the YAML loader (`manage.py run_pipeline`), the admin and the
forms. Errors name the field by its dotted path (`training.lora.r`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evaluation.metric_names import ALL_METRICS, DEFAULT_METRICS, needs_judge
from mlops_site.limits import StructureLimitError, check_structure

CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
DATASET_NAME_RE = r"^[a-z0-9][a-z0-9_-]{0,99}$"
DatasetName = Annotated[str, Field(pattern=DATASET_NAME_RE)]
MAX_CONFIG_BYTES = 256 * 1024


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class LoraConfig(Strict):
    r: int = Field(8, ge=1, le=256)
    alpha: int = Field(16, ge=1, le=1024)
    dropout: float = Field(0.05, ge=0.0, le=0.9)
    target_modules: Literal["all-linear"] | Annotated[list[Annotated[str, Field(min_length=1, max_length=100)]], Field(min_length=1, max_length=64)] = "all-linear"


class EarlyStoppingConfig(Strict):
    """Stop when validation loss has not improved by more than min_delta for `patience` evaluations."""

    # null: off (train every step asked for).
    patience: int | None = Field(None, ge=1, le=1000)
    min_delta: float = Field(0.0, ge=0.0, le=100.0)


class TrainingConfig(Strict):
    epochs: int = Field(3, ge=1, le=100)
    learning_rate: float = Field(2.0e-4, gt=0.0, le=1.0)
    batch_size: int = Field(8, ge=1, le=1024)
    max_seq_length: int = Field(512, ge=16, le=32768)
    seed: int = Field(42, ge=0, le=2**32 - 1)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    gradient_checkpointing: bool = False
    warmup_ratio: float = Field(0.0, ge=0.0, le=0.5)
    # Stops after this many optimizer steps (a smoke run); null trains every epoch.
    max_steps: int | None = Field(None, ge=1, le=1_000_000)
    # "auto": bf16 where it is measured to win without changing answers (a bf16 CUDA GPU; training on a CPU with
    # AMX/AVX-512 BF16 and a model with hidden_size >= 256), float32 elsewhere: training/precision.py.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # Held-out share of the train rows (seeded, disjoint from training) for the validation loss; 0: none.
    validation_split: float = Field(0.1, ge=0.0, le=0.5)
    # A train-kind dataset to validate on instead of a split (not one of datasets.train).
    validation_dataset: DatasetName | None = None
    # Validation every N optimizer steps; null: once per epoch and at the end.
    eval_every: int | None = Field(None, ge=1, le=1_000_000)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    # A checkpoint every N optimizer steps; null: about every 5 minutes of training (and at each validation).
    checkpoint_every: int | None = Field(None, ge=1, le=1_000_000)
    # Attempts in all: a fine-tune whose worker died is sent again and resumes from its last checkpoint.
    max_attempts: int = Field(2, ge=1, le=10)
    # Refuse a config whose max_seq_length would cut more than this share of the train rows.
    max_truncated_fraction: float = Field(0.1, ge=0.0, le=1.0)

    @field_validator("early_stopping", mode="before")
    @classmethod
    def _early_stopping_off(cls, value: Any) -> Any:
        return {} if value is None else value


class JudgeConfig(Strict):
    base_url: str = Field(min_length=1, max_length=500)
    model: str = Field(min_length=1, max_length=200)
    api_key_env: str = Field("OPENAI_API_KEY", max_length=128)
    timeout: float = Field(60.0, gt=0, le=3600)
    max_retries: int = Field(2, ge=0, le=10)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/$.?#][^\s]*$", value):
            raise ValueError("must be an http(s) URL of an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
        check_judge_url(value)
        return value

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not ENV_NAME_RE.match(value):
            raise ValueError("must be the NAME of an environment variable holding the key, not the key itself")
        return value


def _url_parts(url: str) -> tuple[str, str, int | None, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port, parts.path


def check_judge_url(url: str, *, allowed_prefixes: Sequence[str] | None = None) -> None:
    """Refuse a judge base_url with credentials in it, or (when the operator set
    MLOPS_JUDGE_URL_PREFIXES) one that is not under a listed prefix. Raises ValueError.

    A prefix matches on scheme, host and port exactly and on whole path segments,
    so http://judge:8000/v1 does not let http://judge:8000.evil.example/ through.
    """
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials (user:password@); name the key's variable in api_key_env")
    try:
        scheme, host, port, path = _url_parts(url)
    except ValueError as exc:  # a port that is not a number
        raise ValueError(f"is not a valid URL ({exc})") from None
    prefixes = _setting_list("MLOPS_JUDGE_URL_PREFIXES") if allowed_prefixes is None else list(allowed_prefixes)
    if not prefixes:
        return
    for prefix in prefixes:
        p_scheme, p_host, p_port, p_path = _url_parts(prefix)
        if (scheme, host, port) != (p_scheme, p_host, p_port):
            continue
        p_path = p_path.rstrip("/")
        if path.rstrip("/") == p_path or path.startswith(p_path + "/"):
            return
    raise ValueError(f"is not one of the judge endpoints this server allows (MLOPS_JUDGE_URL_PREFIXES: {', '.join(prefixes)})")


class EvaluationConfig(Strict):
    answers: Literal["generate", "dataset"] = "generate"
    compare_base: bool = True
    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_METRICS), min_length=1, max_length=len(ALL_METRICS))
    judge: JudgeConfig | None = None
    # Score at most this many rows of each eval dataset (quick runs); null scores all.
    max_samples: int | None = Field(None, ge=1, le=1_000_000)
    max_new_tokens: int = Field(64, ge=1, le=4096)
    batch_size: int = Field(8, ge=1, le=512)
    # Accept train rows whose question duplicates (or nearly) an eval question; refused by default.
    allow_overlap: bool = False

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in ALL_METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(ALL_METRICS)}")
        if len(set(value)) != len(value):
            raise ValueError("lists a metric twice")
        return value

    @model_validator(mode="after")
    def _judge_for_llm_metrics(self) -> EvaluationConfig:
        judged = [m for m in self.metrics if needs_judge(m)]
        if judged and self.judge is None:
            raise ValueError(
                f"metric(s) {', '.join(judged)} need an LLM judge: set evaluation.judge "
                "{base_url, model, api_key_env} or remove them"
            )
        return self


def _printable(value: str) -> str:
    if CONTROL_CHARS.search(value):
        raise ValueError("must not contain control characters (NUL, newlines, tabs)")
    return value


Printable = Annotated[str, AfterValidator(_printable)]


# A Hugging Face hub id as huggingface_hub accepts one: "name" or "org/name", no "--" or "..".
HUB_ID_RE = re.compile(r"^(?!.*(?:--|\.\.))[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(?:/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
# The local builds when training/local_models.py is not there (runs/config.py needs no torch, nor training).
FALLBACK_LOCAL_MODELS = ("tiny-llama", "small-llama", "smollm2-135m-instruct")


def known_local_models() -> tuple[str, ...]:
    """The `local:<name>` builds this installation can make."""
    try:
        from training.local_models import KNOWN_LOCAL_MODELS
    except ImportError:
        try:
            from training.tiny_model import SPECS
        except ImportError:
            return FALLBACK_LOCAL_MODELS
        return (*SPECS, "smollm2-135m-instruct")
    return tuple(KNOWN_LOCAL_MODELS)


def _setting_list(name: str) -> list[str]:
    """A list setting from Django settings when they are configured, else from the
    environment (colon-separated for paths, comma-separated for URLs)."""
    try:
        from django.conf import settings

        if settings.configured:
            return list(getattr(settings, name, []) or [])
    except ImportError:  # pragma: no cover - Django is always installed with the app
        pass
    separator = ":" if name == "MLOPS_MODEL_PATHS" else ","
    return [item.strip() for item in os.environ.get(name, "").split(separator) if item.strip()]


def _looks_like_path(base: str) -> bool:
    return base.startswith(("/", "./", "../", "~")) or base in (".", "..") or "\\" in base or not HUB_ID_RE.match(base)


def check_model_reference(base: str, *, allowed_dirs: Sequence[str | Path] | None = None, loadable: bool = False) -> None:
    """Refuse a model.base that names anything but a known local build, a hub id,
    or a folder under the operator's MLOPS_MODEL_PATHS. Raises ValueError saying why.

    The same rule at validation (web, API, commands) and on the worker before it
    loads anything: a config stored before the operator changed the list is
    refused there too. allowed_dirs defaults to settings.MLOPS_MODEL_PATHS.
    loadable (validation): a hub id must also be in this machine's Hugging Face
    cache, or known to the hub when it is online (runs/model_refs.py).
    """
    if base.startswith("local:"):
        name = base.removeprefix("local:")
        known = known_local_models()
        if name not in known:
            raise ValueError(f"unknown local model {base!r}; known: {', '.join('local:' + n for n in known)}")
        return
    # A hub-shaped name that exists relative to the working directory is a path to
    # from_pretrained (it looks on disk first), so it is held to the path rule.
    if not _looks_like_path(base) and not os.path.lexists(base):
        if loadable:
            from .model_refs import check_hub_model  # it imports this module

            check_hub_model(base)
        return
    if base.startswith("~"):
        raise ValueError("a local model path must be absolute (no ~)")
    dirs = [Path(d).resolve() for d in (_setting_list("MLOPS_MODEL_PATHS") if allowed_dirs is None else allowed_dirs)]
    if not dirs:
        raise ValueError(
            "local model paths are not enabled on this server (the operator lists allowed folders in MLOPS_MODEL_PATHS); "
            f"use a hub id (org/name) or one of {', '.join('local:' + n for n in known_local_models())}"
        )
    if not os.path.isabs(base):
        raise ValueError("a local model path must be absolute, under a folder listed in MLOPS_MODEL_PATHS")
    resolved = Path(base).resolve()  # `..` and symlinks resolved: where the worker would really read
    if not any(resolved == d or resolved.is_relative_to(d) for d in dirs):
        raise ValueError("this path is outside the folders the operator allows for models (MLOPS_MODEL_PATHS)")


def _model_reference(value: str) -> str:
    check_model_reference(value, loadable=True)
    return value


class ModelConfig(Strict):
    base: Annotated[Printable, AfterValidator(_model_reference)] = Field("local:tiny-llama", min_length=1, max_length=500)
    # auto: the tokenizer's chat template when it has one, else the plain "### Context" template (training/data.py).
    prompt_format: Literal["auto", "chat", "plain"] = "auto"


class DatasetsConfig(Strict):
    train: list[DatasetName] = Field(default_factory=list, max_length=20)
    eval: list[DatasetName] = Field(min_length=1, max_length=20)


class SelectionConfig(Strict):
    """Choose the checkpoint by scored RAG quality: at each selection point the fine-tune saves its adapter,
    answers the selection rows with it and sends those answers to be scored on the cpu queue while it trains on."""

    # One of evaluation.metrics that depends on the model; default: the first such configured metric.
    metric: str | None = Field(None, max_length=64)
    # "epoch": at the end of every epoch; a number: every N optimizer steps (and at the last step).
    every: Literal["epoch"] | Annotated[int, Field(ge=1, le=1_000_000)] = "epoch"
    # Stop when this many scored checkpoints in a row fail to beat the best by more than min_delta; null: never stop early.
    patience: int | None = Field(3, ge=1, le=1000)
    min_delta: float = Field(0.0, ge=0.0, le=100.0)
    # A fraction of the train rows (seeded, held out of training and validation), or a train-kind dataset's name.
    rows: Annotated[float, Field(gt=0.0, le=0.5)] | DatasetName = 0.1
    # At most this many selection rows are answered and scored at each point (the first, in the split's order).
    max_rows: int = Field(64, ge=1, le=10_000)


class SpaceRange(Strict):
    """A numeric range to sample from (random, tpe): integers for an integer field, log-uniform with `log`."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> SpaceRange:
        if self.high <= self.low:
            raise ValueError(f"high ({self.high:g}) must be above low ({self.low:g})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


SpaceValues = Annotated[list[Any], Field(min_length=1, max_length=100)]


class SweepSettings(Strict):
    """Many fine-tunes as one experiment: trials are child runs, chosen by Optuna, judged on their selection scores."""

    method: Literal["grid", "random", "tpe"] = "tpe"
    # {config path under training: [values] or {low, high, log}}, e.g. {"training.learning_rate": {"low": 1e-5, "high": 1e-3, "log": true}}
    space: dict[Annotated[str, Field(min_length=1, max_length=200)], SpaceValues | SpaceRange] = Field(min_length=1, max_length=20)
    trials: int = Field(8, ge=1, le=500)
    parallel: int = Field(2, ge=1, le=64)  # child runs in flight at once
    seed: int = Field(42, ge=0, le=2**32 - 1)


class PromotionConfig(Strict):
    """The registry gate: the new version becomes `champion` only if it is significantly better on this metric."""

    # Default: the first metric of evaluation.metrics.
    metric: str | None = Field(None, max_length=64)
    datasets: Literal["all"] | Annotated[list[DatasetName], Field(min_length=1, max_length=20)] = "all"
    min_delta: float = Field(0.0, ge=0.0, le=1000.0)


class ExportConfig(Strict):
    """Export the fine-tuned model as the run's last step (runs/export.py): merged weights and/or a GGUF, each checked."""

    merged: bool = False  # the adapter merged into the base, a Transformers folder registered as <model>.merged
    gguf: Literal["none", "f16", "q8_0"] = "none"  # a GGUF of the merged weights (Llama family)
    # The export check's equivalence margin: a mean metric difference within +-margin counts as none (TOST).
    margin: float = Field(0.01, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _asks_for_something(self) -> ExportConfig:
        if not self.merged and self.gguf == "none":
            raise ValueError("export: asks for nothing; set merged: true, gguf: f16 or q8_0, or both (or remove export)")
        return self


class RunConfig(Strict):
    """The whole config schema, every kind's sections (the New run form and the OpenAPI schema read it).

    A config is validated with its kind's model (runs/kinds/<kind>.py), a subclass
    of this one that adds the rules of that kind.
    """

    name: Printable = Field(min_length=1, max_length=200)
    kind: Literal["finetune", "eval_only", "sweep"]
    model: ModelConfig = Field(default_factory=ModelConfig)
    datasets: DatasetsConfig
    training: TrainingConfig | None = None
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    selection: SelectionConfig | None = None
    sweep: SweepSettings | None = None
    promotion: PromotionConfig | None = None
    export: ExportConfig | None = None


class ConfigError(Exception):
    """A config was refused. `errors` is a list of {"field", "message"}."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in errors))


def _field_path(location: tuple[Any, ...]) -> str:
    parts = []
    for part in location:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif part in ("function-after", "literal['all-linear']", "list[str]") or str(part).startswith(("function-", "literal[", "list[")):
            continue
        else:
            parts.append(("." if parts else "") + str(part))
    return "".join(parts)


def _pydantic_errors(exc: ValidationError) -> list[dict[str, str]]:
    errors = []
    for error in exc.errors(include_url=False):
        message = error["msg"].removeprefix("Value error, ")
        field = _field_path(tuple(error["loc"]))
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "string_too_short" and (error.get("ctx") or {}).get("min_length") == 1:
            message = "required"  # blank (or only spaces): "String should have at least 1 character" says it less plainly
        # Messages from model validators name their own field ("datasets.train: ...").
        if not field and ": " in message and re.match(r"^[a-z_.]+: ", message):
            field, message = message.split(": ", 1)
        errors.append({"field": field, "message": message})
    return errors


def validate_config(data: Any, *, known_datasets: dict[str, str] | None = None) -> dict[str, Any]:
    """Validate a config dict; returns the normalised dict (defaults filled in).

    known_datasets maps dataset name -> type ("train" or "eval"); when given,
    every named dataset must exist with the right type.
    """
    if not isinstance(data, dict):
        raise ConfigError([{"field": "", "message": f"config must be a mapping, got {type(data).__name__}"}])
    from .kinds import config_model

    try:
        config = config_model(data.get("kind")).model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_pydantic_errors(exc)) from None
    if known_datasets is not None:
        errors = []
        for role in ("train", "eval"):
            for position, name in enumerate(getattr(config.datasets, role)):
                kind = known_datasets.get(name)
                if kind is None:
                    errors.append({"field": f"datasets.{role}[{position}]", "message": f"unknown dataset {name!r}"})
                elif kind != role:
                    errors.append({"field": f"datasets.{role}[{position}]", "message": f"dataset {name!r} is a {kind} dataset, not {role}"})
        selection_rows = config.selection.rows if config.selection else None
        if isinstance(selection_rows, str):
            kind = known_datasets.get(selection_rows)
            if kind is None:
                errors.append({"field": "selection.rows", "message": f"unknown dataset {selection_rows!r}"})
            elif kind != "train":
                errors.append({"field": "selection.rows", "message": f"dataset {selection_rows!r} is a {kind} dataset, not train: "
                                                                     "selection rows are never eval rows"})
        validation = config.training.validation_dataset if config.training else None
        if validation is not None:
            kind = known_datasets.get(validation)
            if kind is None:
                errors.append({"field": "training.validation_dataset", "message": f"unknown dataset {validation!r}"})
            elif kind != "train":
                errors.append({"field": "training.validation_dataset", "message": f"dataset {validation!r} is a {kind} dataset, not train"})
        if errors:
            raise ConfigError(errors)
    return config.model_dump(mode="json")


class _SafeLoaderNoAliases(yaml.SafeLoader):
    """SafeLoader that refuses anchors/aliases: no "billion laughs" expansion."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed in configs", event.start_mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str, *, source: str = "config") -> Any:
    """Parse YAML text safely; errors name the line, or the size/depth limit it passed."""
    try:
        check_structure(text, syntax="yaml", max_bytes=MAX_CONFIG_BYTES, source=source)
    except StructureLimitError as exc:
        raise ConfigError([{"field": "", "message": str(exc)}]) from None
    try:
        return yaml.load(text, Loader=_SafeLoaderNoAliases)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([{"field": "", "message": f"{source}: invalid YAML{where}: {problem}"}]) from None


def judge_api_key(judge: dict[str, Any]) -> str:
    """The judge's API key, read from the named environment variable at use time."""
    return os.environ.get(judge["api_key_env"], "")


def flatten_config(value: Any, prefix: str = "") -> dict[str, Any]:
    """A config's leaves by dotted path ({"training.lora.r": 8, ...}): MLflow params, the compare page's diff."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten_config(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}
