"""The operator audit ledger in the admin: read-only, searchable, filterable."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from intentqueue.models import OperatorAction
from intentqueue.services import QueueService

pytestmark = pytest.mark.django_db

LEDGER = reverse("admin:intentqueue_operatoraction_changelist")
A = OperatorAction.Action


@pytest.fixture
def client(admin_user: Any) -> Client:
    client = Client()
    client.force_login(admin_user)
    return client


@pytest.fixture
def rows() -> dict[str, OperatorAction]:
    old = OperatorAction.objects.create(
        actor="alice", action=A.CLEAR_FAILED, queue="blockchain-execution", count=12,
        reason="duplicate nonce storm", at=timezone.now() - timedelta(days=60),
    )  # fmt: skip
    failed = OperatorAction.objects.create(
        actor="bob", action=A.RETRY_FAILED, queue="intent-fulfillment", count=0,
        reason="rpc back", outcome=OperatorAction.Outcome.ERROR, detail="RedisError: down",
    )  # fmt: skip
    QueueService().pause_queue("intent-fulfillment", actor="carol", reason="deploy")
    return {"old": old, "failed": failed, "pause": OperatorAction.objects.get(actor="carol")}


def listed(page: Any) -> set[str]:
    return set(re.findall(r'class="field-actor">(\w+)<', page.text))


def test_ledger_lists_every_operation_newest_first(
    client: Client, rows: dict[str, OperatorAction]
) -> None:
    page = client.get(LEDGER)
    assert page.status_code == 200
    assert listed(page) == {"alice", "bob", "carol"}
    html = page.text
    assert html.index(">carol<") < html.index(">bob<") < html.index(">alice<")
    assert 'class="iq-badge iq-outcome-error"' in html and 'class="iq-badge iq-outcome-ok"' in html
    assert "Queues" in html  # link to the console


def test_search_by_actor_queue_and_reason(client: Client, rows: dict[str, OperatorAction]) -> None:
    assert listed(client.get(LEDGER, {"q": "alice"})) == {"alice"}
    assert listed(client.get(LEDGER, {"q": "blockchain-execution"})) == {"alice"}
    assert listed(client.get(LEDGER, {"q": "nonce"})) == {"alice"}
    assert listed(client.get(LEDGER, {"q": "intent-fulfillment"})) == {"bob", "carol"}


def test_filter_by_action_outcome_and_date(client: Client, rows: dict[str, OperatorAction]) -> None:
    assert listed(client.get(LEDGER, {"action__exact": "pause"})) == {"carol"}
    assert listed(client.get(LEDGER, {"outcome__exact": "error"})) == {"bob"}
    since = (timezone.now() - timedelta(days=7)).isoformat()
    assert listed(client.get(LEDGER, {"at__gte": since})) == {"bob", "carol"}


def test_ledger_is_read_only(client: Client, rows: dict[str, OperatorAction]) -> None:
    row = rows["failed"]
    assert client.get(reverse("admin:intentqueue_operatoraction_add")).status_code == 403
    change = reverse("admin:intentqueue_operatoraction_change", args=[row.pk])
    page = client.get(change)
    assert page.status_code == 200
    assert "RedisError: down" in page.text and 'name="reason"' not in page.text
    client.post(change, {"reason": "rewritten", "actor": "mallory"})
    row.refresh_from_db()
    assert (row.reason, row.actor) == ("rpc back", "bob")
    delete = reverse("admin:intentqueue_operatoraction_delete", args=[row.pk])
    assert client.post(delete, {"post": "yes"}).status_code == 403
    assert OperatorAction.objects.count() == 3
    assert "delete_selected" not in client.get(LEDGER).text
