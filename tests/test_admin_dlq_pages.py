"""The dead-letter pages: groups, jobs of a group, one job, and their actions."""

from __future__ import annotations

import re
from typing import Any

import pytest
import redis
from django.test import Client
from django.urls import reverse

from intentqueue import admin_views
from intentqueue.dlq import DeadLetterIndex
from intentqueue.models import Intent, OperatorAction
from intentqueue.services import QueueService
from intentqueue.status import IntentStatus as S
from tests.factories import IntentFactory
from tests.test_admin_dlq import KINDS, fill_dead_letter_queue
from tests.test_admin_queues import messages_of

pytestmark = pytest.mark.django_db

Q = "intent-fulfillment"
DLQ = reverse("admin:intentqueue_dlq", args=[Q])
ACT = reverse("admin:intentqueue_dlq_act", args=[Q])


@pytest.fixture
def client(admin_user: Any) -> Client:
    client = Client()
    client.force_login(admin_user)
    return client


def failed(redis_client: redis.Redis, count: int, kinds: list[Any] | None = None) -> list[Intent]:
    """FAILED intents with their jobs in the dead-letter queue, failing with ``kinds``."""
    intents = []
    for _ in range(count):
        intent = IntentFactory()
        intent.start_validation(queue=Q, attempt=1)
        intent.mark_failed("failed", "permanent", queue=Q)
        intents.append(intent)
    fill_dead_letter_queue(
        redis_client, count, intents=[(i.pk, i.hash) for i in intents], kinds=kinds
    )
    return intents


def groups_on(page: str) -> dict[str, str]:
    """fingerprint -> exception class of the group rows of a dead-letter page."""
    return dict(re.findall(r'data-group="(\w+)">\s*<td><a href="[^"]+"><strong>(\w+)<', page))


def test_groups_with_counts_and_times(client: Client, redis_client: redis.Redis) -> None:
    failed(redis_client, 7)
    page = client.get(DLQ)
    assert page.status_code == 200
    html = page.text
    assert "7 failed jobs" in html and f"{len(KINDS)} kinds of failure" in html
    assert set(groups_on(html).values()) == {k[1] for k in KINDS}
    transient = html[html.index("TransientError") :]
    assert "RPC timeout after &lt;n&gt; ms calling &lt;address&gt;" in transient
    assert re.search(r'class="iq-num">2<', transient)  # jobs 0 and 5
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", transient)
    assert "Retry group" in html and "Clear group" in html


def test_groups_are_paginated(
    client: Client, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin_views, "PER_PAGE", 2)
    failed(redis_client, 5)
    first, third = client.get(DLQ).text, client.get(DLQ, {"p": 3}).text
    assert len(groups_on(first)) == 2 and len(groups_on(third)) == 1
    assert "5 groups" in first and 'href="?p=2"' in first
    assert client.get(DLQ, {"p": "x"}).status_code == 200


def test_group_page_lists_its_jobs_with_their_intents(
    client: Client, redis_client: redis.Redis
) -> None:
    intents = failed(redis_client, 6)
    (fingerprint, _cls), *_ = [
        (fp, c) for fp, c in groups_on(client.get(DLQ).text).items() if c == "TransientError"
    ]
    page = client.get(reverse("admin:intentqueue_dlq_group", args=[Q, fingerprint])).text
    assert page.count('name="job_ids"') == 2
    for intent in (intents[0], intents[5]):
        assert reverse("admin:intentqueue_intent_change", args=[intent.pk]) in page
    assert page.index(intents[5].hash[2:12]) < page.index(intents[0].hash[2:12])  # newest first
    everything = client.get(reverse("admin:intentqueue_dlq_jobs", args=[Q])).text
    assert everything.count('name="job_ids"') == 6 and "6 jobs" in everything


def test_group_that_emptied_redirects_with_a_message(client: Client) -> None:
    url = reverse("admin:intentqueue_dlq_group", args=[Q, "0123456789abcdef"])
    response = client.get(url, follow=True)
    assert response.redirect_chain[-1][0] == DLQ
    assert "That group is empty now" in messages_of(response)[0]


