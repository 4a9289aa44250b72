from django import template

register = template.Library()


@register.filter
def score(value) -> str:
    return "—" if value is None else f"{value:.4f}"


@register.filter
def signed(value) -> str:
    """+0.0242, -0.0130; a difference that rounds to nothing is 0.0000 (never "-0.0000")."""
    if value is None:
        return ""
    return "0.0000" if abs(value) < 0.00005 else f"{value:+.4f}"


@register.filter
def delta_class(value) -> str:
    """Nothing: a bare difference of means is not coloured, whatever its sign (the paired test's verdict beside it is,
    `verdict_class`). Kept so a template that still asks for it stays honest."""
    return ""


@register.filter
def verdict_class(verdict) -> str:
    """The colour of a paired comparison's verdict (Holm-adjusted): better green, worse red. Nothing else is coloured:
    not a bare difference of means, not "no significant difference", not "too few pairs"."""
    return {"better": "delta-pos", "worse": "delta-neg"}.get(str(verdict or ""), "")


@register.filter
def get(mapping, key):
    return mapping.get(key) if hasattr(mapping, "get") else None


@register.filter
def reasons_text(reasons: dict) -> str:
    return ", ".join(f"{reason} ×{count}" for reason, count in (reasons or {}).items())
