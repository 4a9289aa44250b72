"""The run config schema in OpenAPI, generated from the pydantic models of runs/config.py.

`POST /api/runs/` takes a config (the YAML schema as JSON). Its request body is
documented as the `RunConfig` component, built from `RunConfig.model_json_schema()`,
so every field with its type, range, default and allowed values is in
/api/schema/ and the docs page, and a new field of the config cannot be missed.

pydantic writes JSON Schema 2020-12; the API schema is OpenAPI 3.0, so a few
constructs are translated: `$defs` become components (`RunConfig<Model>`),
`anyOf [X, null]` becomes X with `nullable`, a numeric `exclusiveMinimum`
becomes `minimum` + `exclusiveMinimum: true`, `const` an enum of one.

Its examples are the shipped configs (configs/*.yaml): the docs' "Try it out"
then sends a body that names datasets that exist (the bundled ones), never the
placeholder strings a generator would make up from the schema.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from drf_spectacular.extensions import OpenApiSerializerExtension
from drf_spectacular.plumbing import ResolvedComponent
from drf_spectacular.utils import OpenApiExample
from rest_framework import serializers

from .config import ALL_METRICS, RunConfig

COMPONENT_PREFIX = "RunConfig"
REF_PREFIX = "#/components/schemas/"


def _component_name(model_name: str) -> str:
    return model_name if model_name == COMPONENT_PREFIX else f"{COMPONENT_PREFIX}{model_name}"


def _to_openapi(node: Any) -> Any:
    """One JSON Schema 2020-12 node (and everything below it) as an OpenAPI 3.0 schema object."""
    if isinstance(node, list):
        return [_to_openapi(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = node.pop("$ref")
        ref = {"$ref": target if target.startswith(REF_PREFIX) else REF_PREFIX + _component_name(target.rsplit("/", 1)[-1])}
        # OpenAPI 3.0 ignores siblings of $ref: keep a description or default through allOf.
        return {"allOf": [ref], **{k: _to_openapi(v) for k, v in node.items()}} if node else ref
    variants = node.get("anyOf")
    if isinstance(variants, list) and any(v == {"type": "null"} for v in variants):
        rest = [v for v in variants if v != {"type": "null"}]
        del node["anyOf"]
        node["nullable"] = True
        if len(rest) == 1:
            only = _to_openapi(rest[0])
            if "$ref" in only:
                node["allOf"] = [only]
            else:
                node = {**only, **node}
        else:
            node["anyOf"] = rest
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
            node[plain], node[bound] = node[bound], True
    if "const" in node:
        node["enum"] = [node.pop("const")]
    return {key: _to_openapi(value) for key, value in node.items()}


CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
# The request examples, in the order the docs list them: (file, what it is).
EXAMPLE_CONFIGS = (
    ("finetune_rag_qa.yaml", "The default fine-tune (what `make run` launches): SmolLM2-135M-Instruct on rag_qa_train, scored on ragas_eval."),
    ("eval_only.yaml", "Score the answers stored in ragas_eval, no model and no judge: done in seconds."),
    ("smoke.yaml", "A quick check of the mechanics on the tiny offline model (45 s the first time, 14 s after, on 2 lightly loaded cores)."),
)
# Bundled datasets (data/train, data/eval) for the per-field examples.
EXAMPLE_DATASETS = {"train": ["rag_qa_train"], "eval": ["ragas_eval"]}


@functools.cache
def example_configs() -> tuple[tuple[str, str, dict[str, Any]], ...]:
    """(name, summary, config) of each shipped config that is present, as a client would send it."""
    from .config import parse_yaml

    out = []
    for filename, summary in EXAMPLE_CONFIGS:
        path = CONFIGS_DIR / filename
        if path.exists():
            out.append((path.stem, summary, parse_yaml(path.read_text(encoding="utf-8"), source=str(path))))
    return tuple(out)


def config_request_examples() -> list[OpenApiExample]:
    """The shipped configs as named request examples of POST /api/runs/ and /api/runs/check/."""
    return [
        OpenApiExample(name, value=config, summary=f"configs/{name}.yaml", description=summary, request_only=True)
        for name, summary, config in example_configs()
    ]


def run_config_openapi() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(the RunConfig schema object, {component name: schema object} of the models it uses)."""
    schema = RunConfig.model_json_schema(mode="validation")
    definitions = schema.pop("$defs", {})
    components = {_component_name(name): _to_openapi(body) for name, body in definitions.items()}
    # The metric names are checked by a validator, not by the type: list them for clients.
    components[_component_name("EvaluationConfig")]["properties"]["metrics"]["items"]["enum"] = list(ALL_METRICS)
    for field, names in EXAMPLE_DATASETS.items():
        components[_component_name("DatasetsConfig")]["properties"][field]["example"] = names
    root = _to_openapi(schema)
    if example_configs():
        root["example"] = example_configs()[0][2]
    root["description"] = (
        "A run config: the YAML schema of configs/*.yaml as JSON. Unknown keys are refused; "
        "ranges and defaults are those the server validates with."
    )
    return root, components


class RunConfigInputSerializer(serializers.Serializer):
    """Stands for the config body in the schema only: the view validates it with runs/config.py."""


class RunConfigSchemaExtension(OpenApiSerializerExtension):
    target_class = RunConfigInputSerializer

    def get_name(self, auto_schema, direction) -> str:
        return COMPONENT_PREFIX

    def map_serializer(self, auto_schema, direction) -> dict[str, Any]:
        root, components = run_config_openapi()
        for name, body in components.items():
            auto_schema.registry.register_on_missing(
                ResolvedComponent(name=name, type=ResolvedComponent.SCHEMA, object=name, schema=body)
            )
        return root
