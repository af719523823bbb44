"""Test fixtures: a real Redis with one flushed database index per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from urllib.parse import urlparse, urlunparse

import pytest
import redis
from django.conf import settings
from django.test import override_settings

from intentqueue.conf import rq_queues

#: Database indexes the suite may flush; 0 (where apps usually live) is never touched.
TEST_REDIS_DB = int(os.environ.get("TEST_REDIS_DB", "15"))


def _with_db(url: str, db: int) -> str:
    parsed = urlparse(url)
    return urlunparse(parsed._replace(path=f"/{db}"))


@pytest.fixture(autouse=True)
def redis_url() -> Iterator[str]:
    """A Redis URL on a database index of the suite's own, flushed before and after."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    db = TEST_REDIS_DB - int(worker.removeprefix("gw") or 0)
    url = _with_db(settings.TEST_REDIS_URL, db)
    client = redis.Redis.from_url(url)
    client.flushdb()
    intentqueue = {"redis": {"url": url}}
    with override_settings(INTENTQUEUE=intentqueue, RQ_QUEUES=rq_queues(intentqueue, {"URL": url})):
        yield url
    client.flushdb()
    client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the test's own Redis database."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()
