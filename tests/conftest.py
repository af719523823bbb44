"""Test fixtures: a real Redis with one flushed database index per test."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlparse, urlunparse

import pytest
import redis
from django.conf import settings
from django.test import override_settings

from intentqueue.conf import rq_queues

#: Chain fixtures (dev chains, anvil, a funded solver) for the execution tests.
pytest_plugins = ("tests.chainkit",)

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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGY_ACCEPTING = {
    "standard": {
        # No on-chain validations: these workers are configured with no chain to read.
        "class": "tests.strategies.OffChainStandardStrategy",
        "options": {"supported_chains": [1, 10]},
    }
}


def database_url() -> str:
    """A URL of the test database, for processes started by a test."""
    from django.db import connection

    params = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{params['NAME']}"
    user = params.get("USER") or "postgres"
    auth = f"{user}:{params['PASSWORD']}@" if params.get("PASSWORD") else f"{user}@"
    return f"postgres://{auth}{params['HOST']}:{params['PORT'] or 5432}/{params['NAME']}"


class Workers:
    """Starts real ``manage.py rqworker`` processes on the test's Redis and database."""

    def __init__(self, redis_url: str, tmp_dir: str) -> None:
        self.redis_url = redis_url
        self.tmp_dir = tmp_dir
        self.overrides: dict[str, object] = {"strategies": STRATEGY_ACCEPTING}
        self.procs: list[subprocess.Popen[bytes]] = []
        #: More environment variables for the worker processes (keys, OTEL_*, LOG_*).
        self.extra_env: dict[str, str] = {}

    def configure(self, **overrides: object) -> override_settings:
        """INTENTQUEUE overrides for this test and its workers; use as a context manager."""
        self.overrides.update(overrides)
        return override_settings(
            INTENTQUEUE=self.settings(),
            RQ_QUEUES=rq_queues(self.settings(), {"URL": self.redis_url}),
        )

    def settings(self) -> dict[str, object]:
        return {"redis": {"url": self.redis_url}, **self.overrides}

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DJANGO_SETTINGS_MODULE="project.test_settings",
            REDIS_URL=self.redis_url,
            DATABASE_URL=database_url(),
            INTENTQUEUE_TEST_SETTINGS=json.dumps(self.settings()),
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env

    def start(self, queue: str = "intent-fulfillment", *args: str) -> subprocess.Popen[bytes]:
        log = open(os.path.join(self.tmp_dir, f"worker-{len(self.procs)}.log"), "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "rqworker", queue, *args],
            cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the worker and its scheduler
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def run_burst(self, queue: str = "intent-fulfillment", timeout: float = 60) -> str:
        """Run one worker until its queue is empty; returns what it printed."""
        result = subprocess.run(
            [sys.executable, "manage.py", "rqworker", queue, "--burst"],
            cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=timeout,
            check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout + result.stderr

    def logs(self, tail: int | None = 4000) -> str:
        """What the worker processes wrote (the last ``tail`` characters of each)."""
        out = []
        for index in range(len(self.procs)):
            with open(os.path.join(self.tmp_dir, f"worker-{index}.log"), errors="replace") as f:
                text = f.read()
            out.append(f"--- worker {index}\n{text[-tail:] if tail else text}")
        return "\n".join(out)

    @staticmethod
    def kill(proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL a worker and its scheduler, as when its machine dies."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        """SIGTERM every worker (warm shutdown); kill what is left after 15 s."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # anything it left behind


@pytest.fixture
def workers(redis_url: str, tmp_path: object) -> Iterator[Workers]:
    """Real worker processes (stopped at the end of the test)."""
    pool = Workers(redis_url, str(tmp_path))
    with pool.configure():
        yield pool
    pool.stop_all()


def wait_for(predicate: Callable[[], object], timeout: float = 30, interval: float = 0.1) -> None:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")
