"""The promotion gate against a real MLflow registry (the local store of the embedded default)."""

from __future__ import annotations

import uuid

import pytest

from evaluation.significance import compare_metrics
from runs import tracking
from runs.models import PromotionDecision
from runs.promotion import apply_decisions, gate_decision
from runs.services import run_record_promotion, run_set_mlflow_ids, run_set_registered_model
from tests.conftest import token_client
from tests.runs.factories import make_run

pytestmark = pytest.mark.django_db

NAME = ""  # one registered model per test: the MLflow store lives as long as the test session


@pytest.fixture(autouse=True)
def model_name():
    global NAME
    NAME = f"rag-lora.test-gate-{uuid.uuid4().hex[:8]}.rag_qa_train"
    return NAME


def registered_run(user, tmp_path, *, status="completed"):
    """A run with an MLflow run and a registered version of NAME."""
    run = make_run(user, status=status)
    experiment_id, mlflow_run_id = tracking.mlflow_start(run_id=run.pk, name=run.name, kind=run.kind, config=run.config, tags={})
    run_set_mlflow_ids(run_id=run.pk, experiment_id=experiment_id, mlflow_run_id=mlflow_run_id)
    tracking.log_text(mlflow_run_id, "an adapter would be here", "model/README.txt")
    client = tracking.client()
    try:
        client.create_registered_model(NAME)
    except Exception:  # noqa: BLE001 - exists from an earlier run in this test
        pass
    version = client.create_model_version(NAME, source=f"runs:/{mlflow_run_id}/model", run_id=mlflow_run_id).version
    run_set_registered_model(run_id=run.pk, name=NAME, version=str(version))
    run.refresh_from_db()
    return run


def decide_after_comparison(*, run, comparisons) -> PromotionDecision:
    """What the compare job stores (the gate's decision) and the promote job then applies to MLflow."""
    gate = gate_decision(run=run, comparisons=comparisons)
    row = run_record_promotion(run_id=run.pk, model_name=gate.model_name, model_version=gate.model_version, decision=gate.decision,
                               alias=gate.alias, reason=gate.reason, automatic=True)
    assert tracking.version_tags(NAME, run.registered_model_version).get("promotion") is None  # recorded, not applied yet
    assert apply_decisions(run_id=run.pk) == [row.pk]
    row.refresh_from_db()
    assert row.applied_at is not None
    return row


def comparisons(shift: float):
    base = [0.30 + 0.01 * (i % 7) for i in range(40)]
    tuned = [b + shift + 0.002 * (i % 5) for i, b in enumerate(base)]
    return {"ragas_eval": compare_metrics({"rouge_score": (base, tuned), "bleu_score": (base, base)}, seed=42)}


def test_a_significantly_better_run_becomes_champion(user, tmp_path):
    run = registered_run(user, tmp_path)
    decision = decide_after_comparison(run=run, comparisons=comparisons(0.05))
    assert decision.decision == "promoted" and decision.alias == "champion" and decision.automatic
    assert decision.reason.startswith("promoted: rouge_score +0.054 [")
    assert tracking.champion_version(NAME) == (run.registered_model_version, run.mlflow_run_id)
    tags = tracking.version_tags(NAME, run.registered_model_version)
    assert tags["promotion.decision"] == "promoted" and tags["promotion"] == decision.reason and tags["promotion.by"] == "gate"


def test_a_not_significant_run_is_rejected_with_its_reason_and_no_alias(user, tmp_path):
    run = registered_run(user, tmp_path)
    decision = decide_after_comparison(run=run, comparisons={"ragas_eval": compare_metrics({
        "rouge_score": ([0.3, 0.5, 0.4, 0.6, 0.2, 0.5, 0.4, 0.3, 0.6, 0.5, 0.4], [0.5, 0.3, 0.4, 0.5, 0.3, 0.6, 0.3, 0.4, 0.5, 0.6, 0.3]),
    }, seed=42)})
    assert decision.decision == "rejected" and decision.alias == ""
    assert decision.reason.startswith("rejected: rouge_score ") and "is not significant" in decision.reason
    assert tracking.champion_version(NAME) is None
    assert tracking.version_tags(NAME, run.registered_model_version)["promotion"] == decision.reason


def test_a_new_version_worse_than_the_champion_is_rejected(user, tmp_path, settings):
    from runs.services import run_record_samples

    champion = registered_run(user, tmp_path)
    tracking.set_champion(NAME, champion.registered_model_version)
    challenger = registered_run(user, tmp_path)
    from datasets_app.models import Dataset

    ragas_eval = Dataset.objects.get(name="ragas_eval")
    for run, offset in ((champion, 0.2), (challenger, 0.0)):
        run.reproducibility = {"datasets": {"ragas_eval": ragas_eval.sha256}}
        run.save(update_fields=["reproducibility"])
        run_record_samples(run_id=run.pk, samples=[
            {"dataset_id": ragas_eval.pk, "variant": "finetuned", "index": i, "question": "q", "contexts": [], "ground_truth": "g",
             "answer": "a", "scores": {"rouge_score": 0.3 + offset + 0.01 * (i % 4)}, "reasons": {}} for i in range(30)
        ])
    decision = decide_after_comparison(run=challenger, comparisons=comparisons(0.05))
    assert decision.decision == "rejected" and "worse than the champion" in decision.reason
    assert tracking.champion_version(NAME)[0] == champion.registered_model_version


