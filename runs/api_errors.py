"""JSON errors for the API: a human-readable `detail`, and `errors` naming fields."""

from __future__ import annotations

import io
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from datasets_app.services import DatasetImportError
from mlops_site.limits import StructureLimitError, check_structure

from .config import ConfigError
from .services import InvalidTransition, RunNotDeletable


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


class BoundedJSONParser(JSONParser):
    """DRF's JSON parser behind the structure bound (mlops_site/limits.py): the raw
    body's size (DATA_UPLOAD_MAX_MEMORY_SIZE, Django's own bound on non-file bodies)
    and nesting depth are checked before json.load recurses into it."""

    def parse(self, stream, media_type=None, parser_context=None) -> Any:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        raw = stream.read() if limit is None else stream.read(limit + 1)
        try:
            check_structure(raw, syntax="json", max_bytes=limit, source="request body")
        except StructureLimitError as exc:
            raise ParseError(str(exc)) from None
        return super().parse(io.BytesIO(raw), media_type, parser_context)


# Django's own bounds on a request, met while DRF reads the body: the setting
# that sets each limit, so the 400 names it.
REQUEST_LIMITS = {
    RequestDataTooBig: lambda: f"request body: larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes (the limit, DATA_UPLOAD_MAX_MEMORY_SIZE)",
    TooManyFieldsSent: lambda: f"request body: more than {settings.DATA_UPLOAD_MAX_NUMBER_FIELDS} fields (the limit, DATA_UPLOAD_MAX_NUMBER_FIELDS)",
    TooManyFilesSent: lambda: f"request body: more than {settings.DATA_UPLOAD_MAX_NUMBER_FILES} files (the limit, DATA_UPLOAD_MAX_NUMBER_FILES)",
}


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    for kind, message in REQUEST_LIMITS.items():
        if isinstance(exc, kind):
            return Response({"detail": message()}, status=400)
    if isinstance(exc, ConfigError):
        return Response({"detail": f"invalid config: {exc}", "errors": exc.errors}, status=400)
    if isinstance(exc, DatasetImportError):
        errors = [{"field": exc.field, "message": p} for p in exc.problems] or [{"field": exc.field, "message": exc.message}]
        return Response({"detail": f"{exc.field}: {exc.message}", "errors": errors}, status=400)
    if isinstance(exc, InvalidTransition):
        return Response({"detail": str(exc), "from": exc.from_status, "to": exc.to_status}, status=409)
    if isinstance(exc, RunNotDeletable):
        return Response({"detail": str(exc)}, status=409)
    response = drf_exception_handler(exc, context)
    if response is not None and isinstance(response.data, (dict, list)) and "detail" not in response.data:
        errors = _flatten(response.data)
        response.data = {
            "detail": "; ".join(f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in errors),
            "errors": errors,
        }
    return response


ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "detail": {"type": "string", "description": "What is wrong, for a person."},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                "required": ["field", "message"],
            },
        },
    },
    "required": ["detail"],
}
ERROR_DESCRIPTIONS = {
    "400": "Invalid input: `detail` says what, `errors` names each field (and line, for files).",
    "401": "Not authenticated: no credentials, or a token that is not valid (`WWW-Authenticate: Token`).",
    "403": "Not allowed (e.g. staff only), or a session write without its CSRF token.",
    "404": "No such object (or it belongs to another user), or a page past the end of a list.",
    "409": "The run's status does not allow this (a transition, a deletion): `detail` says why.",
}
TRANSITION_PATHS = ("/status/", "/cancel/", "/retry/")


def document_error_responses(result: dict, generator, request, public) -> dict:
    """drf-spectacular postprocessing hook: the error answers every operation can give."""
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    reference = {"$ref": "#/components/schemas/Error"}
    for path, operations in result.get("paths", {}).items():
        for method, operation in operations.items():
            if method not in {"get", "post", "put", "patch", "delete"}:
                continue
            responses = operation.setdefault("responses", {})
            codes = ["400", "401", "403"]
            paginated = any(p.get("name") == "page" for p in operation.get("parameters", []))
            if "{id}" in path or paginated:  # a missing object, or a page past the end
                codes.append("404")
            if path.endswith(TRANSITION_PATHS) or (method == "delete" and path.startswith("/api/runs/")):
                codes.append("409")
            for code in codes:
                responses.setdefault(code, {"description": ERROR_DESCRIPTIONS[code], "content": {"application/json": {"schema": reference}}})
    return result
