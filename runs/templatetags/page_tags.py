"""Template helpers of the run pages: durations, rates, and the page data of runs/page_data.py."""

from __future__ import annotations

from django import template

from runs import page_data

register = template.Library()


@register.filter
def duration(seconds) -> str:
    """12 s, 3 min 05 s, 1 h 02 min; an em dash for nothing."""
    if seconds is None or seconds == "":
        return "—"
    seconds = int(round(float(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours:02d} h"


@register.filter
def rate(value, digits: int = 2) -> str:
    if value is None:
        return "—"
    value = float(value)
    return f"{value:,.0f}" if value >= 100 else f"{value:.{int(digits)}f}"


@register.filter
def variant_label(variant: str) -> str:
    return page_data.VARIANT_LABELS.get(variant, variant)


@register.filter
def get(mapping, key):
    return mapping.get(key) if hasattr(mapping, "get") else None


@register.simple_tag
def live_stats(run):
    return page_data.run_live_stats(run)


@register.simple_tag
def job_rows(run):
    return page_data.run_job_rows(run)


@register.simple_tag
def sweep(run):
    from runs.sweeps import sweep_summary

    return sweep_summary(run)


@register.simple_tag
def selection(run):
    return page_data.selection_summary(run)


@register.simple_tag
def timeline(run):
    return page_data.run_timeline(run)


@register.simple_tag
def mlflow_links(run):
    return page_data.mlflow_ui_links(run)


@register.simple_tag
def train_dataset_rows(user) -> dict[str, int]:
    """{name: rows} of the train datasets a user may pick: the New run page counts optimizer steps with it."""
    from datasets_app.selectors import dataset_visible_to

    return dict(dataset_visible_to(user).filter(kind="train").values_list("name", "row_count"))
