"""The queues page: cards, live JSON, charts, and pause / resume / retry / clear."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from django.test import Client
from django.urls import reverse

from intentqueue import admin_views
from intentqueue.admin_views import (
    fmt_age,
    fmt_ms,
    fmt_percent,
    minute_chart,
)
from intentqueue.models import Intent, OperatorAction
from intentqueue.services import QueueService
from intentqueue.status import IntentStatus as S
from tests.factories import IntentFactory
from tests.test_admin_dlq import fill_dead_letter_queue

pytestmark = pytest.mark.django_db

Q = "intent-fulfillment"
QUEUES = reverse("admin:intentqueue_queues")


@pytest.fixture
def client(admin_user: Any) -> Client:
    client = Client()
    client.force_login(admin_user)
    return client


def failed_intents(redis_client: redis.Redis, count: int) -> list[Intent]:
    """FAILED intents whose fulfillment jobs are in the dead-letter queue."""
    intents = []
    for _ in range(count):
        intent = IntentFactory()
        intent.start_validation(queue=Q, attempt=1)
        intent.mark_failed("PermanentError: boom", "permanent", queue=Q)
        intents.append(intent)
    fill_dead_letter_queue(
        redis_client, count, intents=[(i.pk, i.hash) for i in intents], kinds=[
            ("permanent", "PermanentError", "no route to chain {n}")
        ],
    )  # fmt: skip
    return intents


def messages_of(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]]


# --- the page ------------------------------------------------------------------------------


def test_a_card_per_queue_with_every_figure(client: Client, redis_client: redis.Redis) -> None:
    IntentFactory()
    QueueService().add_intent_to_fulfillment_queue(IntentFactory(), enforce_limit=False)
    failed_intents(redis_client, 2)
    page = client.get(QUEUES)
    assert page.status_code == 200
    html = page.text
    assert '<li><a href="/admin/">Home</a></li>' in html  # the admin's breadcrumbs
    for queue in ("intent-fulfillment", "blockchain-execution"):
        assert f'data-queue="{queue}"' in html
    card = html[html.index('data-queue="intent-fulfillment"') :]
    card = card[: card.index('data-queue="blockchain-execution"')]
    for key, label, _fmt in admin_views.CARD_FIGURES:
        assert f'data-metric="{key}"' in card and label in card
    assert re.search(r'data-metric="waiting">1<', card)
    assert re.search(r'data-metric="failed"><a href="[^"]+dead-letter/">2</a>', card)
    for button in ("iq-button-pause", "iq-button-retry", "iq-button-clear"):
        assert button in card
    assert "<svg" in card and 'href="/admin/rq/"' in html


def test_missing_metrics_show_a_dash(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    basic = {"waiting": 4, "active": 0, "completed": 9, "failed": 0, "delayed": 1,
             "paused": False, "last_processed_at": None}  # fmt: skip
    monkeypatch.setattr(QueueService, "get_queue_health", lambda self: {"queues": {}})
    monkeypatch.setattr(QueueService, "get_queue_metrics", lambda self, name: dict(basic))
    html = client.get(QUEUES).text
    assert re.search(r'data-metric="waiting">4<', html)
    for key in ("jobs_per_minute", "success_rate", "avg_duration_ms", "oldest_waiting_age_s",
                "workers", "stalled"):  # fmt: skip
        assert re.search(rf'data-metric="{key}">—<', html), key
    assert "No data yet" in html


def test_figures_render_when_present(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    now = datetime.now(UTC)
    metrics = {
        "waiting": 1234, "active": 2, "completed": 9, "failed": 0, "delayed": 0, "stalled": 3,
        "paused": True, "workers": 4, "jobs_per_minute": 12.5, "success_rate": 0.9871,
        "avg_duration_ms": 1520.0, "oldest_waiting_age_s": 185, "problems": ["paused"],
        "last_processed_at": now - timedelta(seconds=42),
        "per_minute": [
            {"minute": now - timedelta(minutes=60 - i), "completed": i, "failed": i % 3,
             "retried": 1}
            for i in range(60)
        ],
    }  # fmt: skip
    monkeypatch.setattr(QueueService, "get_queue_health", lambda self: {"queues": {Q: metrics}})
    html = client.get(QUEUES).text
    for key, text in [
        ("waiting", "1,234"), ("stalled", "3"), ("workers", "4"), ("jobs_per_minute", "12.5/min"),
        ("success_rate", "98.7%"), ("avg_duration_ms", "1.5 s"),
        ("oldest_waiting_age_s", "3 min 5 s"), ("last_processed_at", "42 s ago"),
    ]:  # fmt: skip
        assert re.search(rf'data-metric="{key}">{re.escape(text)}<', html), key
    card = html[html.index('data-queue="intent-fulfillment"') :]
    assert 'data-paused="1"' in card and "⚠" not in card  # problems are a list, not icons
    assert "<li>paused</li>" in card
    assert card.count('class="iq-completed"') >= 59


def test_live_json_has_figures_and_charts(client: Client) -> None:
    IntentFactory()
    QueueService().add_intent_to_fulfillment_queue(IntentFactory(), enforce_limit=False)
    QueueService().pause_queue(Q)
    data = client.get(reverse("admin:intentqueue_queues_live")).json()
    assert [q["name"] for q in data["queues"]] == ["intent-fulfillment", "blockchain-execution"]
    fulfillment = data["queues"][0]
    assert fulfillment["paused"] is True and fulfillment["figures"]["waiting"] == "1"
    assert set(fulfillment["charts"]) == {"throughput", "failures"}
    assert fulfillment["charts"]["throughput"].startswith("<svg")
    assert data["redis_error"] == ""


def test_charts() -> None:
    empty = minute_chart(None, label="x <y>")
    assert (
        "No data yet" in empty
        and "x &lt;y&gt;" in empty
        and "<rect" not in empty.split("</text>")[0]
    )
    quiet = minute_chart([{"minute": 1, "completed": 0, "failed": 0}] * 60, label="q")
    assert "No jobs finished" in quiet
    busy = minute_chart(
        [{"minute": 29_000_000 + i, "completed": 10, "failed": 5} for i in range(60)], label="b"
    )
    assert busy.count('class="iq-completed"') == 61  # 60 bars and the legend
    assert busy.count('class="iq-failed"') == 61
    assert ">20<" in busy  # the scale: 15 per minute rounds up to 20


def test_formats() -> None:
    assert fmt_percent(1) == "100.0%" and fmt_percent(None) == "—"
    assert fmt_ms(12.4) == "12 ms" and fmt_ms(61_000) == "61.0 s"
    assert fmt_age(59) == "59 s" and fmt_age(3600) == "1 h" and fmt_age(90_000) == "1 d 1 h"


# --- pause and resume ----------------------------------------------------------------------


def test_pause_asks_first_then_pauses_and_audits(client: Client) -> None:
    QueueService().add_intent_to_fulfillment_queue(IntentFactory(), enforce_limit=False)
    url = reverse("admin:intentqueue_queue_pause", args=[Q])
    confirm = client.post(url)
    assert confirm.status_code == 200
    assert "Pause intent-fulfillment" in confirm.text
    assert "1 waiting and 0 delayed jobs stay where they are" in confirm.text
    assert not QueueService().is_paused(Q) and not OperatorAction.objects.exists()
    done = client.post(url, {"post": "yes", "reason": "maintenance window"}, follow=True)
    assert QueueService().is_paused(Q)
    assert messages_of(done) == [
        "Paused intent-fulfillment: its jobs stay queued until it is resumed."
    ]
    row = OperatorAction.objects.get()
    assert (row.actor, row.action, row.queue, row.reason) == (
        "admin", "pause", Q, "maintenance window",
    )  # fmt: skip
    page = client.get(QUEUES).text
    card = page[page.index('data-queue="intent-fulfillment"') :]
    assert 'data-paused="1"' in card

    url = reverse("admin:intentqueue_queue_resume", args=[Q])
    assert "Workers start the 1 waiting job again" in client.get(url).text
    done = client.post(url, {"post": "yes"}, follow=True)
    assert not QueueService().is_paused(Q)
    assert messages_of(done) == ["Resumed intent-fulfillment."]


def test_unknown_queue_and_priority_bands_are_404(client: Client) -> None:
    assert client.get(reverse("admin:intentqueue_queue_pause", args=["nope"])).status_code == 404
    band = reverse("admin:intentqueue_dlq", args=["intent-fulfillment-p3"])
    assert client.get(band).status_code == 404


# --- retry and clear everything --------------------------------------------------------------


def test_retry_failed_needs_a_reason_and_reports(client: Client, redis_client: redis.Redis) -> None:
    intents = failed_intents(redis_client, 3)
    url = reverse("admin:intentqueue_dlq_act", args=[Q])
    data = {"op": "retry", "scope": "all", "next": QUEUES}
    confirm = client.post(url, data)
    assert "This touches 3 jobs." in confirm.text
    assert "Retry 3 failed jobs of intent-fulfillment (all of them)" in confirm.text
    refused = client.post(url, {**data, "post": "yes", "reason": "  "})
    assert refused.status_code == 200 and "This field is required." in refused.text
    assert not OperatorAction.objects.exists()
    done = client.post(url, {**data, "post": "yes", "reason": "RPC fixed"}, follow=True)
    assert done.redirect_chain[-1][0] == QUEUES
    assert messages_of(done) == ["Retried 3 failed jobs of intent-fulfillment."]
    assert {Intent.objects.get(pk=i.pk).status for i in intents} == {S.PENDING}
    metrics = QueueService().get_queue_metrics(Q)
    assert (metrics["failed"], metrics["waiting"]) == (0, 3)
    row = OperatorAction.objects.get()
    assert (row.action, row.count, row.reason) == ("retry_failed", 3, "RPC fixed")


def test_clear_failed(client: Client, redis_client: redis.Redis) -> None:
    intents = failed_intents(redis_client, 2)
    url = reverse("admin:intentqueue_dlq_act", args=[Q])
    confirm = client.post(url, {"op": "clear", "scope": "all"})
    assert "This cannot be undone" in confirm.text
    done = client.post(
        url, {"op": "clear", "scope": "all", "post": "yes", "reason": "known bad"}, follow=True
    )
    assert messages_of(done) == ["Cleared 2 failed jobs from intent-fulfillment."]
    assert QueueService().get_queue_metrics(Q)["failed"] == 0
    assert {Intent.objects.get(pk=i.pk).status for i in intents} == {S.FAILED}


def test_large_operations_go_in_steps(
    client: Client, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin_views, "MAX_JOBS_PER_REQUEST", 2)
    failed_intents(redis_client, 5)
    url = reverse("admin:intentqueue_dlq_act", args=[Q])
    confirm = client.post(url, {"op": "retry", "scope": "all"})
    assert "This touches 2 jobs." in confirm.text
    assert "oldest 2 of 5" in confirm.text and "remaining 3" in confirm.text
    done = client.post(
        url, {"op": "retry", "scope": "all", "post": "yes", "reason": "step"}, follow=True
    )
    assert messages_of(done) == [
        "Retried 2 failed jobs of intent-fulfillment. 3 more are left; repeat to continue."
    ]
    assert QueueService().get_queue_metrics(Q)["failed"] == 3


def test_service_errors_are_reported_not_raised(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    def down(*args: Any, **kwargs: Any) -> None:
        raise RedisConnectionError("Redis went away")

    monkeypatch.setattr(QueueService, "pause_queue", down)
    url = reverse("admin:intentqueue_queue_pause", args=[Q])
    done = client.post(url, {"post": "yes"}, follow=True)
    assert messages_of(done) == ["Pause intent-fulfillment: Redis went away"]


def test_pages_say_when_redis_is_down(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    from intentqueue import dlq

    def down(*args: Any, **kwargs: Any) -> None:
        raise RedisConnectionError("Connection refused")

    monkeypatch.setattr(QueueService, "get_queue_health", down)
    monkeypatch.setattr(QueueService, "get_queue_metrics", down)
    monkeypatch.setattr(dlq.DeadLetterIndex, "sync", down)
    page = client.get(QUEUES)
    assert page.status_code == 200 and "Connection refused" in page.text  # cards show "—"
    dead_letter = client.get(reverse("admin:intentqueue_dlq", args=[Q]))
    assert dead_letter.status_code == 503 and "Redis did not answer" in dead_letter.text
    live = client.get(reverse("admin:intentqueue_dlq_sync", args=[Q]))
    assert live.status_code == 503 and "Connection refused" in live.json()["redis_error"]
    assert client.get(reverse("admin:intentqueue_queue_pause", args=[Q])).status_code == 503
