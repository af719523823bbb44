"""Retention: keep the last ``remove_on_complete`` / ``remove_on_fail`` jobs of a queue."""

from __future__ import annotations

from redis import Redis
from rq.job import Job

from intentqueue.conf import JobOptions
from intentqueue.queues import Stage


def _trim(connection: Redis, keys: list[str], keep: int | None) -> int:
    """Delete the oldest jobs of the registries ``keys`` beyond ``keep`` in all; returns how
    many. Scores are expiry times, so the lowest scores are the oldest entries."""
    if keep is None:
        return 0
    with connection.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.zcard(key)
        excess = sum(pipe.execute()) - keep
    if excess <= 0:
        return 0
    with connection.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.zrange(key, 0, excess - 1, withscores=True)
        oldest = sorted(
            ((score, key, job_id) for key, rows in zip(keys, pipe.execute(), strict=True)
             for job_id, score in rows),
        )[:excess]  # fmt: skip
    with connection.pipeline(transaction=False) as pipe:
        for _, key, raw_id in oldest:
            job_id = raw_id.decode()
            pipe.zrem(key, raw_id)
            pipe.delete(Job.key_for(job_id), f"rq:results:{job_id}")
        pipe.execute()
    return len(oldest)


def registry_keys(stage: Stage) -> tuple[list[str], list[str]]:
    """The finished and failed registry keys of all of a stage's RQ queues."""
    return (
        [f"rq:finished:{name}" for name in stage.rq_names],
        [f"rq:failed:{name}" for name in stage.rq_names],
    )


def over_limit(stage: Stage, finished: int, failed: int) -> bool:
    """Whether these counts exceed the stage's retention."""
    options = stage.options
    keep_finished = JobOptions.keep_count(options.remove_on_complete)
    keep_failed = JobOptions.keep_count(options.remove_on_fail)
    return (keep_finished is not None and finished > keep_finished) or (
        keep_failed is not None and failed > keep_failed
    )


def trim_registries(connection: Redis, stage: Stage) -> tuple[int, int]:
    """Apply the stage's retention; returns (completed, failed) jobs removed."""
    options: JobOptions = stage.options
    finished, failed = registry_keys(stage)
    return (
        _trim(connection, finished, JobOptions.keep_count(options.remove_on_complete)),
        _trim(connection, failed, JobOptions.keep_count(options.remove_on_fail)),
    )
