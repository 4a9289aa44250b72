"""Pages for runs: dashboard, new run, run page (live), results, compare.

Function views that parse input, call a service or selector, and render.
Polled fragments answer 286 (htmx: stop polling) once a run is terminal.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from . import page_data, playground
from .config import ConfigError
from .export_views import exports_box
from .exports import samples_csv
from .forms import RunForm, YamlConfigForm, default_initial, initial_from_config
from .kinds import KINDS
from .models import PipelineRun, RunStatus
from .reaper import reap_if_embedded
from .registry_page import promotion_review, registry_models
from .selectors import (
    dashboard_runs,
    mlflow_links,
    run_for_page,
    run_promotion,
    run_visible_to,
)
from .services import InvalidTransition, RunNotDeletable, run_cancel, run_create, run_retry

STOP_POLLING = 286


def _poll_response(request: HttpRequest, template: str, context: dict, run: PipelineRun) -> HttpResponse:
    response = render(request, template, context)
    if run.is_terminal:
        response.status_code = STOP_POLLING
    return response


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    reap_if_embedded()
    status, kind = request.GET.get("status", ""), request.GET.get("kind", "")
    search, sort = request.GET.get("q", "").strip()[:200], request.GET.get("sort", "-created")
    runs = page_data.dashboard_order(dashboard_runs(request.user, status=status, kind=kind), search=search, sort=sort)
    query = request.GET.copy()
    query.pop("page", None)
    page = Paginator(runs, 25).get_page(request.GET.get("page"))
    return render(request, "runs/dashboard.html", {
        "page": page, "rows": page_data.dashboard_rows(list(page.object_list)), "status": status, "kind": kind, "statuses": RunStatus.values,
        "kinds": list(KINDS), "q": search, "sort": sort, "sorts": page_data.DASHBOARD_SORTS, "query": query.urlencode(),
        "default_plan": page_data.default_run_plan() if not page.paginator.count and not (search or status or kind) else None,
    })


@login_required
def run_row(request: HttpRequest, pk: int) -> HttpResponse:
    run = get_object_or_404(dashboard_runs(request.user), pk=pk)
    return _poll_response(request, "runs/_run_row.html", {"row": page_data.dashboard_rows([run])[0]}, run)


@login_required
def run_new(request: HttpRequest) -> HttpResponse:
    yaml_form = YamlConfigForm()
    validated, data_check = False, None
    if request.method == "POST" and request.POST.get("action") == "load_yaml":
        yaml_form = YamlConfigForm(request.POST, request.FILES, user=request.user)
        # The run form's fields come with the YAML: a YAML that is refused leaves the form as the user had it.
        form = RunForm.as_posted(request.POST, user=request.user)
        if yaml_form.is_valid():
            config = yaml_form.cleaned_data["config"]
            form = RunForm(initial_from_config(config), user=request.user)
            form.is_valid()  # show what the schema says about the loaded config, field by field
            messages.info(request, "YAML loaded into the form: review it, then launch.")
    elif request.method == "POST":
        form = RunForm(request.POST, user=request.user)
        if form.is_valid():
            if request.POST.get("action") == "validate":
                validated = True
            elif request.POST.get("action") == "check":
                data_check = _data_check(form)
            else:
                try:
                    run = run_create(config=form.config, owner=request.user)
                except ConfigError as exc:  # e.g. a dataset deleted since validation
                    form.add_config_errors(exc)
                else:
                    # Gone from the run page once the run starts (static/js/app.js); a reload does not show it again.
                    messages.success(request, f"Run #{run.pk} created and queued.", extra_tags="until-run-starts")
                    return redirect("run-detail", pk=run.pk)
    else:
        initial = default_initial()
        clone = request.GET.get("clone")
        if clone and clone.isdigit():
            source = get_object_or_404(run_visible_to(request.user), pk=int(clone))
            initial = initial_from_config(source.config)
            initial["name"] = f"{source.name}-copy"[:200]
        form = RunForm(initial=initial, user=request.user)
    context = {"form": form, "yaml_form": yaml_form, "validated": validated, "data_check": data_check}
    template = "runs/_run_form.html" if request.htmx else "runs/run_new.html"
    return render(request, template, context)


def _data_check(form: RunForm) -> dict:
    """The form's config through the data check (runs/data_check.py): {"report"} or {"error"}."""
    from .data_check import DataCheckFailed, DataCheckUnavailable, check_config

    try:
        return {"report": check_config(form.config, owner=form.user)}
    except ConfigError as exc:
        form.add_config_errors(exc)
        return {"error": "The config has errors (highlighted): fix them to check the data."}
    except DataCheckFailed as exc:
        form.add_config_errors(ConfigError([{"field": exc.field, "message": exc.message}]))
        return {"error": f"The data could not be checked: {exc.field} could not be read (the message is next to the field)."}
    except DataCheckUnavailable as exc:
        return {"error": str(exc)}


