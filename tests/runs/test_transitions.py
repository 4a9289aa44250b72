import threading

import pytest
from django.db import connection

from runs.models import PipelineRun, RunEvent, RunStatus
from runs.services import TRANSITIONS, InvalidTransition, run_transition, run_transition_or_raise

from .factories import make_run

ALL = list(RunStatus.values)


def cases(kind):
    for source in ALL:
        for target in ALL:
            if source != target:
                yield kind, source, target, target in TRANSITIONS[kind].get(source, set())


@pytest.mark.django_db
@pytest.mark.parametrize(("kind", "source", "target", "allowed"), [*cases("finetune"), *cases("eval_only")])
def test_every_transition_is_allowed_or_refused_as_designed(user, kind, source, target, allowed):
    run = make_run(user, kind=kind, status=source)
    if allowed:
        assert run_transition(run_id=run.pk, to=target, message="go") is True
        run.refresh_from_db()
        assert run.status == target
        event = RunEvent.objects.filter(run=run).last()
        assert (event.from_status, event.to_status, event.message) == (source, target, "go")
    else:
        with pytest.raises(InvalidTransition) as caught:
            run_transition(run_id=run.pk, to=target)
        assert f"'{source}'" in str(caught.value) and f"'{target}'" in str(caught.value)
        run.refresh_from_db()
        assert run.status == source


def test_the_design_machine_is_encoded():
    assert TRANSITIONS["finetune"]["pending"] == {"training", "failed", "cancelled"}
    assert TRANSITIONS["finetune"]["training"] == {"evaluating", "failed", "cancelled"}
    assert TRANSITIONS["eval_only"]["pending"] == {"evaluating", "failed", "cancelled"}
    for kind in TRANSITIONS:
        assert not {"completed", "failed", "cancelled"} & set(TRANSITIONS[kind])  # terminal states have no exits


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
