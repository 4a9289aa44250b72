"""The "New run" form: every field of the config schema, driven by one table.

`FIELDS` lists (form field, config path) once; the form's fields, `to_config`
(form -> config), `initial_from_config` (config -> form: clone, load YAML), the
error mapping (a config error on `training.lora.r` goes next to `lora_r`) and
the layout (the basics first, the rest under *Advanced*) all read it. Types,
defaults, choices and ranges come from the pydantic models of runs/config.py,
so the form and the API can never disagree, and a schema field without a row
here fails tests/runs/test_forms.py.

Every problem shows in one round: a field sent blank that has no blank value is
"required" (never silently the default), and `validate_all` keeps validating
past the first refusal so the schema's cross-field rules speak too.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

from django import forms
from django.utils.html import format_html, format_html_join
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from datasets_app.selectors import dataset_visible_to
from evaluation.metric_names import ALL_METRICS, JUDGE_METRICS

from .config import MAX_CONFIG_BYTES, ConfigError, RunConfig, parse_yaml, validate_config
from .model_refs import hub_note, model_choices
from .services import dataset_name_types


@dataclass(frozen=True)
class FormField:
    name: str  # the form field (and HTML input) name
    path: str  # the config path it edits
    label: str = ""
    help: str = ""
    basic: bool = False  # shown at once; the others are under *Advanced* (opened when one of them has an error)


FIELDS: tuple[FormField, ...] = (
    FormField("name", "name", basic=True),
    FormField("kind", "kind", basic=True),
    FormField("base_model", "model.base", "Base model",
              "The list offers what loads here: local: builds (made offline on first use), Hugging Face models in this machine's "
              "cache, your earlier runs' models. Or type a hub id, or a folder under the operator's MLOPS_MODEL_PATHS.",
              basic=True),
    FormField("prompt_format", "model.prompt_format", "Prompt format", "auto: the tokenizer's chat template when it has one, else the plain template."),
    FormField("train_datasets", "datasets.train", "Train (fine-tune on all of them)", basic=True),
    FormField("eval_datasets", "datasets.eval", "Eval (results per dataset)", basic=True),
    FormField("epochs", "training.epochs", basic=True),
    FormField("learning_rate", "training.learning_rate", basic=True),
    FormField("batch_size", "training.batch_size", basic=True),
    FormField("max_seq_length", "training.max_seq_length", help="The context is cut first, never the question or the answer.", basic=True),
    FormField("seed", "training.seed"),
    FormField("lora_r", "training.lora.r", "LoRA r"),
    FormField("lora_alpha", "training.lora.alpha", "LoRA alpha"),
    FormField("lora_dropout", "training.lora.dropout", "LoRA dropout"),
    FormField("target_modules", "training.lora.target_modules", "Target modules", "all-linear, or module names separated by commas (q_proj, v_proj)."),
    FormField("gradient_accumulation_steps", "training.gradient_accumulation_steps", help="Effective batch = batch size x this, same memory."),
    FormField("gradient_checkpointing", "training.gradient_checkpointing", help="Less activation memory, ~30% slower steps."),
    FormField("warmup_ratio", "training.warmup_ratio", help="Linear warm-up share of the steps, then linear decay."),
    FormField("max_steps", "training.max_steps", help="Stop after N optimizer steps (blank: all epochs).", basic=True),
    FormField("precision", "training.precision", help="auto: bf16 on a CUDA GPU that supports it; training on a CPU with AMX/AVX-512 BF16 (models of hidden size 256 or more) under bf16 autocast; float32 elsewhere."),
    FormField("validation_split", "training.validation_split", help="Share of the train rows held out for the validation loss (0: none)."),
    FormField("validation_dataset", "training.validation_dataset", help="A train dataset to validate on instead of a split (blank: the split)."),
    FormField("eval_every", "training.eval_every", help="Validation every N steps (blank: once per epoch and at the end)."),
    FormField("early_stopping_patience", "training.early_stopping.patience", "Early stopping patience",
              "Stop after N validations without improvement (blank: off)."),
    FormField("early_stopping_min_delta", "training.early_stopping.min_delta", "Early stopping min delta"),
    FormField("checkpoint_every", "training.checkpoint_every", help="A checkpoint every N steps (blank: about every 5 minutes)."),
    FormField("max_attempts", "training.max_attempts", help="A fine-tune whose worker died resumes from its last checkpoint, up to this many attempts."),
    FormField("max_truncated_fraction", "training.max_truncated_fraction", help="Refuse the config if max_seq_length would cut more train rows than this share."),
    FormField("answers", "evaluation.answers", basic=True),
    FormField("compare_base", "evaluation.compare_base", "Compare with the base model", "Also score the base model so the gain is visible.", basic=True),
    FormField("metrics", "evaluation.metrics", basic=True),
    FormField("max_samples", "evaluation.max_samples", help="Score only the first N rows of each eval set (blank: all).", basic=True),
    FormField("max_new_tokens", "evaluation.max_new_tokens"),
    FormField("generation_batch_size", "evaluation.batch_size", "Generation batch size"),
    FormField("allow_overlap", "evaluation.allow_overlap", "Allow train/eval overlap",
              "Accept train rows whose question duplicates an eval question (refused by default)."),
    FormField("judge_base_url", "evaluation.judge.base_url", "Judge base URL", "OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (vLLM, Ollama, TGI, OpenAI)."),
    FormField("judge_model", "evaluation.judge.model", "Judge model"),
    FormField("judge_api_key_env", "evaluation.judge.api_key_env", "Judge API key variable",
              "The NAME of the environment variable holding the key on the workers; the key itself is never stored."),
    FormField("judge_timeout", "evaluation.judge.timeout", "Judge timeout (s)"),
    FormField("judge_max_retries", "evaluation.judge.max_retries", "Judge max retries"),
    FormField("selection_metric", "selection.metric", "Choose the checkpoint by",
              "Score a checkpoint on held-out selection rows at each selection point while training goes on, and keep the best "
              "by this metric (blank: off; the adapter of the best validation loss is kept).", basic=True),
    FormField("selection_every", "selection.every", "Selection every", "epoch, or a number of optimizer steps (and always at the last step)."),
    FormField("selection_rows", "selection.rows", "Selection rows",
              "A share of the train rows (e.g. 0.1, seeded, held out of training and validation), or a train dataset's name."),
    FormField("selection_max_rows", "selection.max_rows", "Selection rows at most"),
    FormField("selection_patience", "selection.patience", "Selection patience",
              "Stop training after N scored checkpoints in a row without a better score (blank: never stop early)."),
    FormField("selection_min_delta", "selection.min_delta", "Selection min delta"),
    FormField("sweep_method", "sweep.method", "Sweep method", "grid (every point of lists), random or tpe (Optuna)."),
    FormField("sweep_space", "sweep.space", "Search space",
              "YAML, a training config path per line: a list of values, or {low, high, log: true} for random and tpe; e.g. "
              "training.learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true} and training.lora.r: [4, 8, 16]."),
    FormField("sweep_trials", "sweep.trials", "Trials"),
    FormField("sweep_parallel", "sweep.parallel", "Trials at once"),
    FormField("sweep_seed", "sweep.seed", "Sweep seed"),
    FormField("promotion_metric", "promotion.metric", "Promotion metric", "The version becomes champion only if significantly better on it (blank: the first metric)."),
    FormField("promotion_datasets", "promotion.datasets", "Promotion datasets", "all, or eval dataset names separated by commas."),
    FormField("promotion_min_delta", "promotion.min_delta", "Promotion minimum gain"),
    FormField("export_merged", "export.merged", "Export merged weights",
              "At the end of the run: the adapter merged into the base, registered as <model>.merged, checked against the adapter."),
    FormField("export_gguf", "export.gguf", "Export GGUF", "At the end of the run: a GGUF of the merged weights (Llama family), checked too."),
    FormField("export_margin", "export.margin", "Export check margin", "A mean metric difference within this counts as none (equivalence test)."),
)
BY_PATH = {f.path: f for f in FIELDS}
# Sections that only exist in some configs: the judge when a URL or model is given, training for fine-tunes.
OPTIONAL_SECTIONS = ("evaluation.judge", "training", "selection", "sweep", "promotion", "export")
# Text fields for "a word or a list of names" config values, with the word.
LIST_OR_WORD = {"target_modules": "all-linear", "promotion_datasets": "all"}
# Text fields for "a word or a number" config values: a number when it reads as one (selection every epoch or every N
# steps; selection rows a share of the train rows or a dataset's name).
WORD_OR_NUMBER = {"selection_every": int, "selection_rows": float}
CHOICE_LABELS = {
    "kind": None,  # the kinds' own labels (runs/kinds/)
    "answers": [("generate", "Generate answers with the model"), ("dataset", "Score the answers stored in the eval set")],
}


def _kind_choices() -> list[tuple[str, str]]:
    from .kinds import kind_choices

    return kind_choices()


def schema_field(path: str) -> FieldInfo:
    """The pydantic field of a config path (through optional sub-models)."""
    model: type[BaseModel] = RunConfig
    *parents, leaf = path.split(".")
    for part in parents:
        model = _submodel(model.model_fields[part].annotation)
    return model.model_fields[leaf]


def schema_leaf_paths(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every leaf of the config schema, by dotted path (what the form must cover)."""
    paths = []
    for name, info in model.model_fields.items():
        sub = _submodel(info.annotation, strict=False)
        path = f"{prefix}{name}"
        paths += schema_leaf_paths(sub, f"{path}.") if sub else [path]
    return paths


