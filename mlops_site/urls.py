from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from .health import healthz

urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("admin/django-rq/", include("django_rq.urls")),
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("api/", include("datasets_app.urls")),
    path("api/", include("runs.urls")),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("datasets_app.page_urls")),
    path("", include("runs.page_urls")),
]

handler404 = "mlops_site.errors.not_found"
handler500 = "mlops_site.errors.server_error"