@login_required
def run_detail(request: HttpRequest, pk: int) -> HttpResponse:
    reap_if_embedded()
    run = run_for_page(request.user, pk)
    return render(request, "runs/run_detail.html", {
        "run": run, "links": mlflow_links(run), "promotion": run_promotion(run), "playground": _playground_box(run, request.GET),
        "sections_key": page_data.run_sections_key(run),
        "exports": exports_box(run),
    })


def _playground_box(run: PipelineRun, query, *, question: str = "", contexts: str = "") -> dict | None:
    """The playground's form for a completed fine-tune (None for any other run), prefilled from ?sample=<id>."""
    if not run.shows.get("playground") or run.status != RunStatus.COMPLETED:
        return None
    try:
        playground.playground_check(run)
    except playground.PlaygroundUnavailable as exc:
        return {"unavailable": str(exc)}
    rows = playground.prefill_rows(run)
    chosen = next((r for r in rows if str(r.pk) == query.get("sample", "")), None)
    if chosen is not None:
        question, contexts = chosen.question, "\n\n".join(chosen.contexts)
    return {"rows": rows, "chosen": chosen, "question": question, "contexts": contexts, "inline": playground.jobs_inline(),
            "settings": playground.generation_settings(run), "limits": playground.LIMITS, "sampling": {},
            "max_new_tokens_limit": playground.max_new_tokens_limit(run), "max_temperature": playground.MAX_TEMPERATURE}


@login_required
def run_playground(request: HttpRequest, pk: int) -> HttpResponse:
    """GET: the playground prefilled from an eval row; POST: ask it (answers now, or a job the page polls)."""
    run = get_object_or_404(run_visible_to(request.user), pk=pk)
    try:
        playground.playground_check(run)
    except playground.PlaygroundUnavailable as exc:
        return HttpResponse(str(exc), status=409)
    answer: dict = {}
    if request.method == "POST":
        form = playground.PlaygroundForm(request.POST, run=run)
        box = _playground_box(run, {}, question=request.POST.get("question", "")[:20000], contexts=request.POST.get("contexts", "")[:200000])
        box["sampling"] = {name: request.POST.get(name, "")[:50] for name in ("temperature", "top_p", "max_new_tokens")}
        answer = _ask(run, form) if form.is_valid() else {"errors": [f"{field}: {e}" for field, errors in form.errors.items() for e in errors]}
        if request.htmx:
            return render(request, "runs/_playground_answer.html", {"run": run, "answer": answer})
    else:
        box = _playground_box(run, request.GET)
        if request.htmx:
            return render(request, "runs/_playground.html", {"run": run, "playground": box})
    return render(request, "runs/playground.html", {"run": run, "playground": box, "answer": answer})


def _ask(run: PipelineRun, form) -> dict:
    from redis.exceptions import RedisError

    question, contexts, sampling = form.cleaned_data["question"], form.cleaned_data["contexts"], form.sampling
    try:
        if playground.jobs_inline():
            return {"status": "finished", "answers": playground.playground_answer(run=run, question=question, contexts=contexts, sampling=sampling)}
        job_id = playground.playground_enqueue(run=run, question=question, contexts=contexts, sampling=sampling)
    except playground.PlaygroundUnavailable as exc:
        return {"errors": [str(exc)]}
    except RedisError:
        return {"errors": [playground.no_worker_message(None)]}
    return {"status": "queued", "job_id": job_id, "message": playground.no_worker_message(playground.live_gpu_workers())}


