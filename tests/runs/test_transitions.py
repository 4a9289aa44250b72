import threading

import pytest
from django.db import connection

from runs.kinds import KINDS
from runs.models import PipelineRun, RunEvent, RunStatus
from runs.services import InvalidTransition, run_transition, run_transition_or_raise

from .factories import make_run

# The status machine of docs/ARCHITECTURE.md, written out as data here, not read from the
# code under test (each kind's path, runs/kinds/):
#     pending -> training -> evaluating -> completed     (kind finetune)
#     pending -> evaluating -> completed                 (kind eval_only)
#     pending -> training -> evaluating -> completed     (kind sweep: trials train, then the winner's claim)
#     any non-terminal -> failed | cancelled;  terminal: completed, failed, cancelled
STATUSES = ["pending", "training", "evaluating", "completed", "failed", "cancelled"]
DESIGN_MACHINE = {
    "finetune": {
        ("pending", "training"), ("training", "evaluating"), ("evaluating", "completed"),
        ("pending", "failed"), ("training", "failed"), ("evaluating", "failed"),
        ("pending", "cancelled"), ("training", "cancelled"), ("evaluating", "cancelled"),
    },
    "sweep": {
        ("pending", "training"), ("training", "evaluating"), ("evaluating", "completed"),
        ("pending", "failed"), ("training", "failed"), ("evaluating", "failed"),
        ("pending", "cancelled"), ("training", "cancelled"), ("evaluating", "cancelled"),
    },
    "eval_only": {
        ("pending", "evaluating"), ("evaluating", "completed"),
        ("pending", "failed"), ("evaluating", "failed"),
        ("pending", "cancelled"), ("evaluating", "cancelled"),
    },
}


def cases(kind):
    for source in STATUSES:
        for target in STATUSES:
            if source != target:
                yield kind, source, target, (source, target) in DESIGN_MACHINE[kind]


CASES = [*cases("finetune"), *cases("eval_only")]
CASE_IDS = [f"{kind}:{source}->{target}" for kind, source, target, _ in CASES]


def test_the_status_names_are_the_designs():
    assert sorted(RunStatus.values) == sorted(STATUSES)


@pytest.mark.django_db
@pytest.mark.parametrize(("kind", "source", "target", "allowed"), CASES, ids=CASE_IDS)
def test_every_transition_is_allowed_or_refused_as_designed(user, kind, source, target, allowed):
    run = make_run(user, kind=kind, status=source)
    if allowed:
        assert run_transition(run_id=run.pk, to=target, message="go") is True
        run.refresh_from_db()
        assert run.status == target
        event = RunEvent.objects.filter(run=run).last()
        assert (event.from_status, event.to_status, event.message) == (source, target, "go")
    else:
        events = RunEvent.objects.filter(run=run).count()
        with pytest.raises(InvalidTransition) as caught:
            run_transition(run_id=run.pk, to=target)
        assert f"'{source}'" in str(caught.value) and f"'{target}'" in str(caught.value)
        run.refresh_from_db()
        assert run.status == source
        assert RunEvent.objects.filter(run=run).count() == events


@pytest.mark.django_db
@pytest.mark.parametrize(("kind", "source", "target", "allowed"), CASES, ids=CASE_IDS)
def test_the_api_answers_200_or_409_naming_both_states_as_designed(api, user, kind, source, target, allowed):
    run = make_run(user, kind=kind, status=source)
    response = api.patch(f"/api/runs/{run.pk}/status/", {"status": target, "message": "by api"}, format="json")
    run.refresh_from_db()
    if allowed:
        assert response.status_code == 200, response.content
        assert response.json()["status"] == target and run.status == target
    else:
        assert response.status_code == 409, response.content
        body = response.json()
        assert (body["from"], body["to"]) == (source, target)
        assert source in body["detail"] and target in body["detail"]
        assert run.status == source


def test_the_code_table_is_the_design_machine():
    tables = {name: kind.transitions() for name, kind in KINDS.items()}
    encoded = {kind: {(s, t) for s, targets in table.items() for t in targets} for kind, table in tables.items()}
    assert encoded == DESIGN_MACHINE


@pytest.mark.django_db
def test_terminal_timestamps_and_progress(user):
    run = make_run(user, kind="eval_only")
    run_transition(run_id=run.pk, to="evaluating")
    run_transition(run_id=run.pk, to="completed")
    run.refresh_from_db()
    assert run.started_at and run.finished_at and run.progress == 100


@pytest.mark.django_db
def test_a_claim_with_the_wrong_expected_status_loses_quietly(user):
    run = make_run(user, status="training")
    assert run_transition(run_id=run.pk, to="training", expected="pending") is False


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_claims_of_one_run_exactly_one_wins(user):
    run = make_run(user)
    barrier = threading.Barrier(8)
    outcomes = []

    def claim():
        try:
            barrier.wait()
            try:
                outcomes.append(run_transition(run_id=run.pk, to="training", expected="pending"))
            except InvalidTransition:
                outcomes.append(False)
        finally:
            connection.close()

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == [False] * 7 + [True]
    assert PipelineRun.objects.get(pk=run.pk).status == "training"
    assert RunEvent.objects.filter(run=run, to_status="training").count() == 1


@pytest.mark.django_db
def test_a_lost_race_is_reported_like_an_invalid_move(user):
    run = make_run(user, status="cancelled")
    with pytest.raises(InvalidTransition):
        run_transition_or_raise(run_id=run.pk, to="failed")