def test_retry_a_whole_group(client: Client, redis_client: redis.Redis) -> None:
    intents = failed(redis_client, 10)
    fingerprint = next(
        fp for fp, c in groups_on(client.get(DLQ).text).items() if c == "NetworkError"
    )
    data = {"op": "retry", "scope": "group", "group": fingerprint}
    confirm = client.post(ACT, data)
    assert "This touches 2 jobs." in confirm.text
    assert "NetworkError: connection refused by &lt;ip&gt;:&lt;n&gt;" in confirm.text
    assert 'name="group" value="' + fingerprint in confirm.text
    done = client.post(ACT, {**data, "post": "yes", "reason": "node back"}, follow=True)
    assert messages_of(done) == ["Retried 2 failed jobs of intent-fulfillment."]
    retried = {intents[1].pk, intents[6].pk}  # kinds[1] is the network error
    statuses = dict(Intent.objects.values_list("pk", "status"))
    assert {pk for pk, st in statuses.items() if st == S.PENDING} == retried
    assert QueueService().get_queue_metrics(Q)["failed"] == 8
    assert "NetworkError" not in groups_on(done.text).values()
    row = OperatorAction.objects.get()
    assert (row.action, row.count, row.reason, len(row.job_ids)) == (
        "retry_failed", 2, "node back", 2,
    )  # fmt: skip


def test_clear_a_selection_and_retry_another(client: Client, redis_client: redis.Redis) -> None:
    intents = failed(redis_client, 4)
    index = DeadLetterIndex(Q, redis_client)
    index.sync(budget=None)
    ids = [job_id for job_id, _ in index.job_ids(newest=False)]
    confirm = client.post(ACT, {"op": "clear", "scope": "selected", "job_ids": ids[:2]})
    assert "This touches 2 jobs." in confirm.text and "selected failed jobs" in confirm.text
    assert confirm.text.count('name="job_ids"') == 2
    done = client.post(
        ACT,
        {"op": "clear", "scope": "selected", "job_ids": ids[:2], "post": "yes", "reason": "dup"},
        follow=True,
    )
    assert messages_of(done) == ["Cleared 2 failed jobs from intent-fulfillment."]
    assert index.total() == 2  # forgotten at once, no sync needed
    client.post(
        ACT,
        {"op": "retry", "scope": "selected", "job_ids": [ids[3]], "post": "yes", "reason": "go"},
        follow=True,
    )  # fmt: skip
    assert Intent.objects.get(pk=intents[3].pk).status == S.PENDING
    assert Intent.objects.get(pk=intents[2].pk).status == S.FAILED
    nothing = client.post(ACT, {"op": "retry", "scope": "selected"}, follow=True)
    assert messages_of(nothing) == ["No failed jobs were selected."]


def test_one_job_retry_needs_no_reason_delete_does(
    client: Client, redis_client: redis.Redis
) -> None:
    intents = failed(redis_client, 2)
    index = DeadLetterIndex(Q, redis_client)
    index.sync(budget=None)
    first, second = (job_id for job_id, _ in index.job_ids(newest=False))
    done = client.post(
        ACT, {"op": "retry", "scope": "job", "job_ids": [first], "post": "yes"}, follow=True
    )
    assert messages_of(done) == [f"Retried job {first}."]
    assert Intent.objects.get(pk=intents[0].pk).status == S.PENDING
    refused = client.post(ACT, {"op": "clear", "scope": "job", "job_ids": [second], "post": "yes"})
    assert "This field is required." in refused.text
    done = client.post(
        ACT,
        {"op": "clear", "scope": "job", "job_ids": [second], "post": "yes", "reason": "bad data"},
        follow=True,
    )
    assert messages_of(done) == [f"Deleted job {second} from the dead-letter queue."]
    actions = list(OperatorAction.objects.order_by("at").values_list("action", "reason"))
    assert actions == [("retry_job", ""), ("delete_job", "bad data")]
    again = client.post(
        ACT, {"op": "clear", "scope": "job", "job_ids": [second], "post": "yes", "reason": "x"},
        follow=True,
    )  # fmt: skip
    assert messages_of(again) == [f"Job {second} is not in the dead-letter queue."]


