from django.urls import path

from . import api

urlpatterns = [
    path("datasets/", api.DatasetListCreateApi.as_view(), name="api-datasets"),
    path("datasets/<int:pk>/", api.DatasetDetailApi.as_view(), name="api-dataset-detail"),
]
