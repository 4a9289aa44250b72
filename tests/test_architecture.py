"""The structure the project keeps, read from the code itself (docs/ARCHITECTURE.md explains it).

- Dependencies point one way: runs/ (the application) calls into training/ and
  evaluation/ (the engines); the engines import nothing of runs/ (or of the
  datasets app: they get rows, not models).
- One write path: rows of the run models (runs, jobs, events, results, samples,
  comparisons, decisions) are written only by runs/services.py: through a
  manager, a queryset kept in a variable, a related manager or an instance, and
  under whatever name the model was imported as.
- A kind is declared once: literal kind checks (`RunKind.X`, `kind == "..."`)
  outside runs/kinds/ stay at or under a small budget.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("training", "evaluation")
APPLICATION_PACKAGES = ("runs", "datasets_app", "mlops_site")
RUN_MODELS = {"PipelineRun", "Job", "RunEvent", "RunResult", "SampleResult", "ScoreComparison", "PromotionDecision"}
# PipelineRun's reverse relations (and Job's child link)
RUN_RELATIONS = {"results", "events", "samples", "comparisons", "promotion_decisions", "jobs", "children", "parent_jobs"}
WRITES = {"update", "create", "bulk_create", "bulk_update", "update_or_create", "get_or_create", "save", "delete"}
ALLOWED_WRITERS = {Path("runs/services.py")}
# Names the code gives run rows when it holds one (an instance write: run.save(), job.delete()).
INSTANCE_NAMES = {"run", "job", "event", "result", "sample", "comparison", "decision", "child", "parent"}


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
        elif isinstance(node, ast.Subscript):
            node = node.value
        else:
            return parts[::-1]


def model_aliases(tree: ast.AST) -> set[str]:
    """The names the run models go by in a module: their own, `as` aliases, and module aliases (`import runs.models as m`)."""
    names = set(RUN_MODELS)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[-1] == "models":
            names |= {alias.asname for alias in node.names if alias.name in RUN_MODELS and alias.asname}
    return names


def _mentions_run_rows(node: ast.AST, models: set[str], tainted: set[str]) -> bool:
    """Whether an expression is (or builds on) a run model's manager or queryset, or a name bound to one."""
    chain = attribute_chain(node)
    if any(part in models for part in chain) and ("objects" in chain or isinstance(node, ast.Call)):
        return True
    return bool(chain) and (chain[0] in tainted or any(part in RUN_RELATIONS for part in chain[1:]))


def run_row_writes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    models = model_aliases(tree)
    # Names bound to a run queryset or row anywhere in the module: `qs = PipelineRun.objects.filter(...)`, `run = Job(...)`.
    tainted: set[str] = set()
    for _ in range(3):  # a name bound from a tainted name (qs2 = qs.filter(...)) is tainted too
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if _mentions_run_rows(node.value, models, tainted):
                    tainted |= {t.id for t in targets if isinstance(t, ast.Name)}
            elif isinstance(node, ast.For) and isinstance(node.target, ast.Name) and _mentions_run_rows(node.iter, models, tainted):
                tainted.add(node.target.id)
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in WRITES):
            continue
        chain = attribute_chain(node.func)
        head = chain[:-1]
        through_model = any(part in models for part in head) and ("objects" in head or len(head) >= 1 and head[-1] in models)
        through_relation = any(part in RUN_RELATIONS for part in head[1:])
        through_name = bool(head) and head[0] in tainted
        on_instance = len(chain) == 2 and chain[0] in INSTANCE_NAMES
        if through_model or through_relation or through_name or on_instance:
            found.append((node.lineno, f"line {node.lineno}: {'.'.join(chain)}(...)"))
    return [text for _, text in sorted(found)]


