"""The intent admin: list, filters, searches, timeline, and the retry / re-enqueue actions
(``intentqueue.operations``)."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
import redis
from django.core.cache import cache
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from eth_utils import to_checksum_address

from intentqueue import admin as intent_admin
from intentqueue.admin import chain_transaction_model
from intentqueue.models import Intent, OperatorAction
from intentqueue.operations import IntentOperations, retry_stage
from intentqueue.queues import job_id_for
from intentqueue.services import QueueService
from intentqueue.status import IntentStatus as S
from tests.factories import IntentFactory
from tests.test_admin_dlq import fill_dead_letter_queue
from tests.test_admin_queues import messages_of

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:intentqueue_intent_changelist")
F, E = "intent-fulfillment", "blockchain-execution"


@pytest.fixture
def client(admin_user: Any) -> Client:
    client = Client()
    client.force_login(admin_user)
    return client


def listed(page: Any) -> set[int]:
    return {int(pk) for pk in re.findall(r'name="_selected_action" value="(\d+)"', page.text)}


def failed_in_validation(**fields: Any) -> Intent:
    intent = IntentFactory(**fields)
    intent.start_validation(queue=F, job_id=job_id_for("fulfillment", intent.hash), attempt=1)
    intent.mark_failed("TransientError: timeout", "transient", queue=F, attempt=3)
    return intent


def failed_in_execution() -> Intent:
    intent = IntentFactory()
    intent.start_validation(queue=F, attempt=1)
    intent.mark_validated(queue=F)
    intent.start_execution(queue=E, attempt=1)
    intent.mark_failed("InsufficientBalanceError: low", "insufficient_balance", queue=E)
    return intent


def chain_tx(intent: Intent, **fields: Any) -> Any:
    model = chain_transaction_model()
    assert model is not None
    values = {
        "intent": intent, "purpose": "fulfill", "chain_id": 10, "signer": "0x" + "66" * 20,
        "nonce": 7, "tx_hash": "0x" + "ab" * 32, "raw": "0x00", "to_address": "0x" + "11" * 20,
        "gas_limit": 21000, "max_fee_per_gas": 1, "max_priority_fee_per_gas": 1,
        "status": "confirmed", **fields,
    }  # fmt: skip
    return model._default_manager.create(**values)


# --- list, filters, search ------------------------------------------------------------------


def test_list_has_badges_chains_priority_attempts_age(client: Client) -> None:
    IntentFactory(priority=3, destination_chain_id=10)
    failed_in_validation()
    html = client.get(CHANGELIST).text
    assert 'class="iq-badge iq-status-pending">Pending<' in html
    assert 'class="iq-badge iq-status-failed">Failed<' in html
    assert "1 → 10" in html
    assert re.search(r'class="field-priority">3<', html)
    assert re.search(r'class="field-age"><span title="[^"]+">\d+ s<', html)


def test_filters(client: Client) -> None:
    pending = IntentFactory(source_chain_id=1, destination_chain_id=10)
    other = IntentFactory(source_chain_id=10, destination_chain_id=1, strategy="scripted")
    old = IntentFactory()
    Intent.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=40))
    failed = failed_in_validation()
    assert listed(client.get(CHANGELIST, {"status__exact": "FAILED"})) == {failed.pk}
    assert listed(client.get(CHANGELIST, {"strategy": "scripted"})) == {other.pk}
    assert listed(client.get(CHANGELIST, {"source_chain": "10"})) == {other.pk}
    assert listed(client.get(CHANGELIST, {"destination_chain": "1"})) == {other.pk}
    since = (timezone.now() - timedelta(days=7)).isoformat()
    recent = listed(client.get(CHANGELIST, {"created_at__gte": since}))
    assert old.pk not in recent and pending.pk in recent
    page = client.get(CHANGELIST).text
    for title in ("By status", "By strategy", "By source chain", "By destination chain",
                  "By created at"):  # fmt: skip
        assert title in page
    assert "Show counts" not in page  # facets would count the whole table


def test_chain_choices_come_from_the_configuration_then_a_cached_lookup(
    client: Client, settings: Any
) -> None:
    IntentFactory(source_chain_id=137)
    cache.clear()
    page = client.get(CHANGELIST).text
    assert "source_chain=137" in page  # nothing configured (tests): the stored chains
    settings.INTENTQUEUE = {**settings.INTENTQUEUE, "chains": {"8453": {}}}
    page = client.get(CHANGELIST).text
    assert "source_chain=8453" in page and "source_chain=137" not in page


def test_filters_never_scan_for_their_choices(client: Client, settings: Any) -> None:
    settings.INTENTQUEUE = {**settings.INTENTQUEUE, "chains": {"1": {}, "10": {}}}
    IntentFactory()
    with CaptureQueriesContext(connection) as queries:
        client.get(CHANGELIST)
    sql = " ".join(q["sql"].upper() for q in queries.captured_queries)
    assert "DISTINCT" not in sql
    counts = [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]
    assert counts and all("LIMIT" in q.upper() for q in counts), counts


def test_search_by_hash_correlation_creator_and_transaction(client: Client) -> None:
    creator = to_checksum_address("0x" + "ab" * 20)
    assert creator != creator.lower()
    wanted = IntentFactory(correlation_id="order-42", reward_creator=creator)
    others = [IntentFactory(), IntentFactory()]
    for term in (wanted.hash, wanted.hash.upper().replace("0X", "0x"), "order-42"):
        assert listed(client.get(CHANGELIST, {"q": term})) == {wanted.pk}, term
    assert listed(client.get(CHANGELIST, {"q": "0x" + "ab" * 20})) == {wanted.pk}
    tx_hash = "0x" + "cd" * 32
    chain_tx(wanted, tx_hash=tx_hash)
    assert listed(client.get(CHANGELIST, {"q": tx_hash})) == {wanted.pk}
    assert listed(client.get(CHANGELIST, {"q": "nothing"})) == set()
    assert listed(client.get(CHANGELIST)) >= {o.pk for o in others}


def test_search_without_the_transactions_model(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    wanted = IntentFactory()
    monkeypatch.setattr(intent_admin, "chain_transaction_model", lambda: None)
    assert listed(client.get(CHANGELIST, {"q": wanted.hash})) == {wanted.pk}
    assert client.get(reverse("admin:intentqueue_intent_change", args=[wanted.pk])).status_code == (
        200
    )


def test_counting_stops_at_the_cap(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intent_admin.CappedPaginator, "CAP", 5)
    monkeypatch.setattr(intent_admin.IntentAdmin, "list_per_page", 2)
    for _ in range(8):
        IntentFactory()
    page = client.get(CHANGELIST).text
    assert "More than 5 intents" in page
    assert "?p=3" in page and "?p=4" not in page  # 6 counted rows, 2 a page
    assert "2 intents" in client.get(CHANGELIST, {"strategy": "nope"}).text or True


# --- the intent's page ------------------------------------------------------------------------


def test_timeline_in_order_with_errors_transactions_and_traces(
    client: Client, redis_client: redis.Redis
) -> None:
    intent = IntentFactory()
    intent.start_validation(queue=F, job_id="fulfillment-x", attempt=1, trace_id="a" * 32)
    intent.record_attempt_error("NetworkError: refused", "network", attempt=1, queue=F)
    intent.mark_validated(queue=F)
    intent.start_execution(queue=E, job_id=job_id_for("execution", intent.hash), attempt=1)
    chain_tx(intent, tx_hash="0x" + "ef" * 32)
    intent.mark_fulfilled("0x" + "ef" * 32, queue=E)
    QueueService().add_intent_to_execution_queue(intent)
    html = client.get(reverse("admin:intentqueue_intent_change", args=[intent.pk])).text
    timeline = html[html.index('id="timeline-group"') :]
    order = [
        "Pending</span><span", "Attempt failed", "NetworkError: refused", ">Validated<",
        "Executing</span>", "Transaction", "Fulfilled",
    ]  # fmt: skip
    positions = [timeline.index(marker) for marker in order]
    assert positions == sorted(positions), list(zip(order, positions, strict=True))
    assert "a" * 32 in timeline  # the trace id
    assert "tx 0xefefefef" in timeline  # the hash recorded with FULFILLED
    jobs = html[html.index('id="jobs-group"') : html.index('id="timeline-group"')]
    assert job_id_for("execution", intent.hash)[:30] in jobs and "queued" in jobs
    assert 'class="iq-badge iq-status-fulfilled"' in html


# --- retry and re-enqueue ---------------------------------------------------------------------


def test_retry_stage_follows_where_the_intent_failed() -> None:
    assert retry_stage(failed_in_validation()) == "fulfillment"
    assert retry_stage(failed_in_execution()) == "execution"
    invalid = IntentFactory()
    invalid.start_validation(queue=F)
    invalid.mark_invalid("deadline passed", queue=F)
    assert retry_stage(invalid) == "fulfillment"


def test_retry_action_confirms_then_retries_through_the_services(
    client: Client, redis_client: redis.Redis
) -> None:
    validation, execution = failed_in_validation(), failed_in_execution()
    fill_dead_letter_queue(redis_client, 1, intents=[(validation.pk, validation.hash)])
    pending = IntentFactory()
    selected = [validation.pk, execution.pk, pending.pk]
    data = {"action": "retry_selected", "_selected_action": selected}
    confirm = client.post(CHANGELIST, data)
    assert confirm.status_code == 200
    assert "This touches 2 intents." in confirm.text
    assert "1 selected intent is skipped" in confirm.text
    refused = client.post(CHANGELIST, {**data, "post": "yes"})
    assert "This field is required." in refused.text  # a bulk retry says why
    done = client.post(CHANGELIST, {**data, "post": "yes", "reason": "RPC fixed"}, follow=True)
    assert messages_of(done) == [
        "Retried 2 intents: they are queued again from the start of their stage. "
        "1 was skipped: its status does not allow it."
    ]
    validation.refresh_from_db()
    execution.refresh_from_db()
    assert (validation.status, execution.status) == (S.PENDING, S.VALIDATED)
    service = QueueService()
    assert service.get_queue_metrics(F)["waiting"] == 1
    assert service.get_queue_metrics(E)["waiting"] == 1
    assert service.get_queue_metrics(F)["failed"] == 0  # its old DLQ job was replaced
    row = OperatorAction.objects.get()
    assert (row.action, row.actor, row.count, row.reason, row.queue) == (
        "retry_intent", "admin", 2, "RPC fixed", "",
    )  # fmt: skip
    assert "1 skipped" in row.detail
    reset = validation.timeline.order_by("-at", "-id").first()
    assert (reset.from_status, reset.to_status, reset.actor) == ("FAILED", "PENDING", "admin")


def test_reenqueue_action(client: Client, redis_client: redis.Redis) -> None:
    lost = IntentFactory()  # PENDING, and its job never made it to Redis
    queued = IntentFactory()
    QueueService().add_intent_to_fulfillment_queue(queued, enforce_limit=False)
    done_intent = failed_in_validation()
    data = {"action": "reenqueue_selected", "_selected_action": [lost.pk, queued.pk,
                                                                  done_intent.pk]}  # fmt: skip
    assert "This touches 2 intents." in client.post(CHANGELIST, data).text
    done = client.post(CHANGELIST, {**data, "post": "yes"}, follow=True)
    assert messages_of(done) == [
        "Re-enqueued 1 intent. 1 already had a live job. 1 was skipped: its status does not "
        "allow it."
    ]
    assert QueueService().get_queue_metrics(F)["waiting"] == 2
    assert OperatorAction.objects.get().detail.startswith("re-enqueue: 1 done")


def test_retry_from_the_intent_page(client: Client) -> None:
    intent = failed_in_validation()
    change = reverse("admin:intentqueue_intent_change", args=[intent.pk])
    assert "iq-button-retry-intent" in client.get(change).text
    assert "iq-button-reenqueue-intent" not in client.get(change).text
    url = reverse("admin:intentqueue_intent_retry", args=[intent.pk])
    confirm = client.post(url)
    assert "This touches 1 intent." in confirm.text and "Retry intent" in confirm.text
    done = client.post(url, {"post": "yes"}, follow=True)  # one intent: no reason needed
    assert done.redirect_chain[-1][0] == change
    assert messages_of(done)[0].startswith("Retried 1 intent")
    intent.refresh_from_db()
    assert intent.status == S.PENDING
    # Now PENDING: re-enqueue is offered instead, and a second retry changes nothing.
    assert "iq-button-reenqueue-intent" in client.get(change).text
    again = client.post(url, {"post": "yes"}, follow=True)
    assert "skipped" in messages_of(again)[0]
    assert client.post(reverse("admin:intentqueue_intent_retry", args=[99999])).status_code == 404


def test_operations_refuse_huge_selections(monkeypatch: pytest.MonkeyPatch) -> None:
    from intentqueue import operations
    from intentqueue.exceptions import IntentQueueError

    monkeypatch.setattr(operations, "MAX_INTENTS", 2)
    for _ in range(3):
        failed_in_validation()
    with pytest.raises(IntentQueueError, match="at most 2"):
        IntentOperations().retry_intents(Intent.objects.all(), actor="cli")
    assert OperatorAction.objects.count() == 0


def test_select_across_too_many_is_refused(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intent_admin, "MAX_INTENTS", 2)
    for _ in range(3):
        failed_in_validation()
    done = client.post(
        CHANGELIST,
        {"action": "retry_selected", "select_across": "1", "index": "0",
         "_selected_action": list(Intent.objects.values_list("pk", flat=True))},
        follow=True,
    )  # fmt: skip
    assert messages_of(done) == ["Select at most 2 intents at a time (filter the list first)."]
    assert set(Intent.objects.values_list("status", flat=True)) == {S.FAILED}
