"""Login throttling: after repeated failures an account is locked for a while.

One mechanism for every password login (the login page, the admin): an
authentication backend that counts failures per username and per client
address in the cache and refuses to even check the password while locked.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.backends import ModelBackend
from django.core.cache import cache


def _client_address(request) -> str:
    if request is None:
        return "-"
    return request.META.get("REMOTE_ADDR", "-")


def _keys(username: str, request) -> list[str]:
    return [f"login-failures:user:{username.lower()[:150]}", f"login-failures:addr:{_client_address(request)}"]


def login_locked(username: str, request) -> bool:
    return any((cache.get(key) or 0) >= settings.LOGIN_FAILURE_LIMIT for key in _keys(username, request))


class ThrottledModelBackend(ModelBackend):
    def authenticate(self, request, username=None, password=None, **kwargs):
        if username is None:
            username = kwargs.get("username", "")
        username = username or ""
        if login_locked(username, request):
            if request is not None:
                request.login_locked = True
            return None
        user = super().authenticate(request, username=username, password=password, **kwargs)
        keys = _keys(username, request)
        if user is None:
            for key in keys:
                cache.add(key, 0, settings.LOGIN_LOCKOUT_SECONDS)
                try:
                    cache.incr(key)
                except ValueError:  # expired between add and incr
                    cache.set(key, 1, settings.LOGIN_LOCKOUT_SECONDS)
        else:
            cache.delete(keys[0])
        return user
