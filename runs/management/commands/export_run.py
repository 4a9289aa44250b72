"""Export a completed fine-tune from the command line: merged weights and/or a GGUF, checked against the adapter.

Why a command: an export of a big model is a long job that people start from a
terminal on the machine that holds the model, and want to watch. It is the same
job as the run page's Export button (runs/export.py: `export_request`): in the
embedded default it runs in this process, with a progress bar; with REDIS_URL a
gpu worker runs it and the command follows it (or, with --no-wait, returns).
It ends with the check's table and the files with their sha256, and exits
non-zero when the export failed or was refused.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from runs.export import GGUF_CHOICES, ExportRefused, export_request, export_spec
from runs.models import Job, JobState, ModelExport, PipelineRun


class Command(BaseCommand):
    help = "Export a completed fine-tune: merged weights and/or a GGUF, each checked against the adapter's answers."

    def add_arguments(self, parser) -> None:
        parser.add_argument("run_id", type=int)
        parser.add_argument("--gguf", choices=GGUF_CHOICES, default="none", help="Also write a GGUF of the merged weights (Llama family).")
        parser.add_argument("--no-merged", action="store_true", help="Only the GGUF: the merged folder is not kept nor registered.")
        parser.add_argument("--margin", type=float, default=None, help="The check's equivalence margin (default 0.01).")
        parser.add_argument("--no-wait", action="store_true", help="With REDIS_URL: queue the job and return.")
        parser.add_argument("--dry-run", action="store_true", help="Say whether the run can be exported; change nothing.")

    def handle(self, *args, run_id: int, gguf: str, no_merged: bool, margin: float | None, no_wait: bool, dry_run: bool, **options) -> None:
        if options["verbosity"] < 2:
            logging.getLogger().setLevel(logging.WARNING)
            warnings.filterwarnings("ignore")
        run = PipelineRun.objects.filter(pk=run_id).first()
        if run is None:
            raise CommandError(f"no run {run_id}")
        try:
            spec = export_spec(merged=not no_merged, gguf=gguf, margin=margin)
            if dry_run:
                from runs.export import export_check_allowed, running_export

                export_check_allowed(run)
                busy = running_export(run)
                if busy is not None:
                    raise ExportRefused(f"run {run_id} is already exporting: job {busy.label} is {busy.state}")
                self.stdout.write(self.style.SUCCESS(f"run #{run_id} can be exported ({spec.as_payload()})"))
                return
            job = export_request(run=run, spec=spec)
        except (ValueError, ExportRefused) as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"run #{run_id}: export job {job.label} (#{job.pk}) queued")
        if no_wait and not settings.JOBS_INLINE:
            return
        job = self._follow(job.pk)
        if job.state != JobState.DONE:
            raise CommandError(f"export {job.label} ended {job.state}: {job.error or 'no reason recorded'}")
        self._report(ModelExport.objects.prefetch_related("checks").get(job_id=job.pk))

    def _follow(self, job_id: int) -> Job:
        bar = tqdm(total=100, desc=f"export job #{job_id}", unit="%", bar_format="{l_bar}{bar}| {n}/{total}% [{elapsed}] {postfix}", file=sys.stderr)
        try:
            while True:
                job = Job.objects.get(pk=job_id)
                bar.update(int(100 * job.progress) - bar.n)
                bar.set_postfix_str(f"{job.state}: {job.stage}"[:90])
                if job.state in (JobState.DONE, JobState.FAILED, JobState.CANCELLED):
                    return job
                time.sleep(0.5)
        finally:
            bar.close()

    def _report(self, export: ModelExport) -> None:
        self.stdout.write(f"{export.label}: {export.verdict} (margin {export.margin:g})")
        for check in export.checks.all():
            self.stdout.write(f"  {check.label}: {check.identical}/{check.rows} answers identical to the adapter's; {check.verdict}")
            for c in check.comparisons:
                interval = f" [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]" if c["ci_low"] is not None else ""
                delta = f"{c['delta']:+.4f}" if c["delta"] is not None else "n/a"
                self.stdout.write(f"    {c['dataset']} {c['metric']}: {delta}{interval} {c['verdict']}")
        if export.gguf_message:
            self.stdout.write(self.style.WARNING(export.gguf_message))
        if export.archive_sha256:
            self.stdout.write(f"  merged folder: {export.folder}/merged ({export.merged_bytes} bytes); tar sha256 {export.archive_sha256}")
        if export.gguf_file:
            self.stdout.write(f"  GGUF: {export.folder}/{export.gguf_file} ({export.gguf_bytes} bytes) sha256 {export.gguf_sha256}")
        if export.registered_model_name:
            self.stdout.write(self.style.SUCCESS(f"  registered {export.registered_model_name} version {export.registered_model_version}"))
