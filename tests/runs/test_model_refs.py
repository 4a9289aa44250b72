"""model.base is resolved when a config is validated: a hub id must be in this machine's Hugging Face cache,
or known to the hub when it is online; otherwise every door (API, data check, form) refuses it naming the field."""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler

import pytest

from runs import model_refs
from runs.config import ConfigError, check_model_reference, known_local_models, validate_config
from runs.models import PipelineRun
from tests.judge_server import LocalHTTPServer

from .factories import finetune_config, make_run

pytestmark = pytest.mark.django_db

KNOWN = {"rag_qa_train": "train", "ragas_eval": "eval"}
MADE_UP = "nobody/made-up-model-xyz"


def run_on(owner, base: str) -> None:
    """An earlier run of `owner` on `base` (stored as it was allowed then)."""
    PipelineRun.objects.filter(pk=make_run(owner).pk).update(base_model=base)


def model_error(base: str) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_config(finetune_config(model={"base": base}), known_datasets=KNOWN)
    errors = {e["field"]: e["message"] for e in caught.value.errors}
    assert set(errors) == {"model.base"}, errors
    return errors["model.base"]


def test_a_cached_hub_id_is_valid_and_an_uncached_one_is_refused_saying_what_to_do(hf_cache):
    hf_cache("HuggingFaceTB/SmolLM2-135M-Instruct")
    config = validate_config(finetune_config(model={"base": "HuggingFaceTB/SmolLM2-135M-Instruct"}), known_datasets=KNOWN)
    assert config["model"]["base"] == "HuggingFaceTB/SmolLM2-135M-Instruct"

    message = model_error(MADE_UP)
    assert message.startswith(f"{MADE_UP!r} is not in this machine's Hugging Face cache and the hub is offline")
    assert f"hf download {MADE_UP}" in message
    assert all(f"local:{name}" in message for name in known_local_models())


def test_a_download_that_stopped_after_config_json_is_refused(hf_cache):
    hf_cache("org/half-downloaded", files=["config.json"])
    assert "only partly in this machine's Hugging Face cache (config.json but no weights)" in model_error("org/half-downloaded")
    hf_cache("org/sharded", files=["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json"])
    validate_config(finetune_config(model={"base": "org/sharded"}), known_datasets=KNOWN)


def test_the_cache_is_read_the_same_way_without_huggingface_hub(hf_cache, monkeypatch):
    """The web image has no model libraries: the cache's layout is read directly."""
    hf_cache("org/cached")
    hf_cache("org/no-weights", files=["config.json"])
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    assert model_refs.hub_model_cached("org/cached") and not model_refs.hub_model_cached("org/no-weights")
    assert model_refs.cached_hub_models() == ["org/cached"]
    assert "not in this machine's Hugging Face cache" in model_error(MADE_UP)


def test_the_api_refuses_it_with_400_naming_the_field_and_creates_nothing(api, hf_cache):
    response = api.post("/api/runs/", finetune_config(model={"base": MADE_UP}), format="json")
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["errors"][0]["field"] == "model.base" and "hub is offline" in body["errors"][0]["message"]
    assert "model.base" in body["detail"]
    check = api.post("/api/runs/check/", finetune_config(model={"base": MADE_UP}), format="json")
    assert check.status_code == 400, check.content
    assert check.json()["errors"][0]["field"] == "model.base"
    assert not PipelineRun.objects.exists()


def test_a_blank_base_model_is_required_not_the_toy_model(api):
    response = api.post("/api/runs/", finetune_config(model={"base": "  "}), format="json")
    assert response.status_code == 400
    assert response.json()["errors"] == [{"field": "model.base", "message": "required"}]


def test_the_workers_check_does_not_ask_for_the_model():
    """A cpu worker scoring a run never loads the base model: before a step the shape and path rules apply, not the cache."""
    check_model_reference(MADE_UP)
    with pytest.raises(ValueError, match="hub is offline"):
        check_model_reference(MADE_UP, loadable=True)


class StandInHub:
    """The hub's model API on loopback (HF_ENDPOINT): 200 with a JSON body for `known`, 401 for anything else."""

    def __init__(self, known: set[str]) -> None:
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                hub.requests.append(self.path)
                found = self.path.removeprefix("/api/models/") in known
                body = b'{"id": "x"}' if found else b'{"error": "Repository not found"}'
                self.send_response(200 if found else 401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = LocalHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def online_hub(hf_cache, monkeypatch):
    hub = StandInHub({"org/on-the-hub"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(model_refs, "_found_online", {})
    yield hub
    hub.close()


def test_with_the_hub_online_an_id_the_hub_knows_is_valid_and_asked_about_once(online_hub):
    for _ in range(3):  # Validate, Check data, launch
        validate_config(finetune_config(model={"base": "org/on-the-hub"}), known_datasets=KNOWN)
    assert online_hub.requests == ["/api/models/org/on-the-hub"]
    message = model_error(MADE_UP)
    assert message.startswith(f"{MADE_UP!r} was not found on the Hugging Face hub")


def test_with_the_hub_online_but_unreachable_the_message_says_so(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    message = model_error("org/somewhere")
    assert "the hub did not answer" in message and "set HF_HUB_OFFLINE=1 if this machine has no network" in message


def test_a_slow_hub_is_given_up_on_after_the_timeout(hf_cache, monkeypatch):
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts, never answers
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setattr(model_refs, "HUB_CHECK_TIMEOUT_SECONDS", 0.3)
    try:
        assert "the hub did not answer" in model_error("org/slow")
    finally:
        listener.close()


def test_the_list_offers_local_builds_cached_models_and_earlier_runs_that_load(hf_cache, user, other_user, settings, tmp_path):
    hf_cache("org/cached-model")
    hf_cache("org/partial", files=["config.json"])
    allowed = tmp_path / "models"
    (allowed / "mine").mkdir(parents=True)
    settings.MLOPS_MODEL_PATHS = [str(allowed)]
    for base in ["org/cached-model", "org/not-cached", str(allowed / "mine"), "/etc/elsewhere"]:
        run_on(user, base)
    run_on(other_user, str(allowed / "theirs"))

    offered = {c.value: c.label for c in model_refs.model_choices(user=user)}
    assert list(offered)[: len(known_local_models())] == [f"local:{n}" for n in known_local_models()]
    assert offered["org/cached-model"] == "in this machine's Hugging Face cache"
    assert offered[str(allowed / "mine")] == "used in your earlier runs"
    # Offline and uncached, outside the allowed folders, another user's, half downloaded: none of them would load.
    assert not {"org/not-cached", "/etc/elsewhere", str(allowed / "theirs"), "org/partial"} & set(offered)


def test_with_the_hub_online_earlier_hub_ids_are_offered_as_downloads(online_hub, user):
    run_on(user, "org/not-cached")
    offered = {c.value: c.label for c in model_refs.model_choices(user=user)}
    assert offered["org/not-cached"] == "used in your earlier runs; downloads from the hub"
    assert online_hub.requests == []  # listing asks the hub nothing: validation does


def test_the_cache_is_found_where_huggingface_hub_looks_hf_home_or_hf_hub_cache(tmp_path, monkeypatch):
    from tests.hf_cache import cache_model

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert model_refs.hub_cache_dir() == tmp_path / "hf-home" / "hub"
    cache_model(tmp_path / "hf-home" / "hub", "org/in-hf-home")
    assert model_refs.hub_model_cached("org/in-hf-home")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # wins over HF_HOME, as in huggingface_hub
    assert not model_refs.hub_model_cached("org/in-hf-home")