def test_staff_promote_and_demote_by_hand_and_both_are_recorded(user, staff_user, tmp_path):
    run = registered_run(user, tmp_path)
    assert token_client(user).post(f"/api/runs/{run.pk}/promote/", {"reason": "looks good"}, format="json").status_code in (403, 404)
    staff = token_client(staff_user)
    assert staff.post(f"/api/runs/{run.pk}/promote/", {}, format="json").status_code == 400  # a reason is required
    response = staff.post(f"/api/runs/{run.pk}/promote/", {"reason": "read 50 answers: better"}, format="json")
    assert response.status_code == 200, response.content
    promotion = response.json()["promotion"]
    assert promotion["decision"] == "promoted" and promotion["alias"] == "champion" and promotion["by"] == staff_user.username
    assert promotion["reason"] == f"promoted by {staff_user.username}: read 50 answers: better"
    assert tracking.champion_version(NAME)[0] == run.registered_model_version

    response = staff.post(f"/api/runs/{run.pk}/demote/", {"reason": "regressed on legal"}, format="json")
    assert response.status_code == 200 and response.json()["promotion"]["decision"] == "demoted"
    assert tracking.champion_version(NAME) is None
    assert staff.post(f"/api/runs/{run.pk}/demote/", {"reason": "again"}, format="json").status_code == 409  # not the champion now
    assert list(PromotionDecision.objects.filter(run=run).values_list("decision", "automatic", "by__username")) == [
        ("promoted", False, staff_user.username), ("demoted", False, staff_user.username),
    ]


def test_a_run_that_has_not_completed_cannot_be_promoted(user, staff_user, tmp_path):
    run = registered_run(user, tmp_path, status="evaluating")
    response = token_client(staff_user).post(f"/api/runs/{run.pk}/promote/", {"reason": "hurry"}, format="json")
    assert response.status_code == 409 and "only a completed run" in response.json()["detail"]


def test_staff_promote_from_the_run_page_and_it_is_shown(client, user, staff_user, tmp_path):
    run = registered_run(user, tmp_path)
    client.force_login(user)
    assert "Promote to champion" not in client.get(f"/runs/{run.pk}/").content.decode()  # the owner is not staff
    assert client.post(f"/runs/{run.pk}/promotion/", {"action": "promote", "reason": "x"}).status_code == 403
    client.force_login(staff_user)
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert "Promote to champion" in page and "no decision yet" in page
    # Without confirm=yes the page asks first, whatever was posted.
    response = client.post(f"/runs/{run.pk}/promotion/", {"action": "promote", "reason": "read the samples"})
    assert response.status_code == 200 and "Promote to champion?" in response.content.decode()
    assert tracking.champion_version(NAME) is None and not PromotionDecision.objects.exists()
    response = client.post(f"/runs/{run.pk}/promotion/", {"action": "promote", "reason": "read the samples", "confirm": "yes"}, follow=True)
    page = response.content.decode()
    assert "@champion" in page and f"promoted by {staff_user.username}: read the samples" in page
    assert tracking.champion_version(NAME)[0] == run.registered_model_version


def test_promoting_a_version_the_gate_rejected_shows_the_gates_reason_before_anything_changes(client, user, staff_user, tmp_path):
    from runs.promotion import promote_by_hand

    champion = registered_run(user, tmp_path)
    promote_by_hand(run=champion, user=staff_user, reason="the first good one")
    run = registered_run(user, tmp_path)
    rejected = decide_after_comparison(run=run, comparisons={"ragas_eval": compare_metrics({
        "rouge_score": ([0.3, 0.5, 0.4, 0.6, 0.2, 0.5, 0.4, 0.3, 0.6, 0.5, 0.4], [0.5, 0.3, 0.4, 0.5, 0.3, 0.6, 0.3, 0.4, 0.5, 0.6, 0.3]),
    }, seed=42)})
    assert rejected.decision == "rejected"
    client.force_login(user)
    assert client.get(f"/runs/{run.pk}/promotion/?action=promote").status_code == 403  # staff only, the confirmation too
    client.force_login(staff_user)
    page = client.get(f"/runs/{run.pk}/promotion/?action=promote").content.decode()  # the run page's button: a plain GET
    assert "The gate <strong>rejected</strong> this version: " + rejected.reason in page
    assert f"takes the alias from version {champion.registered_model_version}" in page
    assert f'<p id="current-champion">Champion now:\n    version {champion.registered_model_version}' in page
    # A blank reason is refused on the same page; nothing moved.
    page = client.post(f"/runs/{run.pk}/promotion/", {"action": "promote", "reason": " ", "confirm": "yes"}).content.decode()
    assert 'id="promotion-error">say why (reason)' in page and rejected.reason in page
    assert tracking.champion_version(NAME)[0] == champion.registered_model_version
    response = client.post(f"/runs/{run.pk}/promotion/", {"action": "promote", "reason": "the gate's data was stale", "confirm": "yes"})
    assert response.status_code == 302 and response.url == f"/runs/{run.pk}/"
    assert tracking.champion_version(NAME)[0] == run.registered_model_version