def test_bad_requests(client: Client) -> None:
    assert client.post(ACT, {"op": "explode", "scope": "all"}).status_code == 404
    assert client.post(ACT, {"op": "retry", "scope": "everything"}).status_code == 404
    assert client.post(ACT, {"op": "retry", "scope": "group", "group": "nope"}).status_code == 404
    assert client.post(ACT, {"op": "retry", "scope": "job", "job_ids": ["a", "b"]}).status_code == (
        404
    )


def test_unsafe_next_is_ignored(client: Client, redis_client: redis.Redis) -> None:
    failed(redis_client, 1)
    response = client.post(
        ACT,
        {"op": "clear", "scope": "all", "post": "yes", "reason": "r",
         "next": "https://evil.example/"},
    )  # fmt: skip
    assert response["Location"] == DLQ


def test_job_page_shows_everything_about_a_failed_job(
    client: Client, redis_client: redis.Redis
) -> None:
    (intent,) = failed(redis_client, 1)
    job_id = f"fulfillment-{intent.hash[2:]}"
    page = client.get(reverse("admin:intentqueue_job", args=[Q, job_id]))
    assert page.status_code == 200
    html = page.text
    assert "in the dead-letter queue" in html
    assert reverse("admin:intentqueue_intent_change", args=[intent.pk]) in html
    assert html.count("TransientError: RPC timeout after 13 ms") >= 3  # one per attempt
    assert "Traceback (most recent call last)" in html  # RQ's latest Result
    assert "worker-1" in html and "(gone)" in html
    for label in ("Created", "Enqueued", "Started", "Ended", "Waited", "Ran for"):
        assert f">{label}<" in html
    assert f"&quot;intentId&quot;: {intent.pk}" in html
    assert "Retry this job" in html and "Delete this job" in html


def test_job_page_for_live_missing_and_unknown_jobs(
    client: Client, redis_client: redis.Redis
) -> None:
    intent = IntentFactory()
    result = QueueService().add_intent_to_fulfillment_queue(intent, enforce_limit=False)
    live = client.get(reverse("admin:intentqueue_job", args=[Q, result.job_id])).text
    assert "queued" in live and "Retry this job" not in live
    (gone,) = fill_dead_letter_queue(redis_client, 1, start=500)
    redis_client.delete(f"rq:job:{gone}")
    page = client.get(reverse("admin:intentqueue_job", args=[Q, gone])).text
    assert "no longer in Redis" in page and "Delete this job" in page
    assert "Retry this job" not in page
    done = client.post(
        ACT, {"op": "clear", "scope": "job", "job_ids": [gone], "post": "yes", "reason": "x"},
        follow=True,
    )  # fmt: skip
    assert done.status_code == 200 and messages_of(done)
    assert client.get(reverse("admin:intentqueue_job", args=[Q, "nope"])).status_code == 404
    other = reverse("admin:intentqueue_job", args=["blockchain-execution", result.job_id])
    assert client.get(other).status_code == 404


def test_grouping_progress_while_a_backlog_is_indexed(
    client: Client, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from intentqueue import dlq

    monkeypatch.setattr(dlq, "BATCH", 10)
    monkeypatch.setattr(admin_views, "SYNC_BUDGET", 0)
    fill_dead_letter_queue(redis_client, 35)
    page = client.get(DLQ).text
    assert "Grouping failed jobs: 10 grouped, 25 to go." in page
    sync = reverse("admin:intentqueue_dlq_sync", args=[Q])
    monkeypatch.setattr(admin_views, "SYNC_BUDGET_POLL", None)
    assert client.get(sync).json() == {"indexed": 35, "pending": 0, "busy": False}
    assert "Grouping failed jobs" not in client.get(DLQ).text
