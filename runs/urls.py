from django.urls import path

from . import api, export_views

urlpatterns = [
    path("runs/", api.RunListCreateApi.as_view(), name="api-runs"),
    path("runs/check/", api.RunCheckApi.as_view(), name="api-runs-check"),
    path("runs/<int:pk>/", api.RunDetailApi.as_view(), name="api-run-detail"),
    path("runs/<int:pk>/status/", api.RunStatusApi.as_view(), name="api-run-status"),
    path("runs/<int:pk>/logs/", api.RunLogsApi.as_view(), name="api-run-logs"),
    path("runs/<int:pk>/results/", api.RunResultsApi.as_view(), name="api-run-results"),
    path("runs/<int:pk>/cancel/", api.RunCancelApi.as_view(), name="api-run-cancel"),
    path("runs/<int:pk>/retry/", api.RunRetryApi.as_view(), name="api-run-retry"),
    path("runs/<int:pk>/samples/", api.RunSamplesApi.as_view(), name="api-run-samples"),
    path("runs/<int:pk>/export.csv", api.RunExportCsvApi.as_view(), name="api-run-export"),
    path("runs/<int:pk>/promote/", api.RunPromoteApi.as_view(), name="api-run-promote"),
    path("runs/<int:pk>/demote/", api.RunDemoteApi.as_view(), name="api-run-demote"),
    path("runs/<int:pk>/generate/", api.RunGenerateApi.as_view(), name="api-run-generate"),
    path("runs/<int:pk>/generate/<str:job_id>/", api.RunGenerateJobApi.as_view(), name="api-run-generate-job"),
    path("runs/<int:pk>/export/", export_views.RunModelExportApi.as_view(), name="api-run-model-export"),
    path("runs/<int:pk>/exports/<int:export_id>/<str:what>/", export_views.RunModelExportDownloadApi.as_view(), name="api-run-export-download"),
]
