"""Export a completed fine-tune's model: merged weights and GGUF, each checked against the adapter before anyone uses it.

Asked for four ways, one job each:

- the run page's *Export* button, `POST /api/runs/{id}/export/` and `manage.py
  export_run` call `export_request`, which adds a job of the fine-tune's
  on-demand step `export` (keyed 1, 2, ...) on the gpu queue. It may follow the
  run's completion; nothing waits for it, and a failed one fails only itself;
- a config's `export: {merged, gguf, margin}` makes `export_at_end` a regular
  step of the run's graph, after `promote`: the run completes once it has.

The job (`export_step`, whichever way it came):

1. merges the adapter into the base (float32) and saves the base's dtype as a
   Transformers folder, then writes the GGUF asked for (training/export.py);
   each file is written under a temporary name and renamed into place;
2. checks each form (evaluation/export_check.py): the eval questions answered
   again, greedy, as the run did, compared with the adapter's stored answers
   (identical share, rows that differ) and scores (TOST with the margin);
3. registers the merged folder, last, once its files are complete and checked:
   MLflow's transformers flavour, registered model `<the run's model>.merged`,
   the version tagged with the check (reused when this job registered it on an
   earlier attempt). The check's figures go to the run's MLflow run, the GGUF as
   an artifact of it (served mode downloads it from there);
4. the export and its checks are stored in the job's finishing transaction
   (`export_record`).

A killed worker leaves `.partial` files that nothing refers to (the next export
of the run sweeps them) and at most a complete registered version the database
does not record: the retried job reuses it, the next export or the run's deletion
deletes it (`forget_unrecorded_exports`). Two exports of one run never run at
once: a second request is refused with 409, naming the running one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.db import transaction

from . import tracking
from .models import UNFINISHED_JOB_STATES, ExportCheck, Job, ModelExport, PipelineRun, RunStatus, SampleResult, Variant
from .services import export_record

if TYPE_CHECKING:
    from evaluation.export_check import FormCheck

    from .step_io import StepContext

log = logging.getLogger(__name__)

ON_DEMAND_STEP = "export"  # a request's job (the button, the API, the command)
AT_END_STEP = "export_at_end"  # the config's export, a regular step of the graph
EXPORT_STEPS = (ON_DEMAND_STEP, AT_END_STEP)
GGUF_CHOICES = ("none", "f16", "q8_0")
MERGED_SUFFIX = ".merged"
EXPORT_JOB_TAG = "platform.export_job"


class ExportRefused(Exception):
    """This run cannot be exported now (HTTP 409), with the reason."""


class ExportBusy(ExportRefused):
    """Another export of the run is queued or running (HTTP 409, naming it)."""

    def __init__(self, message: str, job: Job) -> None:
        super().__init__(message)
        self.job = job


class ExportInvalid(ValueError):
    """The request asks for nothing, or for something unknown (HTTP 400)."""


@dataclass(frozen=True)
class ExportSpec:
    merged: bool = True
    gguf: str = "none"
    margin: float = 0.01

    def as_payload(self) -> dict[str, Any]:
        return {"merged": self.merged, "gguf": self.gguf, "margin": self.margin}


def export_spec(*, merged: Any = True, gguf: Any = "none", margin: Any = None) -> ExportSpec:
    """A checked request: merged weights and/or a GGUF type, and the check's margin (default 0.01)."""
    from evaluation.equivalence import DEFAULT_MARGIN

    if not isinstance(merged, bool):
        raise ExportInvalid(f"merged: must be true or false, got {merged!r}")
    gguf = "none" if gguf is None else gguf
    if gguf not in GGUF_CHOICES:
        raise ExportInvalid(f"gguf: must be one of {', '.join(GGUF_CHOICES)}, got {gguf!r}")
    if not merged and gguf == "none":
        raise ExportInvalid("nothing to export: ask for merged weights, a GGUF (f16 or q8_0), or both")
    margin = DEFAULT_MARGIN if margin is None else margin
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < float(margin) <= 1:
        raise ExportInvalid(f"margin: must be a number above 0 and at most 1, got {margin!r}")
    return ExportSpec(merged=merged, gguf=gguf, margin=float(margin))


