"""QueueService without workers: enqueue rules, metrics, health, audit, limits."""

from __future__ import annotations

import pytest
import redis
from django.test import override_settings

from intentqueue.exceptions import EnqueueRateLimitedError, IntentQueueError, UnknownQueueError
from intentqueue.models import Intent, OperatorAction
from intentqueue.queues import backoff_delays_ms, stage
from intentqueue.services import QueueService, submit_intent
from tests.factories import IntentFactory, make_payload

pytestmark = pytest.mark.django_db(transaction=True)


def test_unknown_queue_is_a_clear_error() -> None:
    service = QueueService()
    for call in (service.get_queue_metrics, service.pause_queue, service.resume_queue):
        with pytest.raises(UnknownQueueError, match="unknown queue 'nope'; the queues are"):
            call("nope")


def test_metrics_and_health_shape() -> None:
    IntentFactory.create_batch(2)
    IntentFactory(priority=1)
    service = QueueService()
    metrics = service.get_queue_metrics("intent-fulfillment")
    assert {k: metrics[k] for k in ("waiting", "active", "completed", "failed", "delayed")} == {
        "waiting": 3, "active": 0, "completed": 0, "failed": 0, "delayed": 0,
    }  # fmt: skip
    health = service.get_queue_health()
    assert health["redis_status"] == "connected"
    assert health["metrics"]["waiting"] == 3
    assert set(health["queues"]) == {"intent-fulfillment", "blockchain-execution"}
    # No worker runs in this test: the rules say so.
    assert health["is_healthy"] is False
    assert "intent-fulfillment: no live worker" in health["problems"]


def test_health_when_redis_is_down() -> None:
    service = QueueService(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2))
    health = service.get_queue_health()
    assert health["redis_status"] == "disconnected" and health["is_healthy"] is False


def test_intent_saved_while_redis_is_down_stays_pending(redis_url: str) -> None:
    down = {"redis": {"url": "redis://127.0.0.1:1/0"}}
    with override_settings(INTENTQUEUE=down):
        intent = submit_intent(make_payload())
    assert Intent.objects.get(pk=intent.pk).status == "PENDING"
    assert QueueService().get_queue_metrics("intent-fulfillment")["waiting"] == 0


def test_backoff_table() -> None:
    options = stage("fulfillment").options
    assert backoff_delays_ms(options, 3) == [2000, 4000]
    assert backoff_delays_ms(stage("execution").options, 4) == [5000, 10000, 20000]
    retry = stage("fulfillment").retry()
    assert retry is not None and (retry.max, retry.intervals) == (2, [2, 4])
    assert stage("fulfillment").retry(attempts=1) is None


def test_pause_resume_are_audited() -> None:
    service = QueueService()
    service.pause_queue("intent-fulfillment", actor="alice", reason="deploy")
    assert service.is_paused("intent-fulfillment")
    service.resume_queue("intent-fulfillment", actor="alice")
    rows = list(OperatorAction.objects.order_by("at").values_list("actor", "action", "queue"))
    assert rows == [
        ("alice", "pause", "intent-fulfillment"), ("alice", "resume", "intent-fulfillment"),
    ]  # fmt: skip


def test_bulk_dead_letter_operations_need_a_reason() -> None:
    service = QueueService()
    with pytest.raises(IntentQueueError, match="a reason is required"):
        service.clear_failed_jobs("intent-fulfillment", reason=" ")
    with pytest.raises(IntentQueueError, match="a reason is required"):
        service.retry_failed_jobs("intent-fulfillment", reason="")
    outcome = service.clear_failed_jobs("intent-fulfillment", reason="empty anyway", actor="bob")
    assert outcome.count == 0
    row = OperatorAction.objects.get()
    assert (row.action, row.reason, row.count, row.outcome) == (
        "clear_failed",
        "empty anyway",
        0,
        "ok",
    )


def test_priority_out_of_range_rejected() -> None:
    intent = IntentFactory()
    with pytest.raises(IntentQueueError, match="priority must be 1"):
        QueueService().add_intent_to_fulfillment_queue(intent, priority=11)


def test_enqueue_limit_per_source() -> None:
    limit = {"enqueue_limit": {"max": 2, "duration": 60000}}
    with override_settings(INTENTQUEUE={**_current(), **limit}):
        submit_intent(make_payload(source="flood"))
        submit_intent(make_payload(source="flood"))
        with pytest.raises(EnqueueRateLimitedError, match="'flood' reached: at most 2 per 60s"):
            submit_intent(make_payload(source="flood"))
        submit_intent(make_payload(source="calm"))
    assert Intent.objects.filter(source="flood").count() == 2


def _current() -> dict[str, object]:
    from django.conf import settings

    return dict(settings.INTENTQUEUE)


def test_submit_intents_in_bulk_creates_and_queues_all() -> None:
    from intentqueue.services import submit_intents

    payloads = [make_payload() for _ in range(30)]
    first = submit_intents(payloads[:10])
    intents = submit_intents(payloads)  # the first ten exist already
    assert [i.pk for i in intents[:10]] == [i.pk for i in first]
    assert Intent.objects.count() == 30
    assert QueueService().get_queue_metrics("intent-fulfillment")["waiting"] == 30


def test_submit_intents_rejects_the_batch_naming_the_item() -> None:
    from intentqueue.exceptions import InvalidPayloadError
    from intentqueue.services import submit_intents

    bad = make_payload()
    bad["route"]["salt"] = "0x12"
    with pytest.raises(InvalidPayloadError) as caught:
        submit_intents([make_payload(), bad])
    assert "[1].route.salt" in caught.value.errors
    assert Intent.objects.count() == 0
