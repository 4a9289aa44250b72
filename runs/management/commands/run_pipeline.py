"""Run a pipeline from a YAML config: the command-line twin of "New run" on the web.

Inline (the embedded default) it runs every step in this process with a
progress bar and prints the score table; with --enqueue it hands the run to the
RQ workers. Exits non-zero when the config is refused or the run does not
complete.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import connection
from tqdm import tqdm

from evaluation.metric_names import RETRIEVAL_METRICS
from evaluation.power import describe
from evaluation.significance import format_p_value
from runs.config import ConfigError, parse_yaml
from runs.models import PipelineRun, RunStatus, ordered_variants
from runs.pipeline import drive_inline, inline_foreground
from runs.selectors import run_comparisons, run_promotion, run_score_table
from runs.services import run_create


def apply_overrides(data, overrides: list[str]):
    """--set PATH=VALUE: the value parsed as YAML (bounded like a config), put at the dotted path."""
    if not overrides:
        return data
    if not isinstance(data, dict):
        raise CommandError("--set needs a config that is a mapping")
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path.strip():
            raise CommandError(f"--set {item!r}: expected PATH=VALUE, e.g. training.max_steps=20")
        try:
            value = parse_yaml(text, source=f"--set {path}")
        except ConfigError as exc:
            raise CommandError(str(exc)) from None
        node = data
        *parents, leaf = path.strip().split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise CommandError(f"--set {path}: {part} is not a section of the config")
            node = child
        node[leaf] = value
    return data


class Command(BaseCommand):
    help = "Validate a YAML config and run the pipeline (inline, or on the workers with --enqueue)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("config", type=Path)
        parser.add_argument("--enqueue", action="store_true", help="Hand the run to the RQ workers (needs REDIS_URL).")
        parser.add_argument("--wait", action="store_true", help="With --enqueue: follow the run until it ends.")
        parser.add_argument("--user", default="cli", help="Owner of the run (created without a password if missing).")
        parser.add_argument("--dry-run", action="store_true", help="Validate the config only.")
        parser.add_argument(
            "--check", action="store_true",
            help="Check the data only (token lengths, truncation, train/eval overlap, duplicates, steps and time); exit 1 if refused.",
        )
        parser.add_argument(
            "--set", action="append", default=[], metavar="PATH=VALUE", dest="overrides",
            help="Override one config field, e.g. --set training.max_steps=20 --set evaluation.max_samples=10 (VALUE is YAML).",
        )

    def handle(
        self, *args, config: Path, enqueue: bool, wait: bool, user: str, dry_run: bool, check: bool, overrides: list[str], **options,
    ) -> None:
        if options["verbosity"] < 2:
            # The run's own log keeps every line (GET /api/runs/{id}/); the console shows the bar.
            logging.getLogger().setLevel(logging.WARNING)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
        if not config.is_file():
            raise CommandError(f"{config}: no such file")
        try:
            data = parse_yaml(config.read_text(encoding="utf-8"), source=str(config))
        except (ConfigError, UnicodeDecodeError) as exc:
            raise CommandError(str(exc)) from None
        data = apply_overrides(data, overrides)
        owner = self._owner(user)
        if dry_run:
            from runs.config import validate_config
            from runs.services import dataset_name_types

            try:
                validate_config(data, known_datasets=dataset_name_types(owner))
            except ConfigError as exc:
                raise CommandError(f"{config}: {exc}") from None
            self.stdout.write(self.style.SUCCESS(f"{config}: valid"))
            return
        if check:
            self._check(config, data, owner)
            return
        if enqueue and settings.JOBS_INLINE:
            raise CommandError("--enqueue needs REDIS_URL (workers read their jobs from Redis)")
        try:
            with inline_foreground():
                run = run_create(config=data, owner=owner)
        except ConfigError as exc:
            raise CommandError(f"{config}: {exc}") from None
        self.stdout.write(f"run #{run.pk} {run.name} ({run.kind}) created")
        if enqueue:
            self.stdout.write(self.style.SUCCESS(f"queued: follow it with GET /api/runs/{run.pk}/"))
            if not wait:
                return
            self._follow(run.pk, worker=None)
        else:
            def drive() -> None:
                try:
                    drive_inline(run.pk)
                except Exception:  # Recorded on the run; _report turns it into the exit code.
                    logging.getLogger(__name__).debug("run %s failed", run.pk, exc_info=True)
                finally:
                    connection.close()

            worker = threading.Thread(target=drive, name=f"run-{run.pk}", daemon=True)
            worker.start()
            self._follow(run.pk, worker=worker)
        self._report(PipelineRun.objects.get(pk=run.pk))

    def _check(self, config: Path, data, owner) -> None:
        from runs.data_check import DataCheckUnavailable, check_config, summary_lines

        try:
            report = check_config(data, owner=owner)
        except ConfigError as exc:
            raise CommandError(f"{config}: {exc}") from None
        except DataCheckUnavailable as exc:
            raise CommandError(f"{config}: {exc}") from None
        for line in summary_lines(report):
            self.stdout.write(line)
        if report["problems"]:
            raise CommandError(f"{config}: the data check refuses it: " + "; ".join(f"{p['field']}: {p['message']}" for p in report["problems"]))
        if report.get("run_estimate"):
            from runs.estimates import plan_line

            self.stdout.write(plan_line(report["run_estimate"]))
        self.stdout.write(self.style.SUCCESS(f"{config}: the data check passes"))

    def _owner(self, username: str):
        User = get_user_model()
        owner, created = User.objects.get_or_create(username=username)
        if created:
            owner.set_unusable_password()
            owner.save(update_fields=["password"])
        return owner

    def _follow(self, run_id: int, worker: threading.Thread | None) -> None:
        layout = "{l_bar}{bar}| {n}/{total}% [{elapsed}] {postfix}"
        bar = tqdm(total=100, desc=f"run #{run_id}", unit="%", bar_format=layout, file=sys.stderr)
        trials: dict[int, tqdm] = {}  # a sweep's trials (child runs): a bar each, under the sweep's
        try:
            while True:
                run = PipelineRun.objects.only("status", "progress", "stage").get(pk=run_id)
                bar.update(run.progress - bar.n)
                bar.set_postfix_str(f"{run.status}: {run.stage}"[:80])
                for child in PipelineRun.objects.filter(parent_id=run_id).only("pk", "status", "progress", "stage").order_by("pk"):
                    child_bar = trials.get(child.pk)
                    if child_bar is None:
                        child_bar = trials[child.pk] = tqdm(total=100, desc=f"  trial run #{child.pk}", unit="%", bar_format=layout,
                                                            file=sys.stderr, position=len(trials) + 1, leave=True)
                    child_bar.update(child.progress - child_bar.n)
                    child_bar.set_postfix_str(f"{child.status}: {child.stage}"[:70])
                if run.is_terminal and (worker is None or not worker.is_alive()):
                    break
                if worker is not None and not worker.is_alive() and not run.is_terminal:
                    break
                time.sleep(0.5)
        finally:
            for child_bar in trials.values():
                child_bar.close()
            bar.close()

    def _report_sweep(self, run: PipelineRun) -> None:
        from runs.sweeps import sweep_summary

        summary = sweep_summary(run)
        if not summary:
            return
        self.stdout.write(f"sweep ({summary['method']}, {len(summary['trials'])} of {summary['planned']} trials; objective: selection "
                          f"{summary['metric']}):")
        for trial in summary["trials"]:
            score = trial["score"]
            shown = f"{score['mean']:.4f} [{score['ci_low']:.4f}, {score['ci_high']:.4f}]" if score else "no selection score"
            mark = "  <- winner" if summary["winner"] and trial["child"] == summary["winner"]["winner"] else ""
            params = ", ".join(f"{p.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{p.split('.')[-1]}={v}" for p, v in trial["params"].items())
            self.stdout.write(f"  trial {trial['trial']:>3} run #{trial['child']} {trial['status']:<9} {shown}  {params}{mark}")
        if summary["winner"]:
            self.stdout.write(f"winner: {summary['winner']['reason']}; the table above the winner's is its paired comparison on the eval sets")
        self.stdout.write("")

    def _report_selection(self, run: PipelineRun) -> None:
        from runs.page_data import selection_summary

        summary = selection_summary(run)
        if not summary or not summary["points"]:
            return
        self.stdout.write(f"checkpoint selection ({summary['metric']} on the selection rows, mean [95% interval] over rows):")
        for point in summary["points"]:
            shown = (f"{point['mean']:.4f} [{point['ci_low']:.4f}, {point['ci_high']:.4f}] over {point['n']}" if point["mean"] is not None
                     else f"not measured ({point['state']})")
            mark = "  <- chosen" if point["step"] == summary["chosen_step"] else ""
            self.stdout.write(f"  step {point['step']:>6}: {shown}{mark}")
        if summary["reason"]:
            self.stdout.write(f"the adapter of {summary['reason']}")
        self.stdout.write("")

    def _report(self, run: PipelineRun) -> None:
        from evaluation.significance import format_interval

        table = run_score_table(run)
        comparisons = run_comparisons(run)
        if table:
            variants = [v for v in ordered_variants(v for row in table for v in row["variants"])][::-1]
            compare = "base" in variants and "finetuned" in variants
            header = ["dataset", "metric", *variants] + (["difference [95% CI]", "p (Holm)", "verdict"] if compare else [])
            lines = [header]
            for row in table:
                cells = [row["dataset"], row["metric"]]
                for variant in variants:
                    cell = row["variants"].get(variant)
                    if cell is None:
                        cells.append("-")
                    elif cell["value"] is None:
                        cells.append("not measured")
                    else:
                        cells.append(f"{cell['value']:.4f}" + (f" ({cell['n_failed']} failed)" if cell["n_failed"] else ""))
                if compare:
                    c = comparisons.get((row["dataset"], row["metric"]))
                    if c is None:
                        cells += ["-", "-", "-"]
                    else:
                        note = " (retrieval: same for both models)" if row["metric"] in RETRIEVAL_METRICS else ""
                        detects = describe((c.method or {}).get("power")) if c.verdict == "no significant difference" else ""
                        cells += [format_interval(c.delta, c.ci_low, c.ci_high), format_p_value(c.p_adjusted),
                                  f"{c.verdict}{note}" + (f" ({detects})" if detects and not note else "")]
                lines.append(cells)
            widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
            self.stdout.write("")
            for number, line in enumerate(lines):
                self.stdout.write("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)))
                if number == 0:
                    self.stdout.write("  ".join("-" * width for width in widths))
            if comparisons:
                pairs = max(c.n_pairs for c in comparisons.values())
                self.stdout.write(f"(paired over up to {pairs} samples: bootstrap 95% interval of the mean difference, permutation test, Holm across metrics)")
            self.stdout.write("")
        self._report_selection(run)
        self._report_sweep(run)
        promotion = run_promotion(run)
        if promotion is not None:
            alias = f", alias {promotion.alias}" if promotion.alias else ", no alias"
            self.stdout.write(f"promotion of {promotion.model_name} version {promotion.model_version}{alias}: {promotion.reason}")
        if run.mlflow_run_id:
            self.stdout.write(f"MLflow run id: {run.mlflow_run_id} (experiment {run.mlflow_experiment_id}, tracking {settings.MLFLOW_TRACKING_URI})")
        if run.registered_model_name:
            self.stdout.write(f"registered model: {run.registered_model_name} version {run.registered_model_version}")
        if run.status != RunStatus.COMPLETED:
            raise CommandError(f"run #{run.pk} ended {run.status}: {run.error or run.stage}")
        self.stdout.write(self.style.SUCCESS(f"run #{run.pk} completed"))
