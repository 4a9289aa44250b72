"""POST /api/runs/ documents the run config from the pydantic models (every field, type, range, default)."""

from __future__ import annotations

from typing import Any

import pytest

from runs.config import ALL_METRICS, LoraConfig, RunConfig

pytestmark = pytest.mark.django_db


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """A schema object with its $ref (directly or through a one-item allOf) followed."""
    while True:
        if "$ref" in node:
            node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
        elif len(node.get("allOf", [])) == 1 and "properties" not in node:
            node = node["allOf"][0]
        else:
            return node


@pytest.fixture
def schema(api) -> dict[str, Any]:
    response = api.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    return response.json()


def config_body(schema: dict[str, Any]) -> dict[str, Any]:
    body = schema["paths"]["/api/runs/"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return resolve(schema, body)


def test_the_create_body_is_the_run_config_not_a_free_form_object(schema):
    config = config_body(schema)
    assert config["type"] == "object" and config["additionalProperties"] is False
    assert set(config["required"]) == {"name", "kind", "datasets"}
    assert set(config["properties"]) == set(RunConfig.model_fields)


def test_it_documents_ranges_and_defaults_of_training(schema):
    training = resolve(schema, config_body(schema)["properties"]["training"])
    epochs = training["properties"]["epochs"]
    assert (epochs["type"], epochs["minimum"], epochs["maximum"], epochs["default"]) == ("integer", 1, 100, 3)
    learning_rate = training["properties"]["learning_rate"]
    assert learning_rate["minimum"] == 0 and learning_rate["exclusiveMinimum"] is True and learning_rate["maximum"] == 1.0
    max_steps = training["properties"]["max_steps"]
    assert max_steps["nullable"] is True and max_steps["default"] is None and max_steps["minimum"] == 1
    assert resolve(schema, training["properties"]["precision"])["enum"] == ["auto", "bf16", "fp32"]
    lora = resolve(schema, training["properties"]["lora"])
    assert lora["properties"]["r"]["default"] == LoraConfig().r


def test_every_field_of_every_model_is_documented(schema):
    """Walk the pydantic models and the OpenAPI components together: no field is left out."""

    def walk(model, node, path):
        node = resolve(schema, node)
        assert set(node["properties"]) == set(model.model_fields), path
        for name, field in model.model_fields.items():
            sub = [a for a in getattr(field.annotation, "__args__", (field.annotation,)) if hasattr(a, "model_fields")]
            if sub:
                walk(sub[0], node["properties"][name], f"{path}.{name}")

    walk(RunConfig, schema["paths"]["/api/runs/"]["post"]["requestBody"]["content"]["application/json"]["schema"], "config")


def test_it_lists_the_known_metrics(schema):
    evaluation = resolve(schema, config_body(schema)["properties"]["evaluation"])
    assert resolve(schema, evaluation["properties"]["metrics"]["items"])["enum"] == list(ALL_METRICS)
    assert evaluation["properties"]["max_new_tokens"]["default"] == 64


def test_the_request_examples_are_shipped_configs_naming_datasets_that_exist(schema, user):
    from datasets_app.models import Dataset
    from runs.config import validate_config
    from runs.services import dataset_name_types

    known = dataset_name_types(user)  # what a new user may name: the bundled datasets
    for path in ("/api/runs/", "/api/runs/check/"):
        examples = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["examples"]
        assert {"FinetuneRagQa", "EvalOnly", "Smoke"} <= set(examples), examples.keys()  # drf-spectacular camel-cases the names
        for example in examples.values():
            config = example["value"]
            names = [*config["datasets"].get("train", []), *config["datasets"]["eval"]]
            assert names and set(names) <= set(Dataset.objects.values_list("name", flat=True))
            validate_config(config, known_datasets=known)  # a body the server accepts as it is
    datasets = resolve(schema, config_body(schema)["properties"]["datasets"])
    assert datasets["properties"]["train"]["example"] == ["rag_qa_train"] and datasets["properties"]["eval"]["example"] == ["ragas_eval"]
    assert config_body(schema)["example"]["datasets"] == {"train": ["rag_qa_train"], "eval": ["ragas_eval"]}