def _submodel(annotation: Any, *, strict: bool = True) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    if strict:
        raise TypeError(f"{annotation} is not a config section")
    return None


def _default(info: FieldInfo) -> Any:
    return None if info.is_required() else info.get_default(call_default_factory=True)


def _bounds(info: FieldInfo) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for item in info.metadata:
        for name, attr in (("ge", "min"), ("gt", "min"), ("le", "max"), ("lt", "max")):
            if getattr(item, name, None) is not None:
                attrs[attr] = getattr(item, name)
    return attrs


def _literal_choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    return None


def _core_type(annotation: Any) -> Any:
    """int | None -> int; everything else unchanged."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def build_field(spec: FormField) -> forms.Field:
    """A Django form field for a table row, typed and bounded by the schema."""
    info = schema_field(spec.path)
    annotation = _core_type(info.annotation)
    common = {"required": False, "label": spec.label or None, "help_text": spec.help, "initial": _default(info)}
    bounds = _bounds(info)
    if spec.name in ("train_datasets", "eval_datasets"):
        return forms.MultipleChoiceField(widget=forms.CheckboxSelectMultiple, **common)
    if spec.name == "metrics":
        return forms.MultipleChoiceField(choices=[(m, m) for m in ALL_METRICS], widget=forms.CheckboxSelectMultiple, **common)
    if spec.name == "selection_metric":
        return forms.ChoiceField(choices=[("", "— off —"), *((m, m) for m in ALL_METRICS)], **common)
    if spec.name in WORD_OR_NUMBER:
        return forms.CharField(max_length=100, **common)
    if spec.name == "sweep_space":
        return forms.CharField(max_length=20_000, widget=forms.Textarea(attrs={"rows": 4, "spellcheck": "false"}), **{**common, "initial": ""})
    if spec.name in LIST_OR_WORD:
        return forms.CharField(max_length=2000, **common)
    choices = _literal_choices(annotation)
    if choices:
        labelled = CHOICE_LABELS.get(spec.name) or (_kind_choices() if spec.name == "kind" else [(c, c) for c in choices])
        widget = forms.RadioSelect if spec.name in CHOICE_LABELS else forms.Select
        return forms.ChoiceField(choices=labelled, widget=widget, **common)
    if annotation is bool:
        return forms.BooleanField(**common)
    # Bounds are HTML hints only: the schema checks them, so every problem is reported at once.
    if annotation is int:
        return forms.IntegerField(widget=forms.NumberInput(attrs=bounds), **common)
    if annotation is float:
        return forms.FloatField(widget=forms.NumberInput(attrs={"step": "any", **bounds}), **common)
    max_length = next((m.max_length for m in info.metadata if getattr(m, "max_length", None)), None)
    return forms.CharField(max_length=max_length, **common)


class DatalistInput(forms.TextInput):
    """A text input with suggestions (an HTML <datalist>): pick one, or type anything."""

    def __init__(self, *, choices: Sequence[tuple[str, str]], list_id: str, attrs: dict[str, Any] | None = None) -> None:
        super().__init__(attrs)
        self.choices, self.list_id = list(choices), list_id

    def render(self, name: str, value: Any, attrs: dict[str, Any] | None = None, renderer: Any = None) -> str:
        html = super().render(name, value, {**(attrs or {}), "list": self.list_id, "autocomplete": "off"}, renderer)
        options = format_html_join("", '<option value="{}">{}</option>', self.choices)
        return format_html('{}<datalist id="{}">{}</datalist>', html, self.list_id, options)


# Rendered by hand in the template (radios, checkbox lists); every other row is rendered in a loop by section.
SPECIAL_FIELDS = {"name", "kind", "train_datasets", "eval_datasets", "answers", "compare_base", "metrics"}


class RunForm(forms.Form):
    def __init__(self, *args: Any, user, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for spec in FIELDS:
            self.fields[spec.name] = build_field(spec)
        self.fields["name"].required = True
        self.fields["name"].error_messages["required"] = "required"
        self.fields["name"].initial = "finetune-rag-qa"
        self.user = user
        datasets = list(dataset_visible_to(user).order_by("name").values_list("name", "kind", "row_count"))
        self.fields["train_datasets"].choices = [(n, f"{n} ({rows} rows)") for n, k, rows in datasets if k == "train"]
        self.fields["eval_datasets"].choices = [(n, f"{n} ({rows} rows)") for n, k, rows in datasets if k == "eval"]
        base = self.fields["base_model"]
        base.widget = DatalistInput(choices=[(c.value, c.label) for c in model_choices(user=user)], list_id="base-model-choices")
        base.widget.attrs.update(base.widget_attrs(base.widget))  # maxlength, as the plain input had
        base.help_text = f"{BY_PATH['model.base'].help} {hub_note()}"
        self.config: dict[str, Any] | None = None

    @classmethod
    def as_posted(cls, data, *, user) -> RunForm:
        """An unbound form showing what was posted, unvalidated: the form as the user left it (a YAML load that failed keeps it)."""
        form = cls(user=user)
        if "name" not in data:  # nothing of the run form was sent (a client posting the YAML alone): the defaults
            form.initial = default_initial()
            return form
        form.initial = {name: field.widget.value_from_datadict(data, {}, form.add_prefix(name)) for name, field in form.fields.items()}
        return form

    def _by_section(self, *, basic: bool) -> dict[str, list[forms.BoundField]]:
        out: dict[str, list[forms.BoundField]] = {"model": [], "training": [], "evaluation": [], "judge": [], "selection": [], "sweep": [],
                                                  "promotion": [], "export": []}
        for spec in FIELDS:
            if spec.basic == basic and spec.name not in SPECIAL_FIELDS:
                section = "judge" if spec.path.startswith("evaluation.judge.") else spec.path.split(".")[0]
                out[section].append(self[spec.name])
        return out

    @property
    def kind_sections(self) -> dict[str, list[str]]:
        """Which config sections each kind uses (the page shows a section's fields only for a kind that uses it)."""
        from .kinds import KINDS

        return {name: list(kind.config_sections) for name, kind in KINDS.items()}

    @property
    def basic_sections(self) -> dict[str, list[forms.BoundField]]:
        """The basics' plain fields by config section, in table order (the template renders them in a loop)."""
        return self._by_section(basic=True)

    @property
    def advanced_sections(self) -> dict[str, list[forms.BoundField]]:
        """The other fields, under *Advanced*."""
        return self._by_section(basic=False)

    @property
    def advanced_has_errors(self) -> bool:
        """*Advanced* opens by itself when an error is inside it."""
        return any(not spec.basic and spec.name in self.errors for spec in FIELDS)

    @property
    def error_summary(self) -> list[dict[str, str]]:
        """Every error in the form's order, for the list at its top: {"id", "label", "path", "message"}."""
        if not self.is_bound:
            return []
        out = [{"id": "", "label": "", "path": "", "message": str(e)} for e in self.non_field_errors()]
        for spec in FIELDS:
            for message in self.errors.get(spec.name, []):
                label = self[spec.name].label
                out.append({"id": f"field-{spec.name}", "label": label, "path": spec.path, "message": message})
        return out

    def metric_groups(self) -> list[tuple[str, list]]:
        options = list(self["metrics"])
        no_judge = [o for o in options if o.data["value"] not in JUDGE_METRICS]
        judged = [o for o in options if o.data["value"] in JUDGE_METRICS]
        return [("No judge needed", no_judge), ("Judge needed (LLM)", judged)]

    def to_config(self, data: dict[str, Any]) -> dict[str, Any]:
        return to_config(data)

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        config = self.to_config(data)
        for name in self._blank_but_required(config):
            if name not in self.errors:
                self.add_error(name, "required")
        # The schema sees the fields that parsed, so its problems come with the parse errors, all at once.
        validated, errors = validate_all(config, known_datasets=dataset_name_types(self.user))
        if errors:
            self.add_config_errors(ConfigError(errors))
        self.config = None if self.errors else validated
        return data

    def _blank_but_required(self, config: dict[str, Any]) -> list[str]:
        """Fields sent blank whose config value cannot be blank: an error, never silently the schema's default
        (a blank base model used to become the toy model). Blank means null where the schema allows null (max_steps:
        all epochs); a field not sent at all keeps its default (a client that posts some fields); a field of a section
        the config leaves out (training of an eval-only run, a judge nobody asked for) is not asked for."""
        names = []
        for spec in FIELDS:
            field = self.fields[spec.name]
            if spec.name not in self.data or spec.name in LIST_OR_WORD or isinstance(field, (forms.BooleanField, forms.MultipleChoiceField)):
                continue
            raw = self.data.get(spec.name)
            info = schema_field(spec.path)
            if (raw is not None and str(raw).strip()) or _core_type(info.annotation) is not info.annotation:
                continue
            section = next((s for s in OPTIONAL_SECTIONS if spec.path.startswith(s + ".")), None)
            if section is None or _get(config, section)[1] is not None:
                names.append(spec.name)
        return names

    def add_config_errors(self, exc: ConfigError) -> None:
        for error in exc.errors:
            field, message = field_for_error(error["field"]), error["message"]
            if field in self.errors:
                continue  # already says what is wrong with what was typed
            if field is None or BY_PATH.get(error["field"]) is None:
                message = f"{error['field']}: {message}" if error["field"] else message
            self.add_error(field, message)


# --- every problem of a config in one round ------------------------------------------------------------------------
# pydantic runs a model's cross-field rules (a fine-tune needs a train set, promotion.metric must be one of the
# metrics, judged metrics need a judge) and validate_config its dataset check only once everything below them is
# valid: a form showing one pass's errors took a round trip per layer. validate_all sets each refused value aside
# (its default, or a stand-in that passes) and validates again until nothing new turns up.
MAX_ROUNDS = 6
STAND_IN_JUDGE = {"base_url": "http://localhost:8000/v1", "model": "judge"}


def _first_dataset(kind: str, known: dict[str, str]) -> list[str]:
    return [next((name for name, k in sorted(known.items()) if k == kind), "stand-in")]


def _stand_in_judge() -> dict[str, str]:
    from django.conf import settings

    prefixes = list(getattr(settings, "MLOPS_JUDGE_URL_PREFIXES", []) or [])
    return {**STAND_IN_JUDGE, "base_url": prefixes[0]} if prefixes else dict(STAND_IN_JUDGE)


# Refused value at this path -> (the path to set, its stand-in). Anything else is removed: its default applies.
STAND_INS: dict[str, Callable[[dict[str, str]], tuple[str, Any]]] = {
    "name": lambda known: ("name", "stand-in"),
    "kind": lambda known: ("kind", "finetune"),
    "datasets.train": lambda known: ("datasets.train", _first_dataset("train", known)),
    "datasets.eval": lambda known: ("datasets.eval", _first_dataset("eval", known)),
    "evaluation": lambda known: ("evaluation.judge", _stand_in_judge()),  # judged metrics without a judge
    "evaluation.judge.base_url": lambda known: ("evaluation.judge.base_url", _stand_in_judge()["base_url"]),
    "evaluation.judge.model": lambda known: ("evaluation.judge.model", STAND_IN_JUDGE["model"]),
}
# A rule that compares with a set-aside value would speak about the stand-in: set it aside too, silently.
DEPENDENTS = {
    "evaluation.metrics": ("promotion.metric",),
    "datasets.eval": ("promotion.datasets",),
    "datasets.train": ("training.validation_dataset",),
}


def validate_all(config: dict[str, Any], *, known_datasets: dict[str, str]) -> tuple[dict[str, Any] | None, list[dict[str, str]]]:
    """(the validated config, []) or (None, every error found, first pass first)."""
    errors: list[dict[str, str]] = []
    candidate = copy.deepcopy(config)
    for _ in range(MAX_ROUNDS):
        try:
            validated = validate_config(candidate, known_datasets=known_datasets)
        except ConfigError as exc:
            fresh = [e for e in exc.errors if e not in errors]
        else:
            return (None if errors else validated), errors
        if not fresh:
            break
        errors += fresh
        if not all(_set_aside(candidate, e["field"], known_datasets) for e in fresh):
            break
    return None, errors


def _set_aside(config: dict[str, Any], field: str, known: dict[str, str]) -> bool:
    """Replace or remove the value an error is about; False when there is nothing to set aside."""
    path = re.sub(r"\[\d+\]", "", field)
    if not path or not isinstance(config, dict):
        return False
    if path in STAND_INS:
        target, value = STAND_INS[path](known)
        _set_anyway(config, target, value)
    elif not _pop(config, path):
        return False
    for dependent in DEPENDENTS.get(path, ()):
        _pop(config, dependent)
    return True


def _set_anyway(config: dict[str, Any], path: str, value: Any) -> None:
    """_set, replacing whatever is not a mapping on the way (a section sent as a string)."""
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def _pop(config: dict[str, Any], path: str) -> bool:
    *parents, leaf = path.split(".")
    node: Any = config
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and leaf in node:
        del node[leaf]
        return True
    return False


# A section's own rule goes next to the field it is about, not its first row.
SECTION_RULE_FIELDS = {"evaluation": "metrics"}  # judged metrics need a judge


def field_for_error(path: str) -> str | None:
    """The form field a config error belongs next to: the row of its path, or of the nearest row below it."""
    clean = path.split("[", 1)[0]
    if clean in BY_PATH:
        return BY_PATH[clean].name
    if clean in SECTION_RULE_FIELDS:
        return SECTION_RULE_FIELDS[clean]
    below = [f for f in FIELDS if f.path.startswith(clean + ".")] if clean else []
    return below[0].name if below else None


def _space_from_text(text: str) -> Any:
    """The search space typed as YAML (a mapping); what does not parse is passed on for the schema to refuse by name."""
    try:
        return parse_yaml(text, source="sweep.space")
    except ConfigError:
        return text


def _form_to_value(spec: FormField, value: Any) -> Any:
    if spec.name == "sweep_space":
        return _space_from_text(value) if isinstance(value, str) and value.strip() else None
    if spec.name in WORD_OR_NUMBER and isinstance(value, str):
        try:
            return WORD_OR_NUMBER[spec.name](value.strip())
        except ValueError:
            return value.strip()
    if spec.name in LIST_OR_WORD:
        word = LIST_OR_WORD[spec.name]
        text = (value or "").strip()
        return word if text in ("", word) else [t.strip() for t in text.split(",") if t.strip()]
    if isinstance(value, list):
        return list(value)
    return value


def to_config(data: dict[str, Any]) -> dict[str, Any]:
    """Cleaned form data -> a config dict (validated by the caller). Blank fields take the schema's defaults."""
    config: dict[str, Any] = {}
    for spec in FIELDS:
        value = data.get(spec.name)
        info = schema_field(spec.path)
        if value in (None, "") and not isinstance(value, bool):
            if info.is_required() or _core_type(info.annotation) is info.annotation or _default(info) is not None:
                continue  # left to the schema: its default, or its "field required"
            value = None  # nullable and blank: null (e.g. max_steps: all epochs)
        _set(config, spec.path, _form_to_value(spec, value))
    judge = (config.get("evaluation") or {}).get("judge") or {}
    if not (judge.get("base_url") or judge.get("model")):
        config.get("evaluation", {}).pop("judge", None)
    if not (config.get("selection") or {}).get("metric"):
        config.pop("selection", None)  # no metric chosen: selection is off
    if not (config.get("sweep") or {}).get("space"):
        config.pop("sweep", None)  # no space: no sweep section (a sweep without one is refused by name)
    export = config.get("export") or {}
    if not export.get("merged") and export.get("gguf", "none") == "none":
        config.pop("export", None)  # nothing asked: no export step
    _drop_sections_of_other_kinds(config)
    return config


def _drop_sections_of_other_kinds(config: dict[str, Any]) -> None:
    """The form shows every kind's fields: a section the chosen kind does not use is left out of its config."""
    from .kinds import KINDS

    spec = KINDS.get(config.get("kind", ""))
    if spec is None:
        return
    for section in ("training", "selection", "sweep", "promotion", "export", "datasets.train"):
        if not spec.config_applies(section, config):
            *parents, leaf = section.split(".")
            node = config
            for part in parents:
                node = node.get(part, {})
            node.pop(leaf, None)


def _set(config: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _get(config: dict[str, Any], path: str) -> tuple[bool, Any]:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def initial_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """Form values for a config (clone a run, or load a YAML file into the form); missing keys take the schema's defaults."""
    initial: dict[str, Any] = {}
    for spec in FIELDS:
        present, value = _get(config, spec.path)
        if not present:
            value = _default(schema_field(spec.path))
        if spec.name in LIST_OR_WORD and isinstance(value, list):
            value = ", ".join(value)
        if spec.name == "selection_metric" and not _get(config, "selection")[1]:
            value = ""  # no selection section: off
        if spec.name == "sweep_space":
            import yaml

            value = yaml.safe_dump(value, sort_keys=False, default_flow_style=None).strip() if isinstance(value, dict) and value else ""
        initial[spec.name] = value
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
    """Start from a YAML config: paste it or upload the file. Refused exactly as the API refuses it."""

    # Inputs of the run form (HTML form="run-form") though they sit beside it: loading a YAML posts the form's
    # current values too, so a YAML that is refused does not wipe what the user had typed.
    yaml_text = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 8, "spellcheck": "false", "form": "run-form"}),
                                label="Paste YAML")
    yaml_file = forms.FileField(required=False, label="or upload a .yaml file", widget=forms.FileInput(attrs={"form": "run-form"}))

    def __init__(self, *args: Any, user=None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.user = user

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
            # The same validation as POST /api/runs/: unknown keys, ranges, datasets.
            validate_config(parsed, known_datasets=dataset_name_types(self.user) if self.user else None)
        except ConfigError as exc:
            raise forms.ValidationError([f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in exc.errors]) from None
        data["config"] = parsed
        return data
