from django.urls import path

from . import views

urlpatterns = [
    path("datasets/", views.dataset_list, name="dataset-list"),
    path("datasets/<int:pk>/", views.dataset_detail, name="dataset-detail"),
    path("datasets/<int:pk>/download/", views.dataset_download, name="dataset-download"),
    path("datasets/<int:pk>/delete/", views.dataset_delete_view, name="dataset-delete"),
]