# --- asking for an export


def running_export(run: PipelineRun) -> Job | None:
    """The run's export job that is queued or running, if any."""
    return Job.objects.filter(run=run, step__in=EXPORT_STEPS, state__in=UNFINISHED_JOB_STATES).order_by("id").first()


def export_check_allowed(run: PipelineRun) -> None:
    """Raise ExportRefused unless the run is a completed fine-tune with an adapter to merge."""
    from .kinds import kind_of

    if not kind_of(run).graph_of(run).has(ON_DEMAND_STEP):
        what = "a trial of a sweep" if run.parent_id else f"a {run.kind} run"
        raise ExportRefused(f"run {run.pk} is {what}: only a completed fine-tune has a model to export")
    if run.status != RunStatus.COMPLETED:
        raise ExportRefused(f"run {run.pk} is {run.status}: only a completed fine-tune can be exported")
    from .playground import _local_adapter

    if not run.mlflow_run_id and not _local_adapter(run):
        raise ExportRefused(f"run {run.pk} has no adapter to export: none in its folder on this machine and no MLflow run to fetch it from")


def export_request(*, run: PipelineRun, spec: ExportSpec) -> Job:
    """Add an export job of `run` (sent after commit). Raises ExportRefused, or ExportBusy naming the running export."""
    from . import pipeline
    from .kinds import kind_of

    export_check_allowed(run)
    graph = kind_of(run).graph_of(run)
    with transaction.atomic():
        locked = PipelineRun.objects.select_for_update().only("pk", "status").get(pk=run.pk)
        if locked.status != RunStatus.COMPLETED:
            raise ExportRefused(f"run {run.pk} is {locked.status}: only a completed fine-tune can be exported")
        busy = running_export(run)
        if busy is not None:
            raise ExportBusy(
                f"run {run.pk} is already exporting: job {busy.label} (#{busy.pk}) is {busy.state}; one export at a time, "
                "ask again once it has ended", busy,
            )
        number = Job.objects.filter(run=run, step=ON_DEMAND_STEP).count() + 1
        while Job.objects.filter(run=run, step=ON_DEMAND_STEP, key=str(number)).exists():
            number += 1
        pipeline.add_job(run_id=run.pk, graph=graph, step=ON_DEMAND_STEP, key=str(number), payload=spec.as_payload())
        return Job.objects.get(run=run, step=ON_DEMAND_STEP, key=str(number))


# --- the job


@dataclass
class Exported:
    spec: ExportSpec
    folder: Path
    merged: Any = None  # training.export.Merged
    gguf: Any = None  # training.export.GGUFWritten
    gguf_message: str = ""
    archive: tuple[str, int] | None = None  # (sha256, bytes) of the merged folder's tar
    gguf_sha256: str = ""
    checks: list[FormCheck] = field(default_factory=list)
    registered: tuple[str, str, str] | None = None  # (name, version, model uri)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        from evaluation.equivalence import overall_verdict

        return overall_verdict([c.verdict for c in self.checks])


def exports_dir(run_id: int) -> Path:
    from .step_io import run_dir

    return run_dir(run_id) / "exports"


def export_folder(run_id: int, job_id: int) -> Path:
    return exports_dir(run_id) / str(job_id)


def merged_model_name(run: PipelineRun) -> str:
    name = run.registered_model_name or tracking.registered_model_name(base_model=run.base_model, train_datasets=run.config["datasets"]["train"])
    return f"{name}{MERGED_SUFFIX}"[:250]


def _spec_of(ctx: StepContext) -> ExportSpec:
    wanted = ctx.payload or ctx.config.get("export") or {}
    return export_spec(merged=wanted.get("merged", True), gguf=wanted.get("gguf", "none"), margin=wanted.get("margin"))


