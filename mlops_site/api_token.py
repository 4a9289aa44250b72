"""The page where a user creates, replaces and revokes their API token (DRF authtoken).

The key is shown once, right after it is made, the way hosted services show a
new token; afterwards the page says a token exists and when it was made. One
token per user (DRF's authtoken model); a new one replaces the old at once.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from rest_framework.authtoken.models import Token


def token_create(*, user) -> Token:
    """A new token for the user; the old one (if any) stops working in the same transaction."""
    with transaction.atomic():
        Token.objects.filter(user=user).delete()
        return Token.objects.create(user=user)


def token_revoke(*, user) -> bool:
    """The user's token stops working; False when there was none."""
    deleted, _ = Token.objects.filter(user=user).delete()
    return bool(deleted)


@never_cache
@login_required
def api_token(request: HttpRequest) -> HttpResponse:
    new_key = ""
    if request.method == "POST":
        action = request.POST.get("action", "")
        if action == "create":
            new_key = token_create(user=request.user).key
            messages.success(request, "New API token created. Copy it now: it is not shown again.")
        elif action == "revoke":
            revoked = token_revoke(user=request.user)
            messages.success(request, "API token revoked: requests with it now answer 401." if revoked else "You had no API token.")
            return redirect("api-token")
        else:
            messages.error(request, "action: choose create or revoke")
            return redirect("api-token")
    token = Token.objects.filter(user=request.user).first()
    return render(request, "account/api_token.html", {
        "token": token, "new_key": new_key, "api_root": request.build_absolute_uri("/api/"),
    })