def test_the_checker_sees_each_kind_of_write(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from runs.models import PipelineRun as PR\n"
        "import runs.models as m\n"
        "PipelineRun.objects.filter(pk=1).update(stage='x')\n"
        "SampleResult.objects.bulk_create([])\n"
        "run.results.create(metric='m')\n"
        "run.save()\n"
        "PipelineRun.objects.filter(pk=1).values_list('status')\n"
        "owner.save()\n"
        "qs = PipelineRun.objects.filter(status='pending')\n"
        "qs.update(status='failed')\n"
        "PR.objects.all().delete()\n"
        "m.Job.objects.filter(pk=1).update(state='done')\n"
        "row = Job.objects.get(pk=1)\n"
        "row.save()\n"
        "for r in PR.objects.all():\n"
        "    r.delete()\n"
        "other = Dataset.objects.filter(pk=1)\n"
        "other.update(name='x')\n"
        "run.jobs.filter(state='queued').update(state='cancelled')\n"
    )
    assert run_row_writes(sample) == [
        "line 3: PipelineRun.objects.filter.update(...)",
        "line 4: SampleResult.objects.bulk_create(...)",
        "line 5: run.results.create(...)",
        "line 6: run.save(...)",
        "line 10: qs.update(...)",
        "line 11: PR.objects.all.delete(...)",
        "line 12: m.Job.objects.filter.update(...)",
        "line 14: row.save(...)",
        "line 16: r.delete(...)",
        "line 19: run.jobs.filter.update(...)",
    ]


@pytest.mark.parametrize("path", source_files(*APPLICATION_PACKAGES, *ENGINES), ids=lambda p: str(p.relative_to(ROOT)))
def test_run_rows_are_written_only_by_the_services(path):
    if path.relative_to(ROOT) in ALLOWED_WRITERS:
        return
    writes = run_row_writes(path)
    assert not writes, f"{path.relative_to(ROOT)} writes run rows outside runs/services.py: {writes}"


# --- a kind is declared once

KIND_CHECK = re.compile(
    r"RunKind\.[A-Z_]+"  # RunKind.FINETUNE
    r"|\bkind\b[\"'\])]*\s*[!=]=\s*[\"']"  # kind == "finetune", config["kind"] != 'x', run.kind == 'x'
    r"|[\"'][a-z_]+[\"']\s*[!=]=\s*[a-z_.]*\bkind\b"  # "finetune" == run.kind
)
KIND_CHECK_PLACES = ("runs", "training", "evaluation", "templates", "static")
KIND_CHECK_BUDGET = 3
NOT_RUN_KINDS = re.compile(r"\b(dataset|d|p|spec)\.kind\b|kind == [\"'](exact|near|last|best)[\"']|\bkind\s*[!=]=\s*[\"'](train|eval)[\"']")


def literal_kind_checks() -> list[str]:
    """Literal kind checks outside runs/kinds/ (a dataset's kind, train|eval, is not a run's kind)."""
    found = []
    for place in KIND_CHECK_PLACES:
        for path in sorted((ROOT / place).rglob("*")):
            if path.suffix not in (".py", ".html", ".js") or "migrations" in path.parts or "vendor" in path.parts:
                continue
            if path.relative_to(ROOT).parts[:2] == ("runs", "kinds"):
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if KIND_CHECK.search(line) and not NOT_RUN_KINDS.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    return found


def test_the_kind_check_finder_sees_each_form(tmp_path):
    lines = ['if run.kind == "finetune":', "if config['kind'] != 'eval_only':", "{% if run.kind == 'finetune' %}", "x = RunKind.SWEEP",
             "if dataset.kind == 'train':", 'if kind == "exact":']
    assert [bool(KIND_CHECK.search(line) and not NOT_RUN_KINDS.search(line)) for line in lines] == [True, True, True, True, False, False]


def test_literal_kind_checks_outside_the_kind_modules_stay_within_budget():
    found = literal_kind_checks()
    assert len(found) <= KIND_CHECK_BUDGET, "ask the kind (runs/kinds/) instead:\n" + "\n".join(found)
