"""The New run form: one field table covering the whole config schema, both directions.

The round trip is generated from the schema: every leaf gets a valid value other
than its default, so a field the form forgot (or resets on Clone / Load YAML)
fails here.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

import pytest

from runs.config import validate_config
from runs.forms import BY_PATH, FIELDS, RunForm, YamlConfigForm, _core_type, _default, initial_from_config, schema_field, schema_leaf_paths

pytestmark = pytest.mark.django_db

# Values the generator cannot invent: names that must exist, metrics that need a judge, URLs.
SPECIAL = {
    "name": "round-trip",
    "model.base": "local:smollm2-135m-instruct",
    "datasets.train": ["legal_qa_train", "rag_qa_train"],
    "datasets.eval": ["legal_ragas_eval", "ragas_eval"],
    "training.lora.target_modules": ["q_proj", "v_proj"],
    "evaluation.metrics": ["rouge_score", "faithfulness", "bleu_score"],
    "evaluation.judge.base_url": "http://127.0.0.1:8011/v1",
    "evaluation.judge.model": "judge-7b",
    "evaluation.judge.api_key_env": "MY_JUDGE_KEY",
    "promotion.metric": "bleu_score",
    "promotion.datasets": ["ragas_eval"],
    "training.validation_dataset": "medical_qa_train",
}


def _bound(info, *names: str) -> Any:
    for item in info.metadata:
        for name in names:
            if getattr(item, name, None) is not None:
                return getattr(item, name)
    return None


def non_default(path: str) -> Any:
    """A valid value for a schema leaf that differs from its default."""
    if path in SPECIAL:
        return SPECIAL[path]
    info = schema_field(path)
    annotation, default = _core_type(info.annotation), _default(info)
    if typing.get_origin(annotation) is Literal:
        return next(c for c in typing.get_args(annotation) if c != default)
    if annotation is bool:
        return not default
    low = _bound(info, "ge", "gt")
    high = _bound(info, "le", "lt")
    if annotation is int:
        candidate = (default or low or 1) + 1
        return candidate if high is None or candidate <= high else (low or 0)
    if annotation is float:
        candidate = round(((low or 0.0) + (high if high is not None else 2 * (default or 1.0))) / 3, 6)
        assert candidate != default
        return candidate
    raise AssertionError(f"no generator for {path} ({annotation}): add it to SPECIAL")


def generated_config(kind: str) -> dict[str, Any]:
    config: dict[str, Any] = {"kind": kind}
    for path in schema_leaf_paths():
        if path == "kind" or (kind != "finetune" and (path.startswith(("training.", "promotion.")) or path == "datasets.train")):
            continue
        if kind == "finetune" and path == "evaluation.answers":
            continue  # a fine-tune scores generated answers only
        node = config
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = non_default(path)
    return config


def as_post(initial: dict[str, Any]) -> dict[str, Any]:
    """What a browser sends for these values: checked boxes only, blanks as empty strings."""
    data: dict[str, Any] = {}
    for name, value in initial.items():
        if isinstance(value, bool):
            if value:
                data[name] = "on"
        elif value is None:
            data[name] = ""
        else:
            data[name] = value
    return data


def test_every_leaf_of_the_schema_has_a_form_field():
    assert sorted(schema_leaf_paths()) == sorted(BY_PATH)
    assert len({f.name for f in FIELDS}) == len(FIELDS)


@pytest.mark.parametrize("kind", ["finetune", "eval_only"])
def test_a_config_survives_the_form_unchanged(user, kind):
    config = validate_config(generated_config(kind))
    defaults = validate_config({"name": "x", "kind": kind, "datasets": config["datasets"], **({"training": {}} if kind == "finetune" else {})})
    generated = [p for p in schema_leaf_paths() if _value(generated_config(kind), p) is not None]
    unchanged = [p for p in generated if p not in ("kind", "datasets.eval", "datasets.train") and _value(config, p) == _value(defaults, p)]
    assert not unchanged, f"the generator left these at their defaults: {unchanged}"

    form = RunForm(as_post(initial_from_config(config)), user=user)
    assert form.is_valid(), form.errors
    assert form.config == config


def _value(config: dict[str, Any], path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        node = (node or {}).get(part) if isinstance(node, dict) else None
    return node


def test_blank_fields_take_the_schemas_defaults(user):
    form = RunForm(as_post({"name": "blank", "kind": "finetune", "train_datasets": ["rag_qa_train"], "eval_datasets": ["ragas_eval"],
                            "metrics": ["rouge_score"], "answers": "generate"}), user=user)
    assert form.is_valid(), form.errors
    expected = validate_config({"name": "blank", "kind": "finetune", "datasets": {"train": ["rag_qa_train"], "eval": ["ragas_eval"]},
                                "evaluation": {"metrics": ["rouge_score"], "compare_base": False}})
    assert form.config == expected


def test_every_problem_is_reported_next_to_its_field_at_once(user):
    initial = initial_from_config(generated_config("finetune"))
    form = RunForm(as_post({**initial, "epochs": 0, "learning_rate": 5, "judge_base_url": "not a url"}), user=user)
    assert not form.is_valid()
    assert {"epochs", "learning_rate", "judge_base_url"} <= set(form.errors)


def test_a_schema_error_lands_on_the_field_of_its_path(user):
    initial = initial_from_config(generated_config("finetune"))
    form = RunForm(as_post({**initial, "judge_base_url": "ftp://judge"}), user=user)
    assert not form.is_valid()
    assert "judge_base_url" in form.errors and "http(s) URL" in form.errors["judge_base_url"][0]


def test_load_yaml_refuses_an_unknown_key_as_the_api_does(user):
    form = YamlConfigForm({"yaml_text": "name: x\nkind: finetune\ndatasets: {train: [rag_qa_train], eval: [ragas_eval]}\ntraining: {epochz: 3}\n"}, user=user)
    assert not form.is_valid()
    assert form.non_field_errors() == ["training.epochz: unknown key"]


def test_load_yaml_accepts_a_valid_config(user):
    form = YamlConfigForm({"yaml_text": "name: x\nkind: eval_only\ndatasets: {eval: [ragas_eval]}\n"}, user=user)
    assert form.is_valid(), form.errors
    assert form.cleaned_data["config"]["kind"] == "eval_only"
