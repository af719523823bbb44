"""The dead-letter grouping (``intentqueue.dlq``) on its own, against a real Redis.

``fill_dead_letter_queue`` (``intentqueue.seeding``, imported from here by the other
admin tests) writes failed jobs the way RQ and our failure handler leave them, with a
pipeline, so tests can have 100,000 of them in a few seconds.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime, timedelta

import pytest
import redis

from intentqueue.dlq import (
    MISSING_CLASS,
    DeadLetterIndex,
    Failure,
    failure_of,
    last_traceback_line,
    load_rows,
    normalise_message,
    split_error,
)
from intentqueue.seeding import KINDS, fill_dead_letter_queue
from intentqueue.services import FAILED_TTL

__all__ = ["KINDS", "fill_dead_letter_queue"]

# --- fingerprints ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("RPC timeout after 3012 ms", "RPC timeout after 17 ms"),
        ("no intent 0x" + "ab" * 32 + " with id 5", "no intent 0x" + "01" * 32 + " with id 77"),
        ("balance low at 0x" + "11" * 20, "balance low at 0x" + "Fe" * 20),
        ("refused by 10.0.0.1:8545", "refused by 192.168.10.200:443"),
        (
            "request 123e4567-e89b-12d3-a456-426614174000 failed",
            "request 00000000-0000-4000-8000-000000000000 failed",
        ),
        ("at 2026-01-02T03:04:05.123+00:00 it broke", "at 2025-12-31 23:59:59Z it broke"),
        ("<Foo object at 0x7f3a2b1c>", "<Foo object at 0x55d0>"),
        ("job fulfillment-" + "3f" * 32 + " lost", "job fulfillment-" + "a1" * 32 + " lost"),
    ],
)
def test_variable_parts_are_normalised_away(one: str, other: str) -> None:
    assert normalise_message(one) == normalise_message(other)


def test_normalised_messages_keep_their_words() -> None:
    assert normalise_message("RPC timeout after 3012 ms on 0x" + "ab" * 20) == (
        "RPC timeout after <n> ms on <address>"
    )
    assert normalise_message("queue intent-fulfillment-p3   is\nslow") == (
        "queue intent-fulfillment-p3 is slow"
    )
    assert normalise_message("deadline passed") != normalise_message("deadline missed")


def test_split_error_and_tracebacks() -> None:
    assert split_error("NetworkError: refused") == ("NetworkError", "refused")
    assert split_error("intentqueue.exceptions.PermanentError: gone") == ("PermanentError", "gone")
    assert split_error("KeyError") == ("KeyError", "")
    assert split_error("worker died while running", "stalled") == (
        "stalled",
        "worker died while running",
    )
    traceback = (
        'Traceback (most recent call last):\n  File "x.py", line 1\n    boom()\nValueError: bad\n'
    )
    assert last_traceback_line(traceback) == "ValueError: bad"


def test_failure_prefers_the_final_meta_error_then_the_traceback() -> None:
    final = {"errors": [{"type": "network", "message": "NetworkError: down", "final": True}]}
    assert failure_of(final, "ValueError: other") == Failure("NetworkError", "down", "network")
    not_final = {"errors": [{"type": "transient", "message": "TransientError: x", "final": False}]}
    assert failure_of(not_final, "Traceback...\nJobTimeoutException: 300s").exc_class == (
        "JobTimeoutException"
    )
    assert failure_of(not_final).exc_class == "TransientError"
    assert failure_of({}, None).message == "no error was recorded"
    same = Failure("A", "took 5 ms").fingerprint
    assert same == Failure("A", "took 99 ms").fingerprint
    assert same != Failure("B", "took 5 ms").fingerprint


# --- the index -----------------------------------------------------------------------------


def _index(client: redis.Redis) -> DeadLetterIndex:
    return DeadLetterIndex("intent-fulfillment", client)


def test_groups_with_counts_and_first_last_seen(redis_client: redis.Redis) -> None:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    fill_dead_letter_queue(redis_client, 10, failed_at=base)
    index = _index(redis_client)
    report = index.sync(budget=None)
    assert report.complete and report.indexed == 10
    groups = index.groups()
    assert len(groups) == len(KINDS) == index.group_count()
    assert sum(g.count for g in groups) == 10
    transient = next(g for g in groups if g.exc_class == "TransientError")
    assert transient.count == 2
    assert transient.message == "RPC timeout after <n> ms calling <address>"
    assert transient.example.startswith("RPC timeout after 13 ms")
    assert transient.error_type == "transient"
    # job 0 failed 10 s before `base`, job 5 five seconds later
    assert transient.first_seen == base - timedelta(seconds=10)
    assert transient.last_seen == base - timedelta(seconds=5)
    ids = [job_id for job_id, _ in index.job_ids(transient.fingerprint)]
    assert len(ids) == 2 and ids[0].endswith(f"{5:064x}")  # newest first


def test_sync_follows_new_removed_and_refailed_jobs(redis_client: redis.Redis) -> None:
    index = _index(redis_client)
    ids = fill_dead_letter_queue(redis_client, 6)
    index.sync(budget=None)
    assert index.total() == 6
    # Removed by someone else (django-rq, retention, the service).
    redis_client.zrem("rq:failed:intent-fulfillment", ids[0], ids[1])
    # New failures in another priority band.
    fill_dead_letter_queue(redis_client, 3, band="intent-fulfillment-p1", start=100)
    report = index.sync(budget=None)
    assert report.complete and index.total() == 7
    assert sum(g.count for g in index.groups()) == 7
    # A job that failed again with another error moves to that error's group.
    victim = ids[2]
    meta = json.loads(redis_client.hget(f"rq:job:{victim}", "meta"))
    meta["errors"].append(
        {"attempt": 1, "type": "permanent", "message": "PermanentError: gone for good",
         "final": True}
    )  # fmt: skip
    redis_client.hset(f"rq:job:{victim}", "meta", json.dumps(meta))
    redis_client.hdel(f"rq:job:{victim}", "ended_at")
    redis_client.zadd("rq:failed:intent-fulfillment", {victim: int(time.time()) + FAILED_TTL + 50})
    index.sync(budget=None)
    moved = index.fingerprints_of([victim])[victim]
    assert index.group(moved).message == "gone for good"  # type: ignore[union-attr]
    assert index.total() == 7 and sum(g.count for g in index.groups()) == 7


def test_missing_job_hashes_form_their_own_group(redis_client: redis.Redis) -> None:
    ids = fill_dead_letter_queue(redis_client, 2)
    redis_client.delete(f"rq:job:{ids[0]}")
    index = _index(redis_client)
    index.sync(budget=None)
    classes = {g.exc_class: g.count for g in index.groups()}
    assert classes[MISSING_CLASS] == 1
    rows = load_rows(redis_client, index.job_ids())
    assert {r.exists for r in rows} == {True, False}


def test_forget_and_reset(redis_client: redis.Redis) -> None:
    ids = fill_dead_letter_queue(redis_client, 4)
    index = _index(redis_client)
    index.sync(budget=None)
    index.forget(ids[:2])
    assert index.total() == 2 and sum(g.count for g in index.groups()) == 2
    index.reset()
    assert index.total() == 0 and not redis_client.keys("intentqueue:dlq:*")
    index.sync(budget=None, full=True)
    assert index.total() == 4  # still in RQ's registry: indexed again


def test_budgeted_sync_resumes_where_it_stopped(redis_client: redis.Redis) -> None:
    fill_dead_letter_queue(redis_client, 3000)
    index = _index(redis_client)
    report = index.sync(budget=0)
    assert report.pending == 3000 - 1000 and report.indexed == 1000
    while not index.sync(budget=0).complete:
        pass
    assert index.total() == 3000
    assert sum(g.count for g in index.groups(limit=100)) == 3000


def test_concurrent_sync_reports_busy(redis_client: redis.Redis) -> None:
    fill_dead_letter_queue(redis_client, 2)
    index = _index(redis_client)
    lock = redis_client.lock("intentqueue:dlq:intent-fulfillment:lock", timeout=5)
    assert lock.acquire(blocking=False)
    try:
        assert index.sync().busy
    finally:
        lock.release()
    assert index.sync().complete


def test_rows_read_intent_and_error_from_the_job(redis_client: redis.Redis) -> None:
    fill_dead_letter_queue(redis_client, 1, intents=[(42, "0x" + "ab" * 32)])
    index = _index(redis_client)
    index.sync(budget=None)
    (row,) = load_rows(redis_client, index.job_ids())
    assert row.intent_id == 42 and row.intent_hash == "0x" + "ab" * 32
    assert row.attempts == 3 and row.failure.exc_class == "TransientError"
    assert row.origin == "intent-fulfillment" and row.worker == "worker-1"


@pytest.mark.slow
def test_index_of_100k_failed_jobs_is_fast_once_built(redis_client: redis.Redis) -> None:
    count = int(os.environ.get("DLQ_PERF_JOBS", "100000"))
    started = time.perf_counter()
    fill_dead_letter_queue(redis_client, count)
    filled = time.perf_counter() - started
    index = _index(redis_client)
    started = time.perf_counter()
    report = index.sync(budget=0.3)
    first = time.perf_counter() - started
    assert first < 1.5, first  # bounded by the budget, whatever the size
    assert report.pending > 0
    started = time.perf_counter()
    while not index.sync(budget=None).complete:
        pass
    built = time.perf_counter() - started
    assert index.total() == count
    started = time.perf_counter()
    for _ in range(10):
        index.sync()
        groups = index.groups()
        load_rows(redis_client, index.job_ids(groups[0].fingerprint, offset=5000))
    steady = (time.perf_counter() - started) / 10
    print(
        f"\n{count} failed jobs: written in {filled:.1f}s, first budgeted sync {first:.2f}s, "
        f"index built in {built:.1f}s more, sync + groups + a page of rows {steady * 1000:.0f} ms"
    )
    assert steady < 0.2, steady
