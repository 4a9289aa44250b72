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
    "selection.metric": "bleu_score",
    "selection.every": 25,
    "selection.rows": 0.2,
    "sweep.space": {"training.learning_rate": [0.001, 0.002]},
    "sweep.method": "random",
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
        if path == "kind" or path.startswith("sweep.") or (kind != "finetune" and (path.startswith(("training.", "selection.", "promotion.", "export."))
                                                                                     or path == "datasets.train")):
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


# --- one round, one style: every problem at once, a blank is not a default ------------------------------------------
def browser_post(**changes: Any) -> dict[str, Any]:
    """What the browser sends for the default form (every input, blanks included), with changes."""
    from runs.forms import default_initial

    post = as_post(default_initial())
    for name in ("train_datasets", "eval_datasets", "metrics"):
        post.setdefault(name, [])
    post.update(changes)
    return post


def test_the_default_form_as_a_browser_sends_it_is_valid(user):
    form = RunForm(browser_post(), user=user)
    assert form.is_valid(), form.errors


def test_a_blank_base_model_is_required_not_the_toy_model(user):
    form = RunForm(browser_post(base_model=""), user=user)
    assert not form.is_valid()
    assert form.errors["base_model"] == ["required"]
    assert {"id": "field-base_model", "label": "Base model", "path": "model.base", "message": "required"} in form.error_summary


def test_blank_fields_of_sections_the_config_leaves_out_are_not_required(user):
    blank_training = {spec.name: "" for spec in FIELDS if spec.path.startswith(("training.", "promotion."))}
    blank_judge = {spec.name: "" for spec in FIELDS if spec.path.startswith("evaluation.judge.")}
    form = RunForm(browser_post(kind="eval_only", answers="dataset", train_datasets=[], **blank_training, **blank_judge), user=user)
    assert form.is_valid(), form.errors
    assert form.config["training"] is None and form.config["evaluation"]["judge"] is None


def test_every_problem_shows_in_one_round_basics_and_advanced(user, hf_cache):
    form = RunForm(browser_post(
        name="",                                   # required
        base_model="nobody/made-up-model-xyz",     # not in the cache, hub offline
        epochs="0",                                # out of range
        learning_rate="",                          # blank, no default taken
        train_datasets=[],                         # a fine-tune needs one (a rule of the whole config)
        max_seq_length="8",                        # out of range
        lora_r="0",                                # advanced
        promotion_metric="bleu_score",             # not one of the metrics (a rule that runs last)
        metrics=["rouge_score", "faithfulness"],   # a judged metric without a judge (a rule of the evaluation section)
    ), user=user)
    assert not form.is_valid()
    assert set(form.errors) == {"name", "base_model", "epochs", "learning_rate", "train_datasets", "max_seq_length", "lora_r",
                                "promotion_metric", "metrics"}, form.errors
    assert "hub is offline" in form.errors["base_model"][0]
    assert "at least one train dataset" in form.errors["train_datasets"][0]
    assert "is not one of evaluation.metrics" in form.errors["promotion_metric"][0]
    assert "need an LLM judge" in form.errors["metrics"][0]
    assert [p["id"] for p in form.error_summary] == [f"field-{spec.name}" for spec in FIELDS if spec.name in form.errors]
    assert form.advanced_has_errors


def test_a_rule_about_a_set_aside_value_does_not_speak_about_its_stand_in(user):
    """No eval set ticked and promotion.datasets naming one: one error on the eval sets, none invented for the gate."""
    form = RunForm(browser_post(eval_datasets=[], promotion_datasets="ragas_eval"), user=user)
    assert not form.is_valid()
    assert set(form.errors) == {"eval_datasets"}, form.errors


def test_advanced_stays_closed_when_its_fields_are_fine(user):
    form = RunForm(browser_post(epochs="0"), user=user)
    assert not form.is_valid() and not form.advanced_has_errors
    assert {spec.name for spec in FIELDS if spec.basic} >= {"name", "kind", "base_model", "train_datasets", "eval_datasets", "epochs",
                                                           "learning_rate", "metrics"}


def test_the_base_model_list_offers_what_loads_and_the_help_suggests_nothing_that_cannot(user, hf_cache):
    hf_cache("org/cached-model")
    form = RunForm(user=user)
    html = str(form["base_model"])
    assert 'list="base-model-choices"' in html and '<datalist id="base-model-choices">' in html
    assert '<option value="local:smollm2-135m-instruct">' in html and '<option value="org/cached-model">' in html
    assert "Qwen" not in form["base_model"].help_text and "hub is offline here" in form["base_model"].help_text
