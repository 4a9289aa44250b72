from __future__ import annotations

from django.db.models import Q, QuerySet

from .models import Dataset


def dataset_visible_to(user) -> QuerySet[Dataset]:
    """Bundled datasets (no owner) and the user's own; staff see all."""
    qs = Dataset.objects.all()
    if user.is_staff:
        return qs
    return qs.filter(Q(owner__isnull=True) | Q(owner=user))