def generation_settings(run: PipelineRun) -> dict[str, Any]:
    """The run's generate step's settings (prompt format, budget, greedy max_new_tokens, batch size, device rule)."""
    config = run.config
    evaluation, training = config["evaluation"], config.get("training") or {}
    return {"prompt_format": config["model"].get("prompt_format", "auto"), "max_new_tokens": evaluation["max_new_tokens"],
            "max_seq_length": training.get("max_seq_length", 512), "batch_size": evaluation["batch_size"],
            "precision": training.get("precision", "auto")}


def reference_sets(ctx: StepContext):
    """The adapter's stored answers and scores (variant finetuned) per eval dataset, with the rows they answered."""
    from evaluation.export_check import ReferenceSet

    sets = []
    for eval_set in ctx.eval_sets():
        stored = list(SampleResult.objects.filter(run=ctx.run, dataset__name=eval_set.name, variant=Variant.FINETUNED).order_by("index"))
        if not stored:
            continue
        rows = [{**eval_set.rows[s.index], "question": s.question, "contexts": s.contexts, "ground_truth": s.ground_truth} for s in stored]
        sets.append(ReferenceSet(dataset=eval_set.name, indices=[s.index for s in stored], rows=rows, answers=[s.answer for s in stored],
                                 scores=[dict(s.scores) for s in stored]))
    if not sets:
        raise RuntimeError(f"run {ctx.run_id} has no stored fine-tuned answers to check an export against")
    return sets


def export_step(ctx: StepContext) -> Exported:
    """Merge, write, check, register: the export job's body (gpu queue)."""
    import shutil

    from evaluation.export_check import check_form
    from evaluation.steps import judge_api_key
    from training.export import GGUFNotSupported, archive_digest, gguf_file_name, merge_adapter, sha256_file, sweep_partials, write_gguf
    from training.local_models import resolve_model_path

    run, spec = ctx.run, _spec_of(ctx)
    folder = export_folder(run.pk, ctx.job_id)
    swept = sweep_partials(exports_dir(run.pk))
    if swept:
        ctx.log(f"export: removed {len(swept)} half-written file(s) an earlier export left")
    forget_unrecorded_exports(run, keep_job=ctx.job_id)
    settings = generation_settings(run)
    stage = _Stages(ctx)
    base_path = resolve_model_path(run.base_model, progress=ctx.build_progress())
    adapter = ctx.adapter_dir()
    exported = Exported(spec=spec, folder=folder)
    merged = merge_adapter(base_path, adapter, folder / "merged", generation=settings, progress=stage.part(0.0, 0.15),
                           info={"run": run.pk, "run_name": run.name, "base_model": run.base_model, "export_job": ctx.job.label})
    exported.merged = merged
    exported.figures.update({"merge_seconds": round(merged.seconds, 3), "merged_bytes": merged.bytes, "merged_dtype": merged.dtype})
    ctx.log(f"export: merged the adapter into {run.base_model} ({merged.dtype}, {merged.bytes / 1e6:.1f} MB) in {merged.seconds:.1f}s")
    ctx.check_cancelled()
    if spec.gguf != "none":
        try:
            written = write_gguf(folder / "merged", folder / gguf_file_name(spec.gguf), quantization=spec.gguf, name=run.name,
                                 progress=stage.part(0.15, 0.3))
        except GGUFNotSupported as exc:
            exported.gguf_message = str(exc)
            ctx.log(f"export: {exc}; the merged weights are exported all the same")
        else:
            exported.gguf = written
            exported.gguf_sha256 = sha256_file(written.path)
            exported.figures.update({"gguf_seconds": round(written.seconds, 3), "gguf_bytes": written.bytes, "gguf_tensor_types": written.tensor_types})
            ctx.log(f"export: GGUF {spec.gguf} written ({written.bytes / 1e6:.1f} MB) in {written.seconds:.1f}s")
    if not spec.merged and exported.gguf is None:
        raise RuntimeError(exported.gguf_message or "nothing was exported")
    ctx.check_cancelled()

    references = reference_sets(ctx)
    evaluation = run.config["evaluation"]
    judge = evaluation.get("judge")
    common = {"references": references, "settings": settings, "metrics": list(evaluation["metrics"]), "margin": spec.margin,
              "judge": judge, "judge_api_key": judge_api_key(judge) if judge else "", "check_cancelled": ctx.check_cancelled}
    if spec.merged:
        exported.checks.append(check_form(folder=folder / "merged", gguf_file=None, form="merged", label=f"merged ({merged.dtype})",
                                          progress=stage.part(0.3, 0.6), **common))
    if exported.gguf is not None:
        exported.checks.append(check_form(folder=folder, gguf_file=exported.gguf.path.name, form="gguf", label=f"GGUF {spec.gguf}",
                                          progress=stage.part(0.6, 0.9), **common))
    for check in exported.checks:
        exported.figures[f"check_{check.form}_seconds"] = round(check.seconds, 3)
        ctx.log(f"export check, {check.label}: {check.identical}/{check.rows} answers identical to the adapter's; {check.verdict} "
                f"(margin {spec.margin:g})")

    if spec.merged:
        stage.part(0.9, 1.0)(0.0, "hashing the merged folder's archive")
        exported.archive = archive_digest(folder / "merged")
        stage.part(0.9, 1.0)(0.3, "registering the merged model (MLflow transformers flavour)")
        exported.registered = register_merged(ctx, exported)
        ctx.log(f"export: registered {exported.registered[0]} version {exported.registered[1]} (transformers flavour)")
    else:
        shutil.rmtree(folder / "merged", ignore_errors=True)  # written only to make the GGUF from
    return exported


