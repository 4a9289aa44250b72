from django import template

register = template.Library()


@register.filter
def score(value) -> str:
    return "—" if value is None else f"{value:.4f}"


@register.filter
def signed(value) -> str:
    return "" if value is None else f"{value:+.4f}"


@register.filter
def delta_class(value) -> str:
    if value is None or value == 0:
        return ""
    return "delta-pos" if value > 0 else "delta-neg"


@register.filter
def get(mapping, key):
    return mapping.get(key) if hasattr(mapping, "get") else None


@register.filter
def reasons_text(reasons: dict) -> str:
    return ", ".join(f"{reason} ×{count}" for reason, count in (reasons or {}).items())
