from django.contrib import admin
from django.http import HttpRequest, HttpResponseRedirect
from django.templatetags.static import static
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from .api_root import ApiRootApi
from .api_token import api_token
from .health import healthz
from .queues_page import queues_home


def favicon(request: HttpRequest) -> HttpResponseRedirect:
    """/favicon.ico, which browsers ask for on pages that name no icon (admin, API docs)."""
    return HttpResponseRedirect(static("favicon.ico"))


urlpatterns = [
    path("favicon.ico", favicon, name="favicon"),
    path("healthz", healthz, name="healthz"),
    path("admin/django-rq/", queues_home, name="queues"),  # before RQ's own dashboard, which it shows in served mode
    path("admin/django-rq/", include("django_rq.urls")),
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema", template_name="api_docs.html"), name="api-docs"),
    path("api/", ApiRootApi.as_view(), name="api-root"),
    path("api/", include("datasets_app.urls")),
    path("api/", include("runs.urls")),
    path("accounts/token/", api_token, name="api-token"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("datasets_app.page_urls")),
    path("", include("runs.page_urls")),
]

handler404 = "mlops_site.errors.not_found"
handler500 = "mlops_site.errors.server_error"
