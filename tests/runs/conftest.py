from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.hf_cache import cache_model


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Callable[..., Path]:
    """HF_HUB_CACHE pointed at an empty folder, the hub offline; returns cache(repo_id, files=...) to put a model in it."""
    root = tmp_path / "hf-hub-cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return lambda repo_id, files=("config.json", "model.safetensors"): cache_model(root, repo_id, files)
