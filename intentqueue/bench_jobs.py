"""The benchmark baseline's jobs: bare RQ no-op jobs, importable without Django."""

from __future__ import annotations

from rq import Queue, get_current_job


def noop_job() -> None:
    """The second stage: does nothing."""


def noop_first(next_queue: str) -> None:
    """The first stage: enqueues the second on ``next_queue`` through its own connection."""
    job = get_current_job()
    assert job is not None
    Queue(next_queue, connection=job.connection, serializer=job.serializer).enqueue(
        noop_job, result_ttl=60
    )
