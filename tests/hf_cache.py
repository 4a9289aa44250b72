"""A fake Hugging Face cache: the layout huggingface_hub writes, with nothing downloaded.

    <HF_HUB_CACHE>/models--org--name/refs/main            -> the snapshot's commit hash
    <HF_HUB_CACHE>/models--org--name/snapshots/<hash>/... -> config.json, weights (empty files)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path


def cache_model(root: Path, repo_id: str, files: Iterable[str] = ("config.json", "model.safetensors")) -> Path:
    """Put `repo_id`'s main snapshot with `files` in the cache at `root`; returns the snapshot folder."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name in files:
        (snapshot / name).write_text(json.dumps({"model_type": "llama"}) if name == "config.json" else "")
    return snapshot