@login_required
def run_playground_job(request: HttpRequest, pk: int, job_id: str) -> HttpResponse:
    """The polled answer of a served-mode question; 286 (stop polling) once it is there or failed."""
    from redis.exceptions import RedisError

    run = get_object_or_404(run_visible_to(request.user), pk=pk)
    try:
        state = playground.playground_job_state(run=run, job_id=job_id)
    except playground.JobNotFound:
        raise Http404("no such playground question (or its answer has expired)") from None
    except RedisError:
        state = playground.JobState(status="failed", error=playground.no_worker_message(None))
    answer = {"status": state.status, "answers": state.answers, "job_id": job_id, "errors": [state.error] if state.error else []}
    if state.status in ("queued", "started"):
        answer["message"] = playground.no_worker_message(playground.live_gpu_workers())
    response = render(request, "runs/_playground_answer.html" if request.htmx else "runs/playground.html", {
        "run": run, "answer": answer, "playground": None if request.htmx else _playground_box(run, {}),
    })
    if state.status in ("finished", "failed") and request.htmx:
        response.status_code = STOP_POLLING
    return response


@login_required
def run_status(request: HttpRequest, pk: int) -> HttpResponse:
    run = run_for_page(request.user, pk, related=("events", "jobs"))
    context = {"run": run, "links": mlflow_links(run)}
    key = page_data.run_sections_key(run)
    if request.GET.get("sections", key) != key:  # the page's late sections are behind: they come along, out of band
        context.update(oob_sections=True, sections_key=key, promotion=run_promotion(run), playground=_playground_box(run, {}))
    return _poll_response(request, "runs/_run_status.html", context, run)


@login_required
@require_POST
def run_cancel_view(request: HttpRequest, pk: int) -> HttpResponse:
    run = get_object_or_404(run_visible_to(request.user), pk=pk)
    try:
        run_cancel(run_id=run.pk, message=f"cancelled by {request.user.get_username()} (web)")
        messages.success(request, f"Run #{run.pk} cancelled.")
    except InvalidTransition as exc:
        messages.error(request, str(exc))
    return redirect("run-detail", pk=run.pk)


@login_required
@require_POST
def run_retry_view(request: HttpRequest, pk: int) -> HttpResponse:
    run = get_object_or_404(run_visible_to(request.user), pk=pk)
    try:
        retried = run_retry(run_id=run.pk, owner=request.user)
    except (InvalidTransition, ConfigError) as exc:
        messages.error(request, str(exc))
        return redirect("run-detail", pk=run.pk)
    messages.success(request, f"Run #{retried.pk} retries run #{run.pk}.")
    return redirect("run-detail", pk=retried.pk)


@login_required
@require_POST
def run_delete_view(request: HttpRequest, pk: int) -> HttpResponse:
    """The run page's Delete (after the browser's confirmation): the same service as DELETE /api/runs/{id}/."""
    from .deletion import run_delete

    run = get_object_or_404(run_visible_to(request.user), pk=pk)
    try:
        run_delete(run_id=run.pk, by=request.user)
    except RunNotDeletable as exc:
        messages.error(request, str(exc))
        return redirect("run-detail", pk=run.pk)
    messages.success(request, f"Run #{pk} {run.name} deleted, with its files, checkpoints and MLflow run.")
    return redirect("dashboard")


