"""The documents a new engineer reads stay true to the tree: every file and folder they name exists, the README
links to docs/ARCHITECTURE.md, and nothing in the repository points at a document outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/ARCHITECTURE.md")
# `runs/kinds/finetune.py`, `training/`, `tests/runs/test_jobs.py`: a path in backticks, rooted in a top-level folder.
TOP = ("runs", "training", "evaluation", "datasets_app", "mlops_site", "tests", "bench", "configs", "data", "docker", "scripts", "docs",
       "templates", "static", "requirements")
PATH_RE = re.compile(r"`((?:" + "|".join(TOP) + r")/[\w./-]*)`")


@pytest.mark.parametrize("doc", DOCS)
def test_every_path_a_document_names_exists(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    missing = sorted({p for p in PATH_RE.findall(text) if "*" not in p and not (ROOT / p.rstrip(".")).exists()})
    assert not missing, f"{doc} names paths that do not exist: {missing}"


def test_the_readme_links_to_the_architecture():
    assert "docs/ARCHITECTURE.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_nothing_in_the_repository_points_outside_it():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".html", ".js", ".yml", ".yaml", ".sh", ".txt", ".toml", ".cfg"} or name == "tests/test_docs.py":
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if "DESIGN.md" in text or "../shared/" in text or "NOTES.md" in text:
            offenders.append(name)
    assert not offenders, f"these files point at documents outside the repository: {offenders}"
