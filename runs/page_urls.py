from django.urls import path

from . import export_views, views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("runs/new/", views.run_new, name="run-new"),
    path("runs/<int:pk>/", views.run_detail, name="run-detail"),
    path("runs/<int:pk>/row/", views.run_row, name="run-row"),
    path("runs/<int:pk>/status/", views.run_status, name="run-status"),
    path("runs/<int:pk>/cancel/", views.run_cancel_view, name="run-cancel"),
    path("runs/<int:pk>/retry/", views.run_retry_view, name="run-retry"),
    path("runs/<int:pk>/delete/", views.run_delete_view, name="run-delete"),
    path("runs/<int:pk>/promotion/", views.run_promotion_view, name="run-promotion"),
    path("runs/<int:pk>/results/", views.run_results, name="run-results"),
    path("runs/<int:pk>/playground/", views.run_playground, name="run-playground"),
    path("runs/<int:pk>/playground/<str:job_id>/", views.run_playground_job, name="run-playground-job"),
    path("runs/<int:pk>/samples.csv", views.run_samples_csv, name="run-samples-csv"),
    path("runs/<int:pk>/export/", export_views.run_export_view, name="run-export"),
    path("runs/<int:pk>/exports/", export_views.run_exports_fragment, name="run-exports"),
    path("runs/<int:pk>/exports/<int:export_id>/<str:form>/differences/", export_views.run_export_differences, name="run-export-differences"),
    path("runs/<int:pk>/exports/<int:export_id>/download/<str:what>/", export_views.run_export_download, name="run-export-download"),
    path("compare/", views.compare, name="compare"),
    path("registry/", views.registry, name="registry"),
]
