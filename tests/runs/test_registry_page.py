"""The registry page: every registered version, who holds `champion` and why, read from the database alone."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from runs.models import PipelineRun, PromotionDecision
from runs.registry_page import registry_models
from runs.services import run_record_promotion

from .factories import make_run

pytestmark = pytest.mark.django_db

T0 = timezone.now() - timedelta(days=1)


def version_of(owner, model: str, version: str) -> PipelineRun:
    run = make_run(owner, status="completed", finished_at=T0)
    PipelineRun.objects.filter(pk=run.pk).update(registered_model_name=model, registered_model_version=version)
    run.refresh_from_db()
    return run


def decide(run: PipelineRun, decision: str, *, alias: str = "", reason: str = "", by=None, minutes: int = 0) -> None:
    """A recorded decision, `minutes` after T0 (the order the champion is replayed in)."""
    row = run_record_promotion(run_id=run.pk, model_name=run.registered_model_name, model_version=run.registered_model_version,
                               decision=decision, alias=alias, reason=reason or f"{decision} v{run.registered_model_version}",
                               automatic=by is None, by=by)
    PromotionDecision.objects.filter(pk=row.pk).update(at=T0 + timedelta(minutes=minutes))


@pytest.fixture
def history(user, other_user, staff_user):
    """rag-lora: v1 promoted by the gate; v2 rejected; v3 rejected, then promoted by staff; v4 (another user's) promoted last.
    legal-lora: one version of the other user's, champion."""
    v1, v2, v3 = version_of(user, "rag-lora", "1"), version_of(user, "rag-lora", "2"), version_of(user, "rag-lora", "3")
    v4, legal = version_of(other_user, "rag-lora", "4"), version_of(other_user, "legal-lora", "1")
    decide(v1, "promoted", alias="champion", minutes=1)
    decide(v2, "rejected", reason="rejected: rouge_score +0.010 [-0.020, +0.040] is not significant", minutes=2)
    decide(v3, "rejected", reason="rejected: rouge_score -0.030 is worse than the champion", minutes=3)
    decide(v3, "promoted", alias="champion", reason="promoted by root-admin: read 50 answers", by=staff_user, minutes=4)
    decide(v4, "promoted", alias="champion", minutes=5)
    decide(legal, "promoted", alias="champion", minutes=6)
    return {"v1": v1, "v2": v2, "v3": v3, "v4": v4, "legal": legal}


def test_a_user_sees_their_own_versions_and_who_holds_champion(user, history):
    [model] = registry_models(user)
    assert model.name == "rag-lora"
    assert [v.version for v in model.versions] == ["3", "2", "1"]  # newest first; v4 is not theirs
    assert (model.champion, model.champion_run_id, model.champion_visible) == ("4", history["v4"].pk, False)
    v3, v2, v1 = model.versions
    assert not any(v.champion for v in model.versions)
    assert (v3.latest.decision, v3.latest.by, v3.latest.reason) == ("promoted", "root-admin", "promoted by root-admin: read 50 answers")
    assert v3.gate.decision == "rejected" and "worse than the champion" in v3.gate.reason  # what staff overrode
    assert (v2.latest.decision, v2.latest.by, v2.gate) == ("rejected", "gate", None)
    assert v1.run_id == history["v1"].pk and v1.registered_at == T0


def test_staff_see_every_model_and_version(staff_user, history):
    models = {m.name: m for m in registry_models(staff_user)}
    assert list(models) == ["legal-lora", "rag-lora"]
    assert [v.version for v in models["rag-lora"].versions] == ["4", "3", "2", "1"]
    assert [v.champion for v in models["rag-lora"].versions] == [True, False, False, False]
    assert models["rag-lora"].champion_visible and models["legal-lora"].champion == "1"


def test_a_demotion_leaves_no_champion_and_a_later_promotion_takes_it(staff_user, history):
    decide(history["v4"], "demoted", reason="demoted by root-admin: regressed", by=staff_user, minutes=7)
    assert {m.name: m.champion for m in registry_models(staff_user)} == {"legal-lora": "1", "rag-lora": None}
    decide(history["v2"], "promoted", alias="champion", by=staff_user, minutes=8)
    assert {m.name: m.champion for m in registry_models(staff_user)}["rag-lora"] == "2"


def test_the_page_lists_them_with_links_and_reasons_without_asking_mlflow(client, user, history, monkeypatch, django_assert_max_num_queries):
    def no_mlflow(*args, **kwargs):
        raise AssertionError("the registry page must not wait on MLflow")

    monkeypatch.setattr("runs.tracking.client", no_mlflow)
    client.force_login(user)
    with django_assert_max_num_queries(6):  # session, user, runs, decisions: not one per version
        response = client.get("/registry/")
    page = response.content.decode()
    assert response.status_code == 200
    assert '<a href="/registry/" class="active">Registry</a>' in page
    assert "Champion:\n    <strong>version 4</strong> <span class=\"muted\">(another user's run)</span>" in page
    assert f'<a href="/runs/{history["v3"].pk}/">#{history["v3"].pk} ' in page
    assert "promoted by root-admin: read 50 answers" in page and "The gate had rejected it: rejected: rouge_score -0.030" in page
    assert "legal-lora" not in page


def test_it_needs_a_login_and_says_when_there_is_nothing_yet(client, user):
    assert client.get("/registry/").status_code == 302
    client.force_login(user)
    assert "No registered model versions yet" in client.get("/registry/").content.decode()
