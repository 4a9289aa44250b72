"""Hostile input: each case gets a clear 4xx naming the problem, stores nothing,
crashes nothing; what a browser shows is escaped; CSV cells cannot run formulas."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile

from datasets_app.models import Dataset
from mlops_site.limits import MAX_DEPTH, StructureLimitError, check_structure
from runs.models import PipelineRun, RunResult, SampleResult
from tests.runs.factories import finetune_config, make_run

pytestmark = [pytest.mark.reliability, pytest.mark.django_db]

TRAIN_ROW = {"question": "q", "answer": "a", "context": "c"}
EVAL_ROW = {"question": "q", "answer": "a", "contexts": ["c"], "ground_truth": "g"}


def line(row) -> bytes:
    return json.dumps(row).encode() + b"\n"


def stored_files() -> set[Path]:
    folder = Path(settings.DATA_DIR) / "datasets"
    return set(folder.iterdir()) if folder.exists() else set()


def upload(api, name: str, content: bytes, kind: str = "train"):
    return api.post("/api/datasets/", {"name": name, "type": kind, "file": io.BytesIO(content)}, format="multipart")


JSONL_CASES = [
    ("empty file", b"", "train", "file is empty"),
    ("binary file", os.urandom(64).replace(b"\n", b"") + b"\x00\xff\n", "train", "line 1:"),
    ("wrong encoding (Latin-1)", '{"question": "caf\xe9", "answer": "a", "context": "c"}\n'.encode("latin-1"), "train", "line 1: not valid UTF-8"),
    ("one 20 MB line", b'{"question": "' + b"x" * (20 * 1024 * 1024) + b'", "answer": "a", "context": "c"}\n', "train", "line 1: longer than"),
    ("valid JSON, wrong shape (array)", line(TRAIN_ROW) + b"[1, 2, 3]\n", "train", "line 2: expected a JSON object"),
    ("valid JSON, wrong shape (missing field)", line({"question": "q", "answer": "a"}), "train", "line 1: missing field 'context'"),
    ("non-string contexts", line({**EVAL_ROW, "contexts": [1, {"a": 2}]}), "eval", "line 1: field 'contexts' must be a list of strings"),
    ("contexts is a string", line({**EVAL_ROW, "contexts": "one passage"}), "eval", "line 1: field 'contexts' must be a list of strings"),
    ("100k lines, one broken near the end", line(TRAIN_ROW) * 99_998 + b"{broken\n" + line(TRAIN_ROW), "train", "line 99999: invalid JSON"),
]


@pytest.mark.parametrize(("case", "content", "kind", "expected"), JSONL_CASES, ids=[c[0] for c in JSONL_CASES])
def test_hostile_jsonl_is_refused_naming_the_problem(api, ledger, case, content, kind, expected):
    ledger.record("hostile input", f"JSONL: {case}", "400 naming the line/problem; no row, no file")
    rows, files = Dataset.objects.count(), stored_files()
    response = upload(api, "hostile", content, kind)
    assert response.status_code == 400, response.content[:300]
    assert expected in response.json()["detail"]
    assert Dataset.objects.count() == rows and stored_files() == files


def test_a_utf8_bom_is_accepted_as_text(api, ledger):
    ledger.record("hostile input", "JSONL: UTF-8 byte-order mark", "accepted (it is valid UTF-8 text), rows counted right")
    response = upload(api, "with-bom", b"\xef\xbb\xbf" + line(TRAIN_ROW) * 2)
    assert response.status_code == 201 and response.json()["row_count"] == 2


def test_a_file_over_the_size_limit_is_refused(api, ledger, settings):
    ledger.record("hostile input", "JSONL: over the size limit", "400 naming the limit; no row, no file")
    settings.DATASET_MAX_BYTES = 64 * 1024
    rows, files = Dataset.objects.count(), stored_files()
    response = upload(api, "too-big", line(TRAIN_ROW) * 5000)
    assert response.status_code == 400 and "over the limit of 65536 bytes" in response.json()["detail"]
    assert Dataset.objects.count() == rows and stored_files() == files


NAME_CASES = [("path traversal", "../../etc/passwd"), ("NUL byte", "bad\x00name"), ("10k characters", "a" * 10_000), ("HTML", "<b>x</b>")]


@pytest.mark.parametrize(("case", "name"), NAME_CASES, ids=[c[0] for c in NAME_CASES])
def test_hostile_dataset_names_are_refused(api, ledger, case, name):
    ledger.record("hostile input", f"dataset name: {case}", "400 naming the field 'name'; no row, no file")
    rows, files = Dataset.objects.count(), stored_files()
    response = upload(api, name, line(TRAIN_ROW))
    assert response.status_code == 400
    assert {e["field"] for e in response.json()["errors"]} == {"name"}
    assert Dataset.objects.count() == rows and stored_files() == files


CONFIG_CASES = [
    ("unknown key", finetune_config(surprise=1), "surprise"),
    ("wrong type", finetune_config(training={"epochs": "three"}), "training.epochs"),
    ("negative number", finetune_config(training={"learning_rate": -0.1}), "training.learning_rate"),
    ("huge number", finetune_config(training={"batch_size": 10**12}), "training.batch_size"),
    ("huge integer literal", finetune_config(training={"seed": 10**400}), "training.seed"),
    ("NUL in the run name", finetune_config(name="run\x00name"), "name"),
    ("10k-character run name", finetune_config(name="r" * 10_000), "name"),
    ("a list instead of a mapping", [1, 2, 3], ""),
    ("local: name with a path (local:../../etc)", finetune_config(model={"base": "local:../../etc"}), "model.base"),
    ("local: name that is a path (local:/etc/passwd)", finetune_config(model={"base": "local:/etc/passwd"}), "model.base"),
    ("local: name of dots (local:..)", finetune_config(model={"base": "local:.."}), "model.base"),
    ("model path with no MLOPS_MODEL_PATHS (/etc)", finetune_config(model={"base": "/etc"}), "model.base"),
    ("relative model path (../../etc)", finetune_config(model={"base": "../../etc"}), "model.base"),
    ("judge URL with credentials", finetune_config(evaluation={"metrics": ["faithfulness"], "judge": {"base_url": "http://u:p@judge/v1", "model": "m"}}),
     "evaluation.judge.base_url"),
]


@pytest.mark.parametrize(("case", "body", "field"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_hostile_configs_are_refused_naming_the_field(api, ledger, case, body, field):
    ledger.record("hostile input", f"config: {case}", "400 naming the field; no run stored")
    response = api.post("/api/runs/", body, format="json")
    assert response.status_code == 400, response.content[:300]
    assert field in {e["field"] for e in response.json().get("errors", [{"field": ""}])}
    assert not PipelineRun.objects.exists()


def test_a_10_mb_config_body_is_refused_before_parsing(api, ledger, monkeypatch):
    from rest_framework.utils import json as drf_json

    ledger.record("hostile input", "config: 10 MB body", "400 naming the size limit (DATA_UPLOAD_MAX_MEMORY_SIZE); the JSON parser never called; no run stored")
    parsed = []
    monkeypatch.setattr(drf_json, "load", lambda *a, **k: parsed.append(a) or {})
    monkeypatch.setattr(drf_json, "loads", lambda *a, **k: parsed.append(a) or {})
    body = json.dumps({**finetune_config(), "padding": "x" * (10 * 1024 * 1024)})
    response = api.generic("POST", "/api/runs/", body, content_type="application/json")
    assert response.status_code == 400, response.content[:300]
    assert response.json()["detail"] == f"request body: larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes (the limit, DATA_UPLOAD_MAX_MEMORY_SIZE)"
    assert parsed == []
    assert not PipelineRun.objects.exists()


# --- Nesting: 10,000 levels of arrays and of objects, on every way structured text comes in.
DEPTH = 10_000
LIMIT_MESSAGE = f"nested deeper than {MAX_DEPTH} levels"
JSON_NESTINGS = {
    "arrays": "[" * DEPTH + "]" * DEPTH,
    "objects": '{"a": ' * DEPTH + "1" + "}" * DEPTH,
    "arrays, unclosed": "[" * DEPTH,
    "objects and arrays alternating": '{"a": [' * (DEPTH // 2) + "1" + "]}" * (DEPTH // 2),
}
YAML_NESTINGS = {
    **{f"JSON {name}": text for name, text in JSON_NESTINGS.items()},  # JSON is YAML (flow style)
    "flow sequences": "a: " + "[" * DEPTH + "]" * DEPTH,
    "flow mappings": "a: " + "{a: " * DEPTH + "1" + "}" * DEPTH,
    # Block style indents every level: 10,000 of them would be 50 MB, past the size
    # limit before the depth one; 600 levels fit in the 256 KB a config may have.
    "block mappings (600 levels)": "".join(" " * level + "k:\n" for level in range(600)) + " " * 600 + "v\n",
    "block sequences (600 levels)": "".join(" " * level + "-\n" for level in range(600)) + " " * 600 + "v\n",
}


def test_the_bound_stops_each_nesting_before_a_parser_and_passes_real_documents():
    for name, text in JSON_NESTINGS.items():
        with pytest.raises(StructureLimitError, match=LIMIT_MESSAGE):
            check_structure(text, syntax="json", max_bytes=None)
        assert name
    for name, text in YAML_NESTINGS.items():
        with pytest.raises(StructureLimitError, match=LIMIT_MESSAGE):
            check_structure(text, syntax="yaml", max_bytes=None, source=name)
    # Brackets inside strings are text, not nesting; a document at the limit passes.
    check_structure(json.dumps({"q": "[" * DEPTH, "e": '\\"[{' * 100}), syntax="json", max_bytes=None)
    check_structure("[" * MAX_DEPTH + "]" * MAX_DEPTH, syntax="json", max_bytes=None)
    check_structure("a: '" + "[" * DEPTH + "'\n", syntax="yaml", max_bytes=None)
    for config in Path(settings.BASE_DIR, "configs").glob("*.yaml"):
        check_structure(config.read_text(), syntax="yaml", max_bytes=None)
    with pytest.raises(StructureLimitError, match=LIMIT_MESSAGE):
        check_structure("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), syntax="json", max_bytes=None)
    with pytest.raises(StructureLimitError, match="larger than 10 bytes"):
        check_structure("[" * 11, syntax="json", max_bytes=10)


@pytest.mark.parametrize("shape", list(JSON_NESTINGS), ids=list(JSON_NESTINGS))
def test_deeply_nested_json_bodies_get_a_400_naming_the_limit_on_every_api_write(api, user, ledger, shape):
    ledger.record(
        "hostile input", f"JSON body: {DEPTH:,} levels of {shape}, on POST /api/runs/ and each run write (status, logs, results)",
        f"400 whose detail names the limit ('{LIMIT_MESSAGE} (the limit)'); no run stored; the existing run unchanged",
    )
    run = make_run(user, status="pending")
    body = JSON_NESTINGS[shape]
    for method, path in [("POST", "/api/runs/"), ("PATCH", f"/api/runs/{run.pk}/status/"), ("PATCH", f"/api/runs/{run.pk}/logs/"),
                         ("POST", f"/api/runs/{run.pk}/results/")]:
        response = api.generic(method, path, body, content_type="application/json")
        assert response.status_code == 400, (path, response.status_code, response.content[:300])
        assert response.json()["detail"] == f"request body: {LIMIT_MESSAGE} (the limit)", path
    assert list(PipelineRun.objects.values_list("pk", flat=True)) == [run.pk]
    run.refresh_from_db()
    assert run.status == "pending" and run.logs == "" and not run.results.exists()


@pytest.mark.parametrize("shape", list(JSON_NESTINGS), ids=list(JSON_NESTINGS))
def test_a_deeply_nested_jsonl_line_is_refused_naming_its_line_and_the_limit(api, ledger, shape):
    ledger.record("hostile input", f"JSONL upload: line 2 is {DEPTH:,} levels of {shape}", f"400 naming 'line 2: {LIMIT_MESSAGE}'; no row, no file")
    rows, files = Dataset.objects.count(), stored_files()
    response = upload(api, "deep", line(TRAIN_ROW) + JSON_NESTINGS[shape].encode() + b"\n" + line(TRAIN_ROW))
    assert response.status_code == 400, response.content[:300]
    assert f"line 2: {LIMIT_MESSAGE} (the limit)" in response.json()["detail"]
    assert Dataset.objects.count() == rows and stored_files() == files


@pytest.mark.parametrize("shape", list(YAML_NESTINGS), ids=list(YAML_NESTINGS))
def test_deeply_nested_yaml_is_refused_on_the_page_pasted_or_uploaded(client, user, ledger, shape):
    ledger.record(
        "hostile input", f"YAML on /runs/new/ (load_yaml, pasted and uploaded): {shape}",
        f"200, the page again with '{LIMIT_MESSAGE}' shown (sent as an htmx request: 200, the form partial); no run stored",
    )
    client.force_login(user)
    text = YAML_NESTINGS[shape]
    for data in ({"action": "load_yaml", "yaml_text": text},
                 {"action": "load_yaml", "yaml_file": SimpleUploadedFile("deep.yaml", text.encode(), "application/x-yaml")}):
        response = client.post("/runs/new/", data)
        assert response.status_code == 200, response.status_code
        assert LIMIT_MESSAGE in response.content.decode(), shape
        # The YAML form is a plain form; its errors live on the full page, not in the htmx partial.
        data = {**data, "yaml_file": SimpleUploadedFile("deep.yaml", text.encode())} if "yaml_file" in data else data
        assert client.post("/runs/new/", data, HTTP_HX_REQUEST="true").status_code == 200
    assert not PipelineRun.objects.exists()


@pytest.mark.parametrize("shape", ["JSON arrays", "JSON objects", "flow sequences", "flow mappings"])
def test_deeply_nested_text_in_every_field_of_the_new_run_form_is_refused(client, user, ledger, shape):
    ledger.record(
        "hostile input", f"new-run form POST (validate and launch, htmx or not): {DEPTH:,} levels of {shape} in every text field",
        "200, the form again with errors on the fields; no run stored",
    )
    client.force_login(user)
    text = YAML_NESTINGS[shape]
    fields = {name: text for name in ("name", "base_model", "target_modules", "judge_base_url", "judge_model", "judge_api_key_env",
                                      "epochs", "learning_rate", "max_samples")}
    for headers in ({}, {"HTTP_HX_REQUEST": "true"}):
        for action in ("validate", "launch"):
            response = client.post("/runs/new/", {**fields, "action": action, "kind": "finetune", "answers": "generate",
                                                  "train_datasets": ["rag_qa_train"], "eval_datasets": ["ragas_eval"], "metrics": ["rouge_score"]}, **headers)
            assert response.status_code == 200, response.status_code
            form = response.context["form"]
            assert {"name", "base_model", "epochs", "learning_rate"} <= set(form.errors), form.errors
    assert not PipelineRun.objects.exists()


@pytest.mark.parametrize("shape", ["JSON arrays", "JSON objects", "flow sequences", "block mappings (600 levels)"])
def test_run_pipeline_refuses_a_deeply_nested_yaml_file_naming_the_limit(tmp_path, ledger, shape):
    from django.core.management import call_command
    from django.core.management.base import CommandError

    ledger.record("hostile input", f"run_pipeline CONFIG.yaml: {shape}", f"CommandError naming the file and '{LIMIT_MESSAGE}'; no run stored")
    path = tmp_path / "deep.yaml"
    path.write_text(YAML_NESTINGS[shape])
    for extra in ([], ["--dry-run"]):
        with pytest.raises(CommandError, match=LIMIT_MESSAGE) as caught:
            call_command("run_pipeline", str(path), *extra)
        assert str(path) in str(caught.value)
    assert not PipelineRun.objects.exists()


YAML_CASES = [
    ("tabs", "name: x\n\tkind: finetune\n", "line 2"),
    ("alias bomb (billion laughs)", "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n", "aliases"),
    ("python object tag", "name: !!python/object/apply:os.system ['true']\n", "invalid YAML"),
    ("not a mapping", "- 1\n- 2\n", "must be a mapping"),
]


@pytest.mark.parametrize(("case", "text", "expected"), YAML_CASES, ids=[c[0] for c in YAML_CASES])
def test_hostile_yaml_is_refused_on_the_page(client, user, ledger, case, text, expected):
    ledger.record("hostile input", f"YAML: {case}", "refused with the reason on the page; no run stored")
    client.force_login(user)
    response = client.post("/runs/new/", {"action": "load_yaml", "yaml_text": text})
    assert response.status_code == 200
    assert expected in response.content.decode()
    assert not PipelineRun.objects.exists()


SCRIPT = '<script>alert("x")</script>'


def test_html_and_script_are_escaped_on_every_page(client, user, api, ledger):
    ledger.record("hostile input", "HTML/script in run, dataset, answer and log text", "escaped on every page that shows it")
    upload(api, "escaped-set", line(TRAIN_ROW))
    Dataset.objects.filter(name="escaped-set").update(description=SCRIPT)
    run = make_run(user, status="completed", logs=SCRIPT, error=SCRIPT, stage=SCRIPT)
    PipelineRun.objects.filter(pk=run.pk).update(name=SCRIPT, config={**run.config, "name": SCRIPT})
    dataset = Dataset.objects.get(name="ragas_eval")
    RunResult.objects.create(run=run, dataset=dataset, variant="finetuned", metric="rouge_score", value=0.5, n_scored=1)
    SampleResult.objects.create(run=run, dataset=dataset, variant="finetuned", index=0, question=SCRIPT, contexts=[SCRIPT],
                                ground_truth=SCRIPT, answer=SCRIPT, scores={"rouge_score": 0.5}, reasons={})
    client.force_login(user)
    ds = Dataset.objects.get(name="escaped-set")
    for path in ["/", f"/runs/{run.pk}/", f"/runs/{run.pk}/status/", f"/runs/{run.pk}/row/", f"/runs/{run.pk}/results/",
                 f"/compare/?runs={run.pk}", "/datasets/", f"/datasets/{ds.pk}/", f"/runs/new/?clone={run.pk}"]:
        page = client.get(path).content.decode()
        assert SCRIPT not in page, path
        assert "&lt;script&gt;" in page, path


def test_csv_exports_neutralise_formulas(client, api, user, ledger):
    ledger.record("hostile input", "CSV export of values starting with = + - @", "both CSVs 200 with every row; every such cell prefixed with '")
    run = make_run(user, status="completed")
    dataset = Dataset.objects.get(name="ragas_eval")
    PipelineRun.objects.filter(pk=run.pk).update(name="=HYPERLINK(\"http://evil\")")
    for index, evil in enumerate(["=1+1", "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A2)"]):
        SampleResult.objects.create(run=run, dataset=dataset, variant="finetuned", index=index, question=evil, contexts=["c"],
                                    ground_truth=evil, answer=evil, scores={}, reasons={})
    RunResult.objects.create(run=run, dataset=dataset, variant="finetuned", metric="rouge_score", value=0.5, n_scored=1)
    response = api.get(f"/api/runs/{run.pk}/export.csv")
    assert response.status_code == 200
    results = list(csv.reader(io.StringIO(response.content.decode())))
    assert len(results) == 2 and results[1][1] == "'=HYPERLINK(\"http://evil\")"
    client.force_login(user)
    response = client.get(f"/runs/{run.pk}/samples.csv")
    assert response.status_code == 200
    samples = list(csv.reader(io.StringIO(response.content.decode())))
    assert len(samples) == 1 + 4  # a header and the four evil rows, so the loop below has cells to check
    assert [row[2] for row in samples[1:]] == ["'=1+1", "'+cmd|' /C calc'!A0", "'-2+3", "'@SUM(A1:A2)"]
    for row in samples[1:]:
        for cell in row:
            assert cell[:1] not in ("=", "+", "-", "@"), row
