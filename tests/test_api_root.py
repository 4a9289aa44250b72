"""GET /api/: the API's entry point lists its collections and every endpoint."""

import pytest
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db


def test_the_api_root_lists_every_endpoint_with_its_methods(api):
    response = api.get("/api/")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["runs"] == "http://testserver/api/runs/" and body["datasets"] == "http://testserver/api/datasets/"
    assert body["docs"].endswith("/api/docs/") and body["schema"].endswith("/api/schema/") and body["token"].endswith("/accounts/token/")
    endpoints = {e["path"]: e["methods"] for e in body["endpoints"]}
    assert endpoints["/api/runs/"] == ["GET", "POST"]
    assert endpoints["/api/runs/{id}/status/"] == ["PATCH"]
    assert endpoints["/api/runs/{id}/generate/{job_id}/"] == ["GET"]
    assert endpoints["/api/datasets/{id}/"] == ["GET"]
    assert "/api/" not in endpoints
    # Every operation of the OpenAPI schema is listed, with the same methods.
    schema = api.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    documented = {path: sorted(m.upper() for m in ops if m in {"get", "post", "put", "patch", "delete"}) for path, ops in schema["paths"].items()}
    documented.pop("/api/")
    listed = {path: sorted(methods) for path, methods in endpoints.items()}
    assert listed.pop("/api/schema/") == ["GET"] and listed.pop("/api/docs/") == ["GET"]  # the schema does not document itself
    assert listed == documented


def test_the_api_root_needs_authentication():
    response = APIClient().get("/api/")
    assert response.status_code == 401 and response["WWW-Authenticate"] == "Token"