@login_required
def run_promotion_view(request: HttpRequest, pk: int) -> HttpResponse:
    """Staff move the `champion` alias by hand (the same services as POST /api/runs/{id}/promote/ and /demote/),
    after a confirmation page with the gate's decision and reason: GET (or a POST without confirm=yes) shows it."""
    from .promotion import PromotionRefused, demote_by_hand, promote_by_hand

    run = get_object_or_404(run_visible_to(request.user), pk=pk)
    if not request.user.is_staff:
        raise PermissionDenied("only staff can promote or demote a model version")
    data = request.POST if request.method == "POST" else request.GET
    name, reason, error = data.get("action", ""), data.get("reason", "")[:2000], ""
    action = {"promote": promote_by_hand, "demote": demote_by_hand}.get(name)
    if action is None:
        messages.error(request, "choose promote or demote")
        return redirect("run-detail", pk=run.pk)
    if request.method == "POST" and data.get("confirm") == "yes":
        try:
            decision = action(run=run, user=request.user, reason=reason)
        except PromotionRefused as exc:
            error = str(exc)
        else:
            messages.success(request, decision.reason)
            return redirect("run-detail", pk=run.pk)
    return render(request, "runs/promotion_confirm.html", {
        "run": run, "action": name, "reason": reason, "error": error, "review": promotion_review(run),
    })


@login_required
def registry(request: HttpRequest) -> HttpResponse:
    """Every registered model version the user may see, who holds `champion`, and why (read from the database)."""
    return render(request, "runs/registry.html", {"models": registry_models(request.user)})


@login_required
def run_results(request: HttpRequest, pk: int) -> HttpResponse:
    run = run_for_page(request.user, pk, related=())
    tables = page_data.score_tables(run)
    sort, metric, variant = request.GET.get("sort", ""), request.GET.get("metric", ""), ""
    legacy = page_data.LEGACY_SORT_RE.match(sort)  # ?sort=metric:variant&order=asc|desc, as linked before
    if legacy:
        metric, variant = legacy["metric"], legacy["variant"]
        sort = "score_desc" if request.GET.get("order") == "desc" else "score_asc"
    show = request.GET.get("show", "")
    samples = page_data.sample_rows(run, dataset=request.GET.get("dataset", ""), metric=metric, sort=sort, show=show, variant=variant,
                                    details=False)
    try:
        worst = max(0, int(request.GET.get("worst") or 0))
    except ValueError:
        worst = 0
    rows = samples["rows"][:worst] if worst else samples["rows"]
    page = Paginator(rows, 10).get_page(request.GET.get("page"))
    page.object_list = page_data.sample_details(run, page.object_list, samples)  # only the ten rows shown are read whole
    query = request.GET.copy()
    query.pop("page", None)
    return render(request, "runs/run_results.html", {
        "run": run, "tables": tables, "chart": page_data.results_chart(tables), "samples": samples,
        "page": page, "sort": sort, "show": show, "query": query.urlencode(),
    })


@login_required
def run_samples_csv(request: HttpRequest, pk: int) -> HttpResponse:
    run = get_object_or_404(run_visible_to(request.user), pk=pk)
    response = HttpResponse(samples_csv(run), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="run-{run.pk}-samples.csv"'
    return response


@login_required
def compare(request: HttpRequest) -> HttpResponse:
    ids = [int(part) for part in request.GET.get("runs", "").replace(" ", "").split(",") if part.isdigit()]
    ids += [int(v) for v in request.GET.getlist("run") if v.isdigit()]
    if not ids:
        messages.info(request, "Pick two or more runs on the dashboard, then Compare.")
        return redirect("dashboard")
    ids = list(dict.fromkeys(ids))[:12]  # in the order the user ticked them (the dashboard keeps it in `runs`)
    runs = sorted(page_data.compare_queryset(run_visible_to(request.user)).filter(pk__in=ids), key=lambda run: ids.index(run.pk))
    if not runs:
        raise Http404("no such runs")
    ref, error = request.GET.get("ref", "").strip(), ""
    if ref and not any(str(run.pk) == ref for run in runs):
        error = f"ref: {ref[:20]!r} is not one of the compared runs ({', '.join(f'#{run.pk}' for run in runs)}); the first ticked run is the reference."
    reference = next((run for run in runs if str(run.pk) == ref), runs[0])
    context = {**page_data.compare_data([reference, *(run for run in runs if run is not reference)]), "order": ",".join(str(run.pk) for run in runs),
               "ref_error": error}
    return render(request, "runs/compare.html", context, status=400 if error else 200)
