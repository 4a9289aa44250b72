"""GET /api/: where a new API user starts. The main collections as links, every
endpoint with its methods (read from the URL configuration, so a new one cannot
be left out), and where the docs, the schema and the token page are."""

from __future__ import annotations

import functools
import re

from django.urls import URLPattern, URLResolver, get_resolver, reverse
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

API_PREFIX = "api/"
HTTP_METHODS = ("get", "post", "put", "patch", "delete")
# <int:pk> in a route is {id} in the OpenAPI schema and the docs: say it the same way here.
_CONVERTER = re.compile(r"<(?:\w+:)?(\w+)>")


def _placeholder(match: re.Match) -> str:
    return "{id}" if match.group(1) == "pk" else "{" + match.group(1) + "}"


def _walk(patterns, prefix: str = ""):
    for pattern in patterns:
        route = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            yield from _walk(pattern.url_patterns, route)
        elif isinstance(pattern, URLPattern):
            yield route, pattern


@functools.cache
def api_endpoints() -> tuple[dict, ...]:
    """Every API operation under /api/ but this root: {"path", "methods", "name"}, in URL order."""
    endpoints = []
    for route, pattern in _walk(get_resolver().url_patterns):
        view_class = getattr(pattern.callback, "view_class", None) or getattr(pattern.callback, "cls", None)
        if not route.startswith(API_PREFIX) or route == API_PREFIX or view_class is None:
            continue
        methods = [m.upper() for m in HTTP_METHODS if hasattr(view_class, m)]
        endpoints.append({"path": "/" + _CONVERTER.sub(_placeholder, route), "methods": methods, "name": pattern.name or ""})
    return tuple(endpoints)


class EndpointSerializer(serializers.Serializer):
    path = serializers.CharField()
    methods = serializers.ListField(child=serializers.CharField())
    name = serializers.CharField()


class ApiRootSerializer(serializers.Serializer):
    datasets = serializers.URLField()
    runs = serializers.URLField()
    docs = serializers.URLField(help_text="Interactive documentation (Swagger UI).")
    schema = serializers.URLField(help_text="The OpenAPI 3 schema.")
    token = serializers.URLField(help_text="The page where you create or revoke your API token.")
    authentication = serializers.CharField()
    endpoints = EndpointSerializer(many=True)


class ApiRootApi(APIView):
    @extend_schema(responses=ApiRootSerializer, description="The API's entry point: its collections, every endpoint, the docs and the token page.")
    def get(self, request: Request) -> Response:
        def url(name: str) -> str:
            return request.build_absolute_uri(reverse(name))

        return Response({
            "datasets": url("api-datasets"), "runs": url("api-runs"), "docs": url("api-docs"), "schema": url("api-schema"),
            "token": url("api-token"),
            "authentication": "Authorization: Token <key> (create it on the token page), or a logged-in session with its CSRF token for writes",
            "endpoints": list(api_endpoints()),
        })