class _Stages:
    """Progress of one part of the job mapped onto the job's bar."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx

    def part(self, low: float, high: float):
        def report(fraction: float, stage: str) -> None:
            self.ctx.progress(low + (high - low) * max(0.0, min(1.0, fraction)), f"export: {stage}")

        return report


def _check_tags(exported: Exported) -> dict[str, str]:
    tags = {"export.verdict": exported.verdict, "export.margin": f"{exported.spec.margin:g}", "export.gguf": exported.spec.gguf}
    for check in exported.checks:
        tags[f"export.check.{check.form}"] = f"{check.label}: {check.identical}/{check.rows} identical answers, {check.verdict}"
    return tags


def register_merged(ctx: StepContext, exported: Exported) -> tuple[str, str, str]:
    """The merged folder logged (transformers flavour) and registered as `<model>.merged`, tagged with its check;
    the version this job registered on an earlier attempt is reused."""
    from django.conf import settings

    from training.export import log_transformers_model
    from training.pyfunc_model import register

    run = ctx.run
    name = merged_model_name(run)
    tags = {EXPORT_JOB_TAG: str(ctx.job_id), "platform.source": "rag-finetune-platform", "platform.run_id": str(run.pk), **_check_tags(exported)}
    for version in merged_versions(run, name):
        if version.tags.get(EXPORT_JOB_TAG) == str(ctx.job_id):
            tracking.set_version_tags(name, str(version.version), tags)
            ctx.log(f"registry: version {version.version} of {name} was registered by this job already; reusing it")
            return name, str(version.version), version.source
    first = next((s.rows[0] for s in ctx.eval_sets() if s.rows), None)
    prompt = _example_prompt(exported.folder / "merged", first, generation_settings(run)) if first else "Question: ?"
    model_uri = log_transformers_model(tracking_uri=settings.MLFLOW_TRACKING_URI, run_id=run.mlflow_run_id,
                                       folder=exported.folder / "merged", example_prompt=prompt,
                                       max_new_tokens=generation_settings(run)["max_new_tokens"])
    version = register(tracking_uri=settings.MLFLOW_TRACKING_URI, name=name, model_uri=model_uri, run_id=run.mlflow_run_id, tags=tags)
    tracking.client().update_model_version(name, version, description=f"{run.name} (run #{run.pk}), {ctx.job.label}: merged weights")
    return name, version, model_uri


def _example_prompt(folder: Path, row: dict[str, Any], settings: dict[str, Any]) -> str:
    from training.data import render_prompt
    from training.finetune import load_tokenizer
    from training.pyfunc_model import prompt_token_budget

    tokenizer = load_tokenizer(str(folder))
    budget = prompt_token_budget(max_seq_length=settings["max_seq_length"], max_new_tokens=settings["max_new_tokens"], max_position_embeddings=None)
    return render_prompt(tokenizer, question=row["question"], contexts=row["contexts"], prompt_format=settings["prompt_format"],
                         max_prompt_tokens=budget)


def merged_versions(run: PipelineRun, name: str | None = None) -> list[Any]:
    """The versions of the run's `.merged` registered model made from its MLflow run."""
    if not run.mlflow_run_id:
        return []
    name = name or merged_model_name(run)
    return list(tracking.client().search_model_versions(f"name='{name}' and run_id='{run.mlflow_run_id}'"))


