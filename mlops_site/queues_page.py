"""The staff "Queues" page: RQ's dashboard in served mode, a plain statement in the embedded default.

Without REDIS_URL (the embedded default) no queue or worker exists: each run's
steps execute in a thread of the process that started it (`make serve`, or
`manage.py run_pipeline`). RQ's dashboard would show three empty queues with no
worker, as if work were stuck; this page says what really happens instead.

The admin index links to RQ's dashboard too (django-rq registers a "Django-RQ"
entry at /admin/django_rq/dashboard/): `use_queues_page_in_admin` points that
entry at this page, so both ways in say the same thing.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path
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


def use_queues_page_in_admin(site: admin.AdminSite) -> None:
    """Re-register django-rq's admin entry so that its index link opens `queues_home` (called from runs/admin.py)."""
    from django_rq.admin import QueueAdmin
    from django_rq.models import Dashboard

    class QueuesAdmin(QueueAdmin):
        def get_urls(self):
            # django-rq routes the entry's own address to RQ's stats view ahead of the changelist.
            return [path("", self.admin_site.admin_view(queues_home))] + super().get_urls()

        def changelist_view(self, request: HttpRequest, extra_context=None) -> HttpResponse:
            return queues_home(request)

    if site.is_registered(Dashboard):
        site.unregister(Dashboard)
        site.register(Dashboard, QueuesAdmin)
