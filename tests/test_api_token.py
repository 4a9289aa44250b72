"""The API token page: create, replace and revoke your token; it is linked from the nav."""

import re

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db


def api_status(key: str) -> int:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client.get("/api/runs/").status_code


def test_a_user_creates_replaces_and_revokes_their_token(client, user):
    client.force_login(user)
    assert 'href="/accounts/token/"' in client.get("/").content.decode()
    page = client.get("/accounts/token/").content.decode()
    assert "You have no API token" in page and 'value="create"' in page

    created = client.post("/accounts/token/", {"action": "create"}).content.decode()
    key = re.search(r'id="api-token-key">(\w+)<', created).group(1)
    assert Token.objects.get(user=user).key == key and api_status(key) == 200
    again = client.get("/accounts/token/").content.decode()
    assert key not in again and "You have a token" in again  # the key is shown once

    replaced = client.post("/accounts/token/", {"action": "create"}).content.decode()
    new_key = re.search(r'id="api-token-key">(\w+)<', replaced).group(1)
    assert new_key != key and api_status(key) == 401 and api_status(new_key) == 200

    revoked = client.post("/accounts/token/", {"action": "revoke"}, follow=True).content.decode()
    assert "revoked" in revoked and "You have no API token" in revoked
    assert api_status(new_key) == 401 and not Token.objects.filter(user=user).exists()


def test_the_token_page_is_for_logged_in_users_and_checks_csrf(client, user):
    assert client.get("/accounts/token/").status_code == 302
    from django.test import Client

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user)
    assert strict.post("/accounts/token/", {"action": "create"}).status_code == 403
    assert not Token.objects.filter(user=user).exists()


def test_an_unknown_action_names_the_field(client, user):
    client.force_login(user)
    page = client.post("/accounts/token/", {"action": "steal"}, follow=True).content.decode()
    assert "action: choose create or revoke" in page
