"""Intent status changes: guarded compare-and-set transitions with a timeline."""

from __future__ import annotations

import threading

import pytest
from django.db import connection

from intentqueue.exceptions import IllegalTransitionError
from intentqueue.models import Intent, IntentTransition
from intentqueue.status import IntentStatus as S
from intentqueue.status import can_transition
from tests.factories import IntentFactory

pytestmark = pytest.mark.django_db


def test_happy_path_writes_timeline() -> None:
    intent = IntentFactory()
    intent.start_validation(queue="intent-fulfillment", job_id="j1", attempt=1, trace_id="ab")
    intent.mark_validated(queue="intent-fulfillment", job_id="j1")
    intent.start_execution(queue="blockchain-execution", job_id="j2", attempt=1)
    intent.mark_fulfilled("0x" + "cd" * 32, queue="blockchain-execution", job_id="j2")
    intent.refresh_from_db()
    assert intent.status == S.FULFILLED
    rows = list(intent.timeline.values_list("from_status", "to_status"))
    assert rows == [
        ("PENDING", "VALIDATING"), ("VALIDATING", "VALIDATED"),
        ("VALIDATED", "EXECUTING"), ("EXECUTING", "FULFILLED"),
    ]  # fmt: skip
    last = intent.timeline.last()
    assert last is not None and last.extra["tx_hash"] == "0x" + "cd" * 32
    first = intent.timeline.first()
    assert first is not None and (first.job_id, first.attempt, first.trace_id) == ("j1", 1, "ab")


def test_fulfilled_never_moves_backwards() -> None:
    intent = IntentFactory(status=S.FULFILLED)
    for verb in (intent.start_validation, intent.start_execution):
        with pytest.raises(IllegalTransitionError, match="cannot move from FULFILLED"):
            verb()
    with pytest.raises(IllegalTransitionError):
        intent.mark_failed("late failure")
    intent.refresh_from_db()
    assert intent.status == S.FULFILLED
    assert not IntentTransition.objects.exists()


def test_stale_instance_cannot_overwrite() -> None:
    intent = IntentFactory()
    stale = Intent.objects.get(pk=intent.pk)
    intent.start_validation()
    intent.mark_invalid("expired")
    with pytest.raises(IllegalTransitionError, match="cannot move from INVALID to VALIDATED"):
        stale.mark_validated()
    assert Intent.objects.get(pk=intent.pk).status == S.INVALID


def test_failed_records_error() -> None:
    intent = IntentFactory(status=S.EXECUTING)
    intent.mark_failed("reverted", "transaction_failed")
    intent.refresh_from_db()
    assert (intent.status, intent.last_error, intent.last_error_type) == (
        S.FAILED, "reverted", "transaction_failed",
    )  # fmt: skip


def test_attempt_error_keeps_status() -> None:
    intent = IntentFactory(status=S.VALIDATING)
    row = intent.record_attempt_error("timeout", "transient", attempt=1, queue="q", job_id="j")
    assert row.is_attempt_error and row.to_status == S.VALIDATING
    intent.refresh_from_db()
    assert intent.last_error == "timeout" and intent.status == S.VALIDATING


def test_transition_table() -> None:
    assert can_transition("PENDING", "VALIDATING")
    assert not can_transition("PENDING", "FULFILLED")
    assert not can_transition("FULFILLED", "FAILED")
    assert can_transition("FAILED", "PENDING")


@pytest.mark.django_db(transaction=True)
def test_concurrent_claims_one_wins() -> None:
    """Two processes race to finish validation: exactly one succeeds."""
    intent = IntentFactory(status=S.VALIDATING)
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def finish(verb: str) -> None:
        mine = Intent.objects.get(pk=intent.pk)
        barrier.wait()
        try:
            getattr(mine, verb)(**({"reasons": "x"} if verb == "mark_invalid" else {}))
            outcomes.append("won")
        except IllegalTransitionError:
            outcomes.append("lost")
        finally:
            connection.close()

    threads = [
        threading.Thread(target=finish, args=(v,)) for v in ("mark_validated", "mark_invalid")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["lost", "won"]
    assert IntentTransition.objects.filter(intent=intent).count() == 1
