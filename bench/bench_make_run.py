"""Benchmark 6: `make run` on a fresh clone, the virtual environment already built.

    python3 bench/bench_make_run.py [--json OUT] [--keep]

Clones this repository's committed HEAD into a temporary folder (nothing under
var/: no database, no MLflow store, no converted model), points the clone's
.venv at this checkout's (a venv built by `make venv` from the same pinned
files), and times `make -o .venv/.installed run` there: migrations, the
first-use conversion of local:smollm2-135m-instruct, the data check, the
fine-tune, generation for base and fine-tuned, RAGAS scoring, MLflow logging
and registration. `-o .venv/.installed` tells make the venv is up to date (a
fresh clone's requirement files are newer than the venv's stamp). The figure is
wall seconds against the 6-minute budget (ratio = wall / 360; <= 1 meets it),
with the time between the run's status changes (its events in the clone's
SQLite database), so where the minutes go is printed beside the total.
`--selection '{every: 5, rows: 0.1}'` also times `make run` with that checkpoint
selection in the default config, in a second fresh clone of the same run: the
figure that says whether selection can be on by default (issue 23).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, print_table, ratio, verdict, write_json  # noqa: E402

BUDGET_SECONDS = 360.0


def stage_seconds(database: Path) -> list[tuple[str, float]]:
    """The run's status changes (runs_runevent) as (stage, seconds until the next change), from the clone's SQLite."""
    with sqlite3.connect(database) as db:
        events = db.execute("SELECT from_status, to_status, message, at FROM runs_runevent ORDER BY at, id").fetchall()
    stamps = [(to + (f" ({message[:60]})" if message and frm == to else ""), datetime.fromisoformat(str(at))) for frm, to, message, at in events]
    return [(name, round((stamps[i + 1][1] - at).total_seconds(), 1)) for i, (name, at) in enumerate(stamps[:-1])]


def fresh_clone(target: Path) -> None:
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(target)], check=True)
    venv = ROOT / ".venv"
    if not (venv / ".installed").exists():
        raise SystemExit(f"{venv} is not built: run `make venv` first (this benchmark times make run, not the install)")
    (target / ".venv").symlink_to(venv)


def timed_make_run(clone: Path, selection: str | None = None) -> dict[str, Any]:
    """`make run` in a fresh clone, timed; with `selection`, the clone's default config gets that `selection:` first."""
    fresh_clone(clone)
    if selection:
        config = clone / "configs" / "finetune_rag_qa.yaml"
        config.write_text(config.read_text() + f"\nselection: {selection}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "MLFLOW_TRACKING_URI", "MLOPS_MODELS_DIR")}
    started = time.monotonic()
    proc = subprocess.run(["make", "-o", ".venv/.installed", "run"], cwd=clone, env=env, capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    output = proc.stdout + proc.stderr
    (clone.parent / f"make-run{'-selection' if selection else ''}.log").write_text(output)
    if proc.returncode != 0:
        print(output[-4000:])
        raise SystemExit(f"make run failed (exit {proc.returncode})")
    trained = next((line.strip() for line in output.splitlines() if "trained " in line and " steps on " in line), None)
    chosen = next((line.strip() for line in output.splitlines() if line.startswith("the adapter of step")), None)
    return {"wall_seconds": round(wall, 1), "stages": stage_seconds(clone / "var" / "db.sqlite3"), "training_line": trained,
            "selection": selection, "selection_line": chosen}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the clone (its var/ holds the run) and print where")
    parser.add_argument("--selection", default=None, metavar="YAML",
                        help="also time make run with this `selection:` in the default config (another fresh clone, same run), "
                             "e.g. '{every: 5, rows: 0.1}'")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="bench-make-run-"))
    try:
        print(f"bench 6, make run: fresh clone of {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()} "
              f"in {workdir}, venv reused, embedded default (SQLite, inline, local MLflow store, model converted on first use)", flush=True)
        run = timed_make_run(workdir / "clone")
        wall = run["wall_seconds"]
        report = {
            "wall_seconds": wall, "budget_seconds": BUDGET_SECONDS, "ratio_to_budget": ratio(wall, BUDGET_SECONDS),
            "stages": run["stages"], "training_line": run["training_line"], "cpus": os.cpu_count(),
        }
        report["targets"] = {"wall": verdict(report["ratio_to_budget"], 1.0, at_least=False)}
        rows = [["make run, wall seconds", wall, BUDGET_SECONDS, report["ratio_to_budget"], report["targets"]["wall"]]]
        if args.selection:
            print(f"  the same with selection: {args.selection} (another fresh clone)", flush=True)
            sel = timed_make_run(workdir / "clone-selection", args.selection)
            report["with_selection"] = {**sel, "ratio_to_budget": ratio(sel["wall_seconds"], BUDGET_SECONDS),
                                        "ratio_to_without": ratio(sel["wall_seconds"], wall)}
            report["targets"]["wall_with_selection"] = verdict(report["with_selection"]["ratio_to_budget"], 1.0, at_least=False)
            rows.append([f"make run with selection {args.selection}", sel["wall_seconds"], BUDGET_SECONDS,
                         report["with_selection"]["ratio_to_budget"], report["targets"]["wall_with_selection"]])
        report["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        print_table("make run on a fresh clone (venv built, model converted on first use)", rows,
                    ["figure", "ours", "budget", "ratio", "target (<= 1.0)"])
        for label, r in [("make run", run)] + ([("with selection", report["with_selection"])] if args.selection else []):
            print(f"  where the time went, {label} (the run's status changes, from its events):")
            for name, seconds in r["stages"]:
                print(f"    {seconds:>7.1f}s  {name}")
            for line in (r["training_line"], r.get("selection_line")):
                if line:
                    print(f"  {line}")
        write_json(args.json, report)
        return report
    finally:
        if args.keep:
            print(f"kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
