"""JSON errors for the API: a human-readable `detail`, and `errors` naming fields."""

from __future__ import annotations

from typing import Any

from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from datasets_app.services import DatasetImportError

from .config import ConfigError
from .services import InvalidTransition


def _flatten(detail: Any, prefix: str = "") -> list[dict[str, str]]:
    if isinstance(detail, dict):
        out = []
        for key, value in detail.items():
            name = key if key != "non_field_errors" else ""
            out += _flatten(value, f"{prefix}.{name}" if prefix and name else (name or prefix))
        return out
    if isinstance(detail, list):
        out = []
        for value in detail:
            out += _flatten(value, prefix)
        return out
    return [{"field": prefix, "message": str(detail)}]


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, ConfigError):
        return Response({"detail": f"invalid config: {exc}", "errors": exc.errors}, status=400)
    if isinstance(exc, DatasetImportError):
        errors = [{"field": exc.field, "message": p} for p in exc.problems] or [{"field": exc.field, "message": exc.message}]
        return Response({"detail": f"{exc.field}: {exc.message}", "errors": errors}, status=400)
    if isinstance(exc, InvalidTransition):
        return Response({"detail": str(exc), "from": exc.from_status, "to": exc.to_status}, status=409)
    response = drf_exception_handler(exc, context)
    if response is not None and isinstance(response.data, (dict, list)) and "detail" not in response.data:
        errors = _flatten(response.data)
        response.data = {
            "detail": "; ".join(f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in errors),
            "errors": errors,
        }
    return response
