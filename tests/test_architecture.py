"""The structure DESIGN.md fixes, read from the code itself.

- Dependencies point one way: runs/ (the application) calls into training/ and
  evaluation/ (the engines); the engines import nothing of runs/ (or of the
  datasets app: they get rows, not models).
- One write path: rows of PipelineRun, RunEvent, RunResult and SampleResult are
  written only by runs/services.py and the step registry (runs/pipeline.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("training", "evaluation")
APPLICATION_PACKAGES = ("runs", "datasets_app", "mlops_site")
RUN_MODELS = {"PipelineRun", "RunEvent", "RunResult", "SampleResult", "ScoreComparison", "PromotionDecision"}
RUN_RELATIONS = {"results", "events", "samples", "comparisons", "promotion_decisions"}  # PipelineRun's reverse relations
WRITES = {"update", "create", "bulk_create", "bulk_update", "update_or_create", "get_or_create", "save", "delete"}
ALLOWED_WRITERS = {Path("runs/services.py"), Path("runs/pipeline.py")}


def source_files(*packages: str) -> list[Path]:
    return sorted(
        path for package in packages for path in (ROOT / package).rglob("*.py")
        if "migrations" not in path.parts
    )


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("path", source_files(*ENGINES), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_engines_import_nothing_of_the_application(path):
    offending = sorted(m for m in imported_modules(path) if m.split(".")[0] in APPLICATION_PACKAGES)
    assert not offending, f"{path.relative_to(ROOT)} imports {offending}: engines get plain data and callbacks from runs/"


def attribute_chain(node: ast.AST) -> list[str]:
    """`PipelineRun.objects.filter(...).update` -> ["PipelineRun", "objects", "filter", "update"]."""
    parts: list[str] = []
    while True:
        if isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Name):
            parts.append(node.id)
            return parts[::-1]
        else:
            return parts[::-1]


def run_row_writes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in WRITES):
            continue
        chain = attribute_chain(node.func)
        through_manager = chain[:1] and chain[0] in RUN_MODELS and "objects" in chain
        through_relation = any(part in RUN_RELATIONS for part in chain[1:-1])
        # An instance write: run.save(), sample.delete() (names the code uses for these rows).
        on_instance = len(chain) == 2 and chain[0] in {"run", "event", "result", "sample"}
        if through_manager or through_relation or on_instance:
            found.append(f"line {node.lineno}: {'.'.join(chain)}(...)")
    return found


def test_the_checker_sees_each_kind_of_write(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "PipelineRun.objects.filter(pk=1).update(stage='x')\n"
        "SampleResult.objects.bulk_create([])\n"
        "run.results.create(metric='m')\n"
        "run.save()\n"
        "PipelineRun.objects.filter(pk=1).values_list('status')\n"
        "owner.save()\n"
    )
    assert run_row_writes(sample) == [
        "line 1: PipelineRun.objects.filter.update(...)",
        "line 2: SampleResult.objects.bulk_create(...)",
        "line 3: run.results.create(...)",
        "line 4: run.save(...)",
    ]


@pytest.mark.parametrize("path", source_files(*APPLICATION_PACKAGES, *ENGINES), ids=lambda p: str(p.relative_to(ROOT)))
def test_run_rows_are_written_only_by_the_services_and_the_step_registry(path):
    if path.relative_to(ROOT) in ALLOWED_WRITERS:
        return
    writes = run_row_writes(path)
    assert not writes, f"{path.relative_to(ROOT)} writes run rows outside runs/services.py: {writes}"
