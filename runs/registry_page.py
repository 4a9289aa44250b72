"""Reads for the registry page and the promotion confirmation, from the database alone.

Registered versions are the runs' `registered_model_name`/`registered_model_version`;
decisions are PromotionDecision rows (the gate's and staff's). Nothing here asks
MLflow, so the pages are quick and still answer when the tracking server is slow
or down; MLflow stays the registry of record (runs/promotion.py writes both).

Who holds `champion` is replayed from the decisions: each records the alias its
version held right after it (runs/promotion.py reads it back from MLflow then),
so the latest decision that left a version champion names it, unless a later
demotion of that version took the alias away.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .models import PipelineRun, PromotionDecision
from .selectors import run_visible_to

CHAMPION = "champion"


@dataclass(frozen=True)
class Decision:
    decision: str  # promoted | rejected | demoted
    reason: str
    automatic: bool
    by: str  # "gate", or the staff user's name
    at: datetime


@dataclass
class RegistryVersion:
    model_name: str
    version: str
    run_id: int
    run_name: str
    run_status: str
    owner: str
    registered_at: datetime | None
    champion: bool = False
    latest: Decision | None = None  # the latest decision about this version, the gate's or staff's
    gate: Decision | None = None  # the gate's own decision, kept apart when staff decided after it


@dataclass
class RegistryModel:
    name: str
    versions: list[RegistryVersion] = field(default_factory=list)
    champion: str | None = None  # the version holding the alias, whoever's run it is
    champion_run_id: int | None = None
    champion_visible: bool = False  # its run is one the user may open


def _decision(row: dict[str, Any]) -> Decision:
    return Decision(decision=row["decision"], reason=row["reason"], automatic=row["automatic"],
                    by="gate" if row["automatic"] else (row["by__username"] or "a deleted user"), at=row["at"])


def _decision_rows(model_names: set[str]) -> list[dict[str, Any]]:
    return list(PromotionDecision.objects.filter(model_name__in=model_names).order_by("at", "id").values(
        "run_id", "model_name", "model_version", "decision", "alias", "reason", "automatic", "by__username", "at",
    ))


def champions(rows: list[dict[str, Any]]) -> dict[str, tuple[str, int]]:
    """{model name: (version, run id)} of the versions holding `champion` after these decisions (oldest first)."""
    holder: dict[str, tuple[str, int] | None] = {}
    for row in rows:
        name, version = row["model_name"], row["model_version"]
        if row["alias"] == CHAMPION:
            holder[name] = (version, row["run_id"])
        elif row["decision"] == PromotionDecision.Decision.DEMOTED and (holder.get(name) or ("",))[0] == version:
            holder[name] = None
    return {name: held for name, held in holder.items() if held is not None}


def _version_key(version: RegistryVersion) -> tuple[int, str]:
    return (int(version.version) if version.version.isdigit() else -1, version.version)


def registry_models(user) -> list[RegistryModel]:
    """Every registered model and version the user may see (staff: all; others: their own runs'), newest version first,
    with who holds `champion` (possibly another user's version) and each version's latest decision. Two queries."""
    runs = list(run_visible_to(user).exclude(registered_model_name="").select_related("owner").only(
        "id", "name", "status", "registered_model_name", "registered_model_version", "finished_at", "owner__username",
    ))
    rows = _decision_rows({run.registered_model_name for run in runs})
    held = champions(rows)
    latest: dict[tuple[str, str], Decision] = {}
    gate: dict[tuple[str, str], Decision] = {}
    for row in rows:
        key = (row["model_name"], row["model_version"])
        latest[key] = _decision(row)
        if row["automatic"]:
            gate[key] = latest[key]
    models: dict[str, RegistryModel] = {}
    for run in runs:
        name, version = run.registered_model_name, run.registered_model_version
        model = models.setdefault(name, RegistryModel(name=name, champion=(held.get(name) or (None, None))[0],
                                                      champion_run_id=(held.get(name) or (None, None))[1]))
        key = (name, version)
        decided = latest.get(key)
        model.versions.append(RegistryVersion(
            model_name=name, version=version, run_id=run.pk, run_name=run.name, run_status=run.status, owner=run.owner.get_username(),
            registered_at=run.finished_at, champion=model.champion == version, latest=decided,
            gate=gate.get(key) if decided is not None and not decided.automatic else None,
        ))
    visible = {run.pk for run in runs}
    for model in models.values():
        model.versions.sort(key=_version_key, reverse=True)
        model.champion_visible = model.champion_run_id in visible
    return sorted(models.values(), key=lambda m: m.name)


@dataclass(frozen=True)
class PromotionReview:
    """What staff read before moving the alias by hand."""

    gate: Decision | None  # the gate's decision about this run's version
    latest: Decision | None  # the latest decision of any kind
    champion: str | None  # the version holding `champion` now
    champion_run_id: int | None

    @property
    def gate_rejected(self) -> bool:
        return self.gate is not None and self.gate.decision == PromotionDecision.Decision.REJECTED


def promotion_review(run: PipelineRun) -> PromotionReview:
    """The gate's decision and reason for the run's version, the latest decision, and the current champion. One query."""
    rows = _decision_rows({run.registered_model_name}) if run.registered_model_name else []
    mine = [r for r in rows if r["model_version"] == run.registered_model_version]
    gate = [r for r in mine if r["automatic"]]
    held = champions(rows).get(run.registered_model_name)
    return PromotionReview(
        gate=_decision(gate[-1]) if gate else None, latest=_decision(mine[-1]) if mine else None,
        champion=held[0] if held else None, champion_run_id=held[1] if held else None,
    )
