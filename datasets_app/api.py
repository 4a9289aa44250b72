from __future__ import annotations

from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics, serializers, status
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

from .models import Dataset
from .selectors import dataset_visible_to
from .services import dataset_import
from .validation import read_rows

PREVIEW_ROWS = 5


class DatasetOutputSerializer(serializers.ModelSerializer):
    type = serializers.CharField(source="kind")

    class Meta:
        model = Dataset
        fields = ["id", "name", "type", "row_count", "sha256", "size_bytes", "description", "created_at"]


class DatasetDetailSerializer(DatasetOutputSerializer):
    preview = serializers.SerializerMethodField()

    class Meta(DatasetOutputSerializer.Meta):
        fields = [*DatasetOutputSerializer.Meta.fields, "preview"]

    def get_preview(self, dataset: Dataset) -> list[dict]:
        return read_rows(dataset.file.path, limit=PREVIEW_ROWS)


class DatasetUploadSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    type = serializers.ChoiceField(choices=Dataset.Kind.choices)
    file = serializers.FileField(allow_empty_file=True)
    description = serializers.CharField(required=False, allow_blank=True, max_length=5000, default="")


class DatasetListCreateApi(generics.ListAPIView):
    serializer_class = DatasetOutputSerializer
    parser_classes = [MultiPartParser, FormParser]

    def get_queryset(self):
        qs = dataset_visible_to(self.request.user)
        kind = self.request.query_params.get("type")
        if kind:
            qs = qs.filter(kind=kind)
        return qs.order_by("kind", "name")

    @extend_schema(parameters=[OpenApiParameter("type", OpenApiTypes.STR, enum=["train", "eval"])])
    def get(self, request: Request, *args, **kwargs) -> Response:
        kind = request.query_params.get("type")
        if kind and kind not in Dataset.Kind.values:
            return Response({"detail": "type: must be train or eval", "errors": [{"field": "type", "message": "must be train or eval"}]}, status=400)
        return super().get(request, *args, **kwargs)

    @extend_schema(request=DatasetUploadSerializer, responses={201: DatasetOutputSerializer})
    def post(self, request: Request) -> Response:
        upload = DatasetUploadSerializer(data=request.data)
        upload.is_valid(raise_exception=True)
        data = upload.validated_data
        dataset = dataset_import(
            name=data["name"],
            kind=data["type"],
            fileobj=data["file"],
            description=data["description"],
            owner=request.user,
            max_bytes=settings.DATASET_MAX_BYTES,
        )
        return Response(DatasetOutputSerializer(dataset).data, status=status.HTTP_201_CREATED)


class DatasetDetailApi(generics.RetrieveAPIView):
    serializer_class = DatasetDetailSerializer

    def get_queryset(self):
        return dataset_visible_to(self.request.user)
