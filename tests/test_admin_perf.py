"""The console stays fast at scale: 100,000 failed jobs, and many intents.

The sizes can be raised for a measurement run: ``DLQ_PERF_JOBS`` (default 100,000) and
``ADMIN_PERF_INTENTS`` (default 20,000; a million takes a few minutes to create).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

import pytest
import redis
from django.db import connection
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from intentqueue.bench import served, timed
from intentqueue.dlq import DeadLetterIndex
from intentqueue.models import Intent
from intentqueue.seeding import create_intents, fill_dead_letter_queue

pytestmark = [pytest.mark.django_db, pytest.mark.slow]

Q = "intent-fulfillment"


@pytest.fixture
def client(admin_user: Any) -> Client:
    client = Client()
    client.force_login(admin_user)
    return client


def test_pages_with_100k_failed_jobs(client: Client, redis_client: redis.Redis) -> None:
    count = int(os.environ.get("DLQ_PERF_JOBS", "100000"))
    fill_dead_letter_queue(redis_client, count)
    dlq = reverse("admin:intentqueue_dlq", args=[Q])

    started = time.perf_counter()
    first = client.get(dlq)
    first_render = time.perf_counter() - started
    assert "Grouping failed jobs" in first.text  # a budgeted first look, not a slow one
    index = DeadLetterIndex(Q, redis_client)
    started = time.perf_counter()
    while not index.sync(budget=None).complete:
        pass
    built = time.perf_counter() - started

    group = index.groups()[0]
    job_id = index.job_ids(group.fingerprint, 100, 1)[0][0]
    pages = {
        "queues": reverse("admin:intentqueue_queues"),
        "live json": reverse("admin:intentqueue_queues_live"),
        "dead-letter groups": dlq,
        "group, page 200": reverse("admin:intentqueue_dlq_group", args=[Q, group.fingerprint])
        + "?p=200",
        "all failed jobs, page 1000": reverse("admin:intentqueue_dlq_jobs", args=[Q]) + "?p=1000",
        "one job": reverse("admin:intentqueue_job", args=[Q, job_id]),
    }
    results = {}
    for name, url in pages.items():
        path, _, query = url.partition("?")
        params = dict([query.split("=")]) if query else {}
        results[name] = timed(lambda path=path, params=params: served(client, path, params))
    confirm, _ = timed(
        lambda: client.post(
            reverse("admin:intentqueue_dlq_act", args=[Q]),
            {"op": "retry", "scope": "group", "group": group.fingerprint},
        )
    )
    report = ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, (seconds, _) in results.items())
    print(
        f"\n{count:,} failed jobs: first dead-letter page {first_render * 1000:.0f} ms "
        f"(budgeted), grouping finished in {built:.1f}s more; then {report}, "
        f"retry-group confirmation {confirm * 1000:.0f} ms"
    )
    assert first_render < 1.5
    for name, (seconds, _) in results.items():
        assert seconds < 0.5, (name, seconds)
    assert confirm < 0.5
    groups_page = results["dead-letter groups"][1].content.decode()
    assert f"{count:,} failed jobs" in groups_page


def test_intent_list_with_many_intents(client: Client) -> None:
    count = int(os.environ.get("ADMIN_PERF_INTENTS", "20000"))
    started = time.perf_counter()
    create_intents(count)
    created = time.perf_counter() - started
    if connection.vendor == "postgresql" or os.environ.get("ADMIN_PERF_ANALYZE"):
        # PostgreSQL's autovacuum would have; on SQLite see the report (PRAGMA optimize).
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE intentqueue_intent")
    changelist = reverse("admin:intentqueue_intent_changelist")
    since = (timezone.now() - timedelta(days=7)).isoformat()
    queries = {
        "list": {},
        "status FAILED (3%)": {"status__exact": "FAILED"},
        "status EXECUTING (1%)": {"status__exact": "EXECUTING"},
        "strategy native": {"strategy": "native"},
        "source chain 137": {"source_chain": "137"},
        "created past 7 days": {"created_at__gte": since},
        "search hash": {"q": f"0x{count // 2:064x}"},
        "search correlation id": {"q": f"perf-{count // 3}"},
        "search creator (all match)": {"q": "0x" + "33" * 20},
        "page 100": {"p": "100"},
    }
    results = {
        name: timed(lambda q=q: served(client, changelist, q), runs=3)
        for name, q in queries.items()
    }
    hashed = Intent.objects.get(hash=f"0x{count // 2:064x}")
    change = reverse("admin:intentqueue_intent_change", args=[hashed.pk])
    detail, _ = timed(lambda: served(client, change), runs=3)
    report = ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, (seconds, _) in results.items())
    print(
        f"\n{count:,} intents on {connection.vendor} (created in {created:.0f}s): {report}, "
        f"intent page {detail * 1000:.0f} ms"
    )
    assert hashed.hash[:10] in results["search hash"][1].content.decode()
    assert Intent.objects.filter(status="FAILED").exists()
    for name, (seconds, _) in results.items():
        assert seconds < 1.0, (name, seconds)
