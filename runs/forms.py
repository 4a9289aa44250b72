"""The "New run" form: every field of the config schema, validated by the same
pydantic schema as the API and the YAML loader (runs/config.py).

Ranges in the HTML (min/max) are read from the schema, so the form and the API
can never disagree about what is allowed.
"""

from __future__ import annotations

from typing import Any

from django import forms
from pydantic.fields import FieldInfo

from datasets_app.selectors import dataset_visible_to
from evaluation.metric_names import ALL_METRICS, DEFAULT_METRICS, JUDGE_METRICS

from .config import MAX_CONFIG_BYTES, ConfigError, EvaluationConfig, JudgeConfig, LoraConfig, TrainingConfig, parse_yaml, validate_config
from .services import dataset_name_types

# Config path -> form field. Errors on a path go to the field of its longest prefix here.
FIELD_PATHS = {
    "name": "name",
    "kind": "kind",
    "model": "base_model",
    "model.base": "base_model",
    "datasets.train": "train_datasets",
    "datasets.eval": "eval_datasets",
    "training.epochs": "epochs",
    "training.learning_rate": "learning_rate",
    "training.batch_size": "batch_size",
    "training.max_seq_length": "max_seq_length",
    "training.seed": "seed",
    "training.lora.r": "lora_r",
    "training.lora.alpha": "lora_alpha",
    "training.lora.dropout": "lora_dropout",
    "training.lora.target_modules": "target_modules",
    "training.gradient_accumulation_steps": "gradient_accumulation_steps",
    "training.gradient_checkpointing": "gradient_checkpointing",
    "training.max_steps": "max_steps",
    "evaluation": "metrics",
    "evaluation.answers": "answers",
    "evaluation.compare_base": "compare_base",
    "evaluation.metrics": "metrics",
    "evaluation.max_samples": "max_samples",
    "evaluation.max_new_tokens": "max_new_tokens",
    "evaluation.judge": "judge_base_url",
    "evaluation.judge.base_url": "judge_base_url",
    "evaluation.judge.model": "judge_model",
    "evaluation.judge.api_key_env": "judge_api_key_env",
}


def _bounds(info: FieldInfo) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for item in info.metadata:
        for name, attr in (("ge", "min"), ("gt", "min"), ("le", "max"), ("lt", "max")):
            if getattr(item, name, None) is not None:
                attrs[attr] = getattr(item, name)
    return attrs


def _int(model, name: str, **kwargs) -> forms.IntegerField:
    info = model.model_fields[name]
    bounds = _bounds(info)
    # Not required: a blank field takes the schema's default (and eval-only runs have no training).
    return forms.IntegerField(
        required=False, initial=info.default, min_value=bounds.get("min"), max_value=bounds.get("max"), **kwargs,
    )


def _float(model, name: str, step: str = "any", **kwargs) -> forms.FloatField:
    info = model.model_fields[name]
    bounds = _bounds(info)
    # Bounds are HTML hints only: exclusive bounds (gt) are left to the schema's own message.
    return forms.FloatField(required=False, initial=info.default, widget=forms.NumberInput(attrs={"step": step, **bounds}), **kwargs)


