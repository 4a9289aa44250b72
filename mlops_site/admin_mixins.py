"""Admin building blocks shared by the apps' admin modules."""

from __future__ import annotations

from django.http import HttpRequest


class ServiceAddFormMixin:
    """'Add' goes through `add_form`, a form whose clean() calls the app's service;
    existing objects are shown read-only (state changes go through admin actions)."""

    add_form: type

    def get_form(self, request: HttpRequest, obj=None, change: bool = False, **kwargs):
        if obj is None:
            # A subclass per request: the requesting user never leaks between threads.
            return type(self.add_form.__name__, (self.add_form,), {"request_user": request.user})
        return super().get_form(request, obj, change, **kwargs)

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        return [] if obj is None else self.readonly_fields


class ReadOnlyAdminMixin:
    """Rows written only by the pipeline: listed and searchable, never added or edited by hand."""

    def has_add_permission(self, request: HttpRequest, *args) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False
