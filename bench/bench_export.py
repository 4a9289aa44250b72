"""Export of SmolLM2-135M-Instruct after a default-like fine-tune: time against size and disk speed, and q8_0's honest check.

    python bench/bench_export.py [--json OUT] [--set training.max_steps=5 ...] [--keep]

1. The default fine-tune (configs/finetune_rag_qa.yaml: SmolLM2, LoRA r=8 all-linear,
   one epoch at 2e-4 on rag_qa_train, 50 ragas_eval questions, greedy 64 tokens), run
   inline on the embedded default in a temporary MLOPS_VAR_DIR (base answers left out:
   `evaluation.compare_base=false`, the export check does not need them).
2. `manage.py export_run RUN --gguf q8_0`: the real export job (merge, GGUF q8_0, both
   forms asked the 50 questions again and compared with the adapter, the merged
   version registered). Its check gives the figures of quality: identical answers
   and, per metric, the mean difference with its 90% interval and the TOST verdict.
3. The engines again, timed on their own, in the same folder: the merge, GGUF f16 and
   GGUF q8_0, each against the same run's baseline: the time this disk takes to write
   that many bytes (`disk_write_speed`: 256 MB of incompressible data, written and
   fsynced in the same folder, measured right before). ratio = export seconds /
   (bytes written / disk MB/s): 1.0 would be an export that only waits for the disk.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, PeakRss, print_table, ratio, write_json  # noqa: E402

MODEL = "smollm2-135m-instruct"


def _django(var_dir: Path) -> None:
    os.environ["MLOPS_VAR_DIR"] = str(var_dir)
    os.environ.setdefault("MLOPS_MODELS_DIR", str(ROOT / "var" / "models"))
    for name in ("DATABASE_URL", "REDIS_URL", "MLFLOW_TRACKING_URI"):
        os.environ.pop(name, None)  # the embedded default, in the temporary folder
    os.environ["DJANGO_SETTINGS_MODULE"] = "mlops_site.settings"
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="run_pipeline overrides (quicker runs)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    began = time.monotonic()
    var_dir = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        return _run(args, var_dir, began)
    finally:
        if not args.keep:
            shutil.rmtree(var_dir, ignore_errors=True)


def _run(args, var_dir: Path, began: float) -> dict[str, Any]:
    _django(var_dir)
    from django.core.management import call_command

    from runs.models import ModelExport, PipelineRun
    from training.export import disk_write_speed, folder_bytes, merge_adapter, write_gguf
    from training.local_models import resolve_model_path

    base = Path(resolve_model_path(f"local:{MODEL}"))
    sets = ["evaluation.compare_base=false", *args.overrides]
    started = time.monotonic()
    call_command("run_pipeline", str(ROOT / "configs" / "finetune_rag_qa.yaml"), *[x for s in sets for x in ("--set", s)], stdout=io.StringIO())
    run = PipelineRun.objects.latest("id")
    finetune_seconds = time.monotonic() - started
    assert run.status == "completed", run.error

    out = io.StringIO()
    started = time.monotonic()
    call_command("export_run", str(run.pk), "--gguf", "q8_0", stdout=out)
    export_job_seconds = time.monotonic() - started
    print(out.getvalue())
    export = ModelExport.objects.prefetch_related("checks").get(run=run)
    checks = {c.form: c for c in export.checks.all()}

    # The engines on their own, each against this disk's speed measured just before it.
    work = var_dir / "engines"
    adapter = var_dir / "runs" / str(run.pk) / "adapter"
    rss = PeakRss()
    timings: dict[str, dict[str, Any]] = {}
    speed = disk_write_speed(work)
    merged = merge_adapter(base, adapter, work / "merged", generation={"prompt_format": "auto", "max_new_tokens": 64})
    timings["merge"] = {"seconds": round(merged.seconds, 2), "bytes": merged.bytes, "disk_mb_s": round(speed, 1)}
    for quantization in ("f16", "q8_0"):
        speed = disk_write_speed(work)
        written = write_gguf(merged.folder, work / f"model-{quantization}.gguf", quantization=quantization)
        timings[f"gguf_{quantization}"] = {"seconds": round(written.seconds, 2), "bytes": written.bytes, "disk_mb_s": round(speed, 1)}
    for item in timings.values():
        item["disk_seconds"] = round(item["bytes"] / 1e6 / item["disk_mb_s"], 2)
        item["ratio_vs_disk"] = ratio(item["seconds"], item["disk_seconds"])

    def quality(check) -> dict[str, Any]:
        return {"label": check.label, "identical": check.identical, "rows": check.rows, "identical_share": round(check.identical / check.rows, 3),
                "verdict": check.verdict, "seconds": check.seconds,
                "metrics": {c["metric"]: {k: c[k] for k in ("delta", "ci_low", "ci_high", "p_value", "verdict", "n_pairs")} for c in check.comparisons}}

    report = {
        "model": MODEL, "base_bytes": folder_bytes(base), "finetune_seconds": round(finetune_seconds, 1),
        "export_job_seconds": round(export_job_seconds, 1), "export_job_figures": export.figures, "margin": export.margin,
        "timings": timings, "peak_rss_mib": rss.peak_mib(), "checks": {form: quality(c) for form, c in checks.items()},
        "verdict": export.verdict, "registered": export.registered_model, "seconds": round(time.monotonic() - began, 1),
        "when": datetime.now(UTC).isoformat(timespec="seconds"), "load_average": os.getloadavg(),
    }
    rows = [[name, t["seconds"], f"{t['bytes'] / 1e6:.1f} MB", t["disk_mb_s"], t["disk_seconds"], t["ratio_vs_disk"]] for name, t in timings.items()]
    print_table(f"export engines, {MODEL} ({report['base_bytes'] / 1e6:.0f} MB on disk, float32)", rows,
                ["part", "seconds", "written", "disk MB/s", "disk-bound s", "ratio"])
    rows = []
    for check in report["checks"].values():
        for metric, m in check["metrics"].items():
            interval = f"[{m['ci_low']:+.4f}, {m['ci_high']:+.4f}]" if m["ci_low"] is not None else ""
            rows.append([check["label"], f"{check['identical']}/{check['rows']}", metric, f"{m['delta']:+.4f}" if m["delta"] is not None else "",
                         interval, m["verdict"]])
    print_table(f"export check vs the adapter (margin {export.margin:g}, TOST, 90% t-interval)", rows,
                ["form", "identical", "metric", "difference", "interval", "verdict"])
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