class RunForm(forms.Form):
    name = forms.CharField(max_length=200, initial="finetune-rag-qa")
    kind = forms.ChoiceField(choices=[("finetune", "Fine-tune + evaluate"), ("eval_only", "Evaluate only")], initial="finetune", widget=forms.RadioSelect)
    base_model = forms.CharField(
        max_length=500, initial="local:tiny-llama",
        help_text="local:tiny-llama (offline), a Hugging Face hub id such as Qwen/Qwen2.5-0.5B-Instruct, or a local path.",
    )
    train_datasets = forms.MultipleChoiceField(required=False, widget=forms.CheckboxSelectMultiple)
    eval_datasets = forms.MultipleChoiceField(widget=forms.CheckboxSelectMultiple)

    epochs = _int(TrainingConfig, "epochs")
    learning_rate = _float(TrainingConfig, "learning_rate")
    batch_size = _int(TrainingConfig, "batch_size")
    max_seq_length = _int(TrainingConfig, "max_seq_length")
    seed = _int(TrainingConfig, "seed")
    lora_r = _int(LoraConfig, "r", label="LoRA r")
    lora_alpha = _int(LoraConfig, "alpha", label="LoRA alpha")
    lora_dropout = _float(LoraConfig, "dropout", step="0.01", label="LoRA dropout")
    target_modules = forms.CharField(required=False, initial="all-linear", max_length=2000, help_text="all-linear, or module names separated by commas (q_proj, v_proj).")
    gradient_accumulation_steps = _int(TrainingConfig, "gradient_accumulation_steps")
    gradient_checkpointing = forms.BooleanField(required=False, help_text="Less activation memory, slower steps.")
    max_steps = forms.IntegerField(required=False, min_value=1, help_text="Stop after N optimizer steps (blank: all epochs).")

    answers = forms.ChoiceField(
        choices=[("generate", "Generate answers with the model"), ("dataset", "Score the answers stored in the eval set")],
        initial="generate", widget=forms.RadioSelect,
    )
    compare_base = forms.BooleanField(required=False, initial=True, help_text="Also score the base model so the gain is visible.")
    metrics = forms.MultipleChoiceField(choices=[(m, m) for m in ALL_METRICS], initial=DEFAULT_METRICS, widget=forms.CheckboxSelectMultiple)
    max_samples = forms.IntegerField(required=False, min_value=1, help_text="Score only the first N rows of each eval set (blank: all).")
    max_new_tokens = _int(EvaluationConfig, "max_new_tokens")

    judge_base_url = forms.CharField(required=False, max_length=500, label="Judge base URL", help_text="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (vLLM, Ollama, TGI, OpenAI).")
    judge_model = forms.CharField(required=False, max_length=200, label="Judge model")
    judge_api_key_env = forms.CharField(
        required=False, max_length=128, label="Judge API key variable", initial=JudgeConfig.model_fields["api_key_env"].default,
        help_text="The NAME of the environment variable holding the key on the workers; the key itself is never stored.",
    )

    def __init__(self, *args: Any, user, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.user = user
        datasets = list(dataset_visible_to(user).order_by("name").values_list("name", "kind", "row_count"))
        self.fields["train_datasets"].choices = [(n, f"{n} ({rows} rows)") for n, k, rows in datasets if k == "train"]
        self.fields["eval_datasets"].choices = [(n, f"{n} ({rows} rows)") for n, k, rows in datasets if k == "eval"]
        self.config: dict[str, Any] | None = None

    def metric_groups(self) -> list[tuple[str, list]]:
        options = list(self["metrics"])
        no_judge = [o for o in options if o.data["value"] not in JUDGE_METRICS]
        judged = [o for o in options if o.data["value"] in JUDGE_METRICS]
        return [("No judge needed", no_judge), ("Judge needed (LLM)", judged)]

    def to_config(self, data: dict[str, Any]) -> dict[str, Any]:
        targets = data.get("target_modules", "").strip()
        config: dict[str, Any] = {
            "name": data["name"],
            "kind": data["kind"],
            "model": {"base": data["base_model"]},
            "datasets": {"eval": list(data.get("eval_datasets") or [])},
            "evaluation": {
                "answers": data["answers"],
                "compare_base": bool(data.get("compare_base")),
                "metrics": list(data.get("metrics") or []),
                "max_samples": data.get("max_samples"),
                **({"max_new_tokens": data["max_new_tokens"]} if data.get("max_new_tokens") is not None else {}),
            },
        }
        if data.get("judge_base_url") or data.get("judge_model"):
            config["evaluation"]["judge"] = {
                "base_url": data.get("judge_base_url", ""), "model": data.get("judge_model", ""),
                "api_key_env": data.get("judge_api_key_env") or "OPENAI_API_KEY",
            }
        if data["kind"] == "finetune":
            config["datasets"]["train"] = list(data.get("train_datasets") or [])
            lora = {"r": data.get("lora_r"), "alpha": data.get("lora_alpha"), "dropout": data.get("lora_dropout")}
            if targets and targets != "all-linear":
                lora["target_modules"] = [t.strip() for t in targets.split(",") if t.strip()]
            training = {
                "epochs": data.get("epochs"), "learning_rate": data.get("learning_rate"), "batch_size": data.get("batch_size"),
                "max_seq_length": data.get("max_seq_length"), "seed": data.get("seed"),
                "lora": {k: v for k, v in lora.items() if v is not None},
                "gradient_accumulation_steps": data.get("gradient_accumulation_steps"),
                "gradient_checkpointing": bool(data.get("gradient_checkpointing")),
                "max_steps": data.get("max_steps"),
            }
            # Blank fields take the schema's defaults.
            config["training"] = {k: v for k, v in training.items() if v is not None or k == "max_steps"}
        return config

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if self.errors:
            return data
        try:
            self.config = validate_config(self.to_config(data), known_datasets=dataset_name_types(self.user))
        except ConfigError as exc:
            self.add_config_errors(exc)
        return data

    def add_config_errors(self, exc: ConfigError) -> None:
        for error in exc.errors:
            path = error["field"]
            match = max((p for p in FIELD_PATHS if path == p or path.startswith(p + ".") or path.startswith(p + "[")), key=len, default=None)
            message = error["message"] if match == path or not path else f"{path}: {error['message']}"
            self.add_error(FIELD_PATHS[match] if match else None, message)


def initial_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """Form values for a config (clone a run, or load a YAML file into the form)."""
    training = config.get("training") or {}
    lora = training.get("lora") or {}
    evaluation = config.get("evaluation") or {}
    judge = evaluation.get("judge") or {}
    targets = lora.get("target_modules", "all-linear")
    initial = {
        "name": config.get("name", ""),
        "kind": config.get("kind", "finetune"),
        "base_model": (config.get("model") or {}).get("base", "local:tiny-llama"),
        "train_datasets": (config.get("datasets") or {}).get("train", []),
        "eval_datasets": (config.get("datasets") or {}).get("eval", []),
        "target_modules": targets if isinstance(targets, str) else ", ".join(targets),
        "answers": evaluation.get("answers", "generate"),
        "compare_base": evaluation.get("compare_base", True),
        "metrics": evaluation.get("metrics", DEFAULT_METRICS),
        "max_samples": evaluation.get("max_samples"),
        "max_new_tokens": evaluation.get("max_new_tokens", 64),
        "judge_base_url": judge.get("base_url", ""),
        "judge_model": judge.get("model", ""),
        "judge_api_key_env": judge.get("api_key_env", "OPENAI_API_KEY"),
    }
    defaults = TrainingConfig().model_dump()
    for key in ("epochs", "learning_rate", "batch_size", "max_seq_length", "seed", "gradient_accumulation_steps", "gradient_checkpointing", "max_steps"):
        initial[key] = training.get(key, defaults[key])
    for key, field in (("r", "lora_r"), ("alpha", "lora_alpha"), ("dropout", "lora_dropout")):
        initial[field] = lora.get(key, defaults["lora"][key])
    return initial


def default_initial() -> dict[str, Any]:
    """The form starts as configs/finetune_rag_qa.yaml, the run `make run` launches."""
    from django.conf import settings

    path = settings.BASE_DIR / "configs" / "finetune_rag_qa.yaml"
    try:
        return initial_from_config(parse_yaml(path.read_text(encoding="utf-8"), source=str(path)))
    except (OSError, ConfigError):
        return {}


class YamlConfigForm(forms.Form):
    """Start from a YAML config: paste it or upload the file."""

    yaml_text = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 8, "spellcheck": "false"}), label="Paste YAML")
    yaml_file = forms.FileField(required=False, label="or upload a .yaml file")

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        upload = data.get("yaml_file")
        if upload is not None:
            if upload.size > MAX_CONFIG_BYTES:
                raise forms.ValidationError(f"the file is larger than {MAX_CONFIG_BYTES} bytes")
            try:
                text = upload.read().decode("utf-8")
            except UnicodeDecodeError:
                raise forms.ValidationError("the file is not UTF-8 text") from None
        else:
            text = data.get("yaml_text") or ""
        if not text.strip():
            raise forms.ValidationError("paste a YAML config or choose a file")
        try:
            parsed = parse_yaml(text, source="YAML")
        except ConfigError as exc:
            raise forms.ValidationError([e["message"] for e in exc.errors]) from None
        if not isinstance(parsed, dict):
            raise forms.ValidationError("the YAML must be a mapping (name: ..., kind: ..., ...)")
        data["config"] = parsed
        return data