def forget_unrecorded_exports(run: PipelineRun, *, keep_job: int | None = None) -> list[str]:
    """Delete `.merged` versions of this run that no stored export records (a job lost or failed after registering),
    except the one `keep_job` registered (its retry reuses it)."""
    name = merged_model_name(run)
    recorded = set(ModelExport.objects.filter(run=run, registered_model_name=name).values_list("registered_model_version", flat=True))
    gone = []
    for version in merged_versions(run, name):
        if str(version.version) in recorded or (keep_job is not None and version.tags.get(EXPORT_JOB_TAG) == str(keep_job)):
            continue
        tracking.delete_version(name, str(version.version))
        gone.append(str(version.version))
        log.info("run %s: deleted %s version %s, which no stored export records", run.pk, name, version.version)
    return gone


def publish_export(ctx: StepContext, exported: Exported) -> None:
    """The check's figures and a JSON of it to the run's MLflow run; with a tracking server, the files too (downloads)."""
    import json

    from .step_io import _mlflow_served

    label = ctx.job.label.replace(":", "-")
    metrics: dict[str, float] = {}
    for check in exported.checks:
        prefix = f"{label}/{check.form}"
        metrics[f"{prefix}/identical_share"] = check.identical / check.rows if check.rows else 0.0
        for dataset in check.datasets:
            for metric, eq in dataset.equivalence.items():
                for field_name in ("delta", "ci_low", "ci_high", "p_value"):
                    value = getattr(eq, field_name)
                    if value is not None:
                        metrics[f"{prefix}/{dataset.dataset}/{metric}/{field_name}"] = value
    for key, value in exported.figures.items():
        if isinstance(value, (int, float)):
            metrics[f"{label}/{key}"] = value
    tracking.log_metrics(ctx.run.mlflow_run_id, metrics)
    tracking.log_text(ctx.run.mlflow_run_id, json.dumps(check_document(exported), indent=2), f"{label}/check.json")
    if _mlflow_served():  # the web process downloads from there: the worker's disk is not its own
        if exported.gguf is not None:
            tracking.log_artifact(ctx.run.mlflow_run_id, exported.gguf.path, label)
        if exported.spec.merged:
            tracking.log_artifacts(ctx.run.mlflow_run_id, exported.folder / "merged", f"{label}/merged")


def check_document(exported: Exported) -> dict[str, Any]:
    return {
        "verdict": exported.verdict, "margin": exported.spec.margin, "gguf_message": exported.gguf_message,
        "checks": [{"form": c.form, "label": c.label, "rows": c.rows, "identical": c.identical, "verdict": c.verdict,
                    "comparisons": _comparisons(c)} for c in exported.checks],
    }


def _comparisons(check: FormCheck) -> list[dict[str, Any]]:
    return [{"dataset": d.dataset, "metric": metric, **eq.as_dict()} for d in check.datasets for metric, eq in d.equivalence.items()]


