"""The staff "Queues" page: RQ's dashboard in served mode, a plain statement in the embedded default.

Without REDIS_URL (the embedded default) no queue or worker exists: each run's
steps execute in a thread of the process that started it (`make serve`, or
`manage.py run_pipeline`). RQ's dashboard would show three empty queues with no
worker, as if work were stuck; this page says what really happens instead.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django_rq import stats_views
from django_rq.views import each_context

from runs.models import TERMINAL_STATUSES, Job, JobState, PipelineRun, RunStatus


@never_cache
@staff_member_required
def queues_home(request: HttpRequest) -> HttpResponse:
    if not settings.JOBS_INLINE:
        return stats_views.stats(request)
    return render(request, "admin/queues_in_process.html", {
        **each_context(request), "title": "Queues",
        "active": Job.objects.filter(state__in=[JobState.RUNNING, JobState.QUEUED]).exclude(run__status__in=TERMINAL_STATUSES)
        .select_related("run").order_by("id")[:50],
        "waiting": PipelineRun.objects.filter(status=RunStatus.PENDING).count(),
    })
