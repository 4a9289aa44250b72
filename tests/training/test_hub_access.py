"""A hub model that needs a token and has none fails with a message saying so (and never shows a token)."""

import httpx2
import pytest
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

from training.finetune import HubModelNeedsToken, hub_access


def hub_error(cls, status: int):
    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/gated-model")
    return cls(f"{status} Client Error", response=httpx2.Response(status, request=request))


def raised_as_transformers_does(error):
    # transformers re-raises the hub's error as an OSError `from` it
    try:
        raise error
    except OSError as exc:
        raise OSError("You are trying to access a gated repo.") from exc


def test_a_gated_model_without_a_token_says_to_set_hf_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(HubModelNeedsToken, match=r"hub model 'org/gated-model' is gated: set HF_TOKEN for the gpu workers"), hub_access("org/gated-model"):
        raised_as_transformers_does(hub_error(GatedRepoError, 401))


def test_a_token_that_may_not_read_it_is_named_without_its_value(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secretvalue123")
    with pytest.raises(HubModelNeedsToken) as caught, hub_access("org/private-model"):
        raised_as_transformers_does(hub_error(RepositoryNotFoundError, 404))
    assert "is private or does not exist: the HF_TOKEN this worker has is not allowed to read it" in str(caught.value)
    assert "hf_secretvalue123" not in str(caught.value)


def test_other_loading_errors_pass_unchanged():
    with pytest.raises(OSError, match="no config.json"), hub_access("/models/x"):
        raise OSError("no config.json")