def store_export(ctx: StepContext, exported: Exported) -> None:
    """The export and its checks, stored with the job."""
    name, version, uri = exported.registered or ("", "", "")
    fields = {
        "merged": exported.spec.merged, "gguf": "" if exported.spec.gguf == "none" else exported.spec.gguf, "margin": exported.spec.margin,
        "folder": str(exported.folder), "merged_dtype": exported.merged.dtype if exported.merged else "",
        "merged_bytes": exported.merged.bytes if exported.merged and exported.spec.merged else None,
        "archive_sha256": exported.archive[0] if exported.archive else "", "archive_bytes": exported.archive[1] if exported.archive else None,
        "gguf_file": exported.gguf.path.name if exported.gguf else "", "gguf_sha256": exported.gguf_sha256,
        "gguf_bytes": exported.gguf.bytes if exported.gguf else None, "gguf_message": exported.gguf_message,
        "registered_model_name": name, "registered_model_version": version, "mlflow_model_uri": uri,
        "verdict": exported.verdict, "figures": exported.figures,
    }
    checks = [
        {"form": c.form, "label": c.label, "rows": c.rows, "identical": c.identical, "verdict": c.verdict, "comparisons": _comparisons(c),
         "answers": [{"dataset": d.dataset, "index": index, "answer": answer, "scores": scores}
                     for d in c.datasets for index, answer, scores in zip(d.indices, d.answers, d.scores, strict=True)],
         "seconds": round(c.seconds, 3), "device": c.device}
        for c in exported.checks
    ]
    export = export_record(run_id=ctx.run_id, job_id=ctx.job_id, label=ctx.job.label, fields=fields, checks=checks)
    ctx.output = {"export": export.pk, "verdict": exported.verdict, **({"model": name, "version": version} if name else {}),
                  **({"gguf": fields["gguf_file"]} if exported.gguf else {}), **({"gguf_message": exported.gguf_message} if exported.gguf_message else {})}


def export_figures(exported: Exported) -> dict[str, Any]:
    figures = {k: v for k, v in exported.figures.items() if isinstance(v, (int, float, str))}
    for check in exported.checks:
        figures[f"{check.form}_identical"] = f"{check.identical}/{check.rows}"
    return figures


# --- reading exports (pages, API, downloads)


def run_exports(run: PipelineRun) -> list[ModelExport]:
    return list(ModelExport.objects.filter(run=run).prefetch_related("checks").select_related("job").order_by("created_at", "id"))


def differing_rows(check: ExportCheck) -> list[dict[str, Any]]:
    """The rows whose answer from this form differs from the adapter's: question, both answers, both scores."""
    stored = {(s.dataset.name if s.dataset else "", s.index): s for s in
              SampleResult.objects.filter(run_id=check.export.run_id, variant=Variant.FINETUNED).select_related("dataset")}
    rows = []
    for item in check.answers:
        adapter = stored.get((item["dataset"], item["index"]))
        if adapter is None or adapter.answer == item["answer"]:
            continue
        rows.append({"dataset": item["dataset"], "index": item["index"], "question": adapter.question, "ground_truth": adapter.ground_truth,
                     "adapter": adapter.answer, "exported": item["answer"], "adapter_scores": adapter.scores, "export_scores": item["scores"]})
    return rows


class DownloadUnavailable(Exception):
    """The file is neither on this machine nor in MLflow (HTTP 404 with the reason)."""


def download_path(export: ModelExport, what: str) -> Path:
    """The merged folder or the GGUF file on this machine; fetched from MLflow where another worker wrote it."""
    folder = Path(export.folder)
    if what == "gguf":
        if not export.gguf_file:
            raise DownloadUnavailable(f"{export.label} has no GGUF" + (f": {export.gguf_message}" if export.gguf_message else ""))
        local = folder / export.gguf_file
        if local.is_file():
            return local
        try:
            return tracking.download_artifacts(export.run.mlflow_run_id, f"{export.label.replace(':', '-')}/{export.gguf_file}", folder / ".download")
        except Exception as exc:
            raise DownloadUnavailable(f"{export.label}'s GGUF is not on this machine and MLflow cannot give it: {exc}") from None
    if not export.merged or not export.archive_sha256:
        raise DownloadUnavailable(f"{export.label} has no merged weights (only a GGUF was asked for)")
    local = folder / "merged"
    if (local / "config.json").is_file():
        return local
    try:
        return tracking.download_artifacts(export.run.mlflow_run_id, f"{export.label.replace(':', '-')}/merged", folder / ".download")
    except Exception as exc:
        raise DownloadUnavailable(f"{export.label}'s merged folder is not on this machine and MLflow cannot give it: {exc}") from None
