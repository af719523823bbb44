"""Queue metrics from counters the workers update as jobs end (never by scanning registries).

After each job a worker adds, in the round trip it already makes:
- to a per-minute hash ``intentqueue:stats:<queue>:<minute>`` (kept two hours): ``completed``,
  ``failed`` (final: into the dead-letter queue), ``retried`` (an attempt failed and will
  be retried), ``duration_ms`` (sum over completed and failed runs);
- to a running total hash ``intentqueue:totals:<queue>`` the same fields (for Prometheus
  counters), and on a final failure one point to ``intentqueue:failure-reasons:<queue>:<hour>``.

``QueueMetrics`` reads them back with the registry sizes, in two pipelined round trips.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis import Redis

from intentqueue.queues import KEY_PREFIX, PAUSED_KEY, Stage

#: Per-minute buckets kept (two hours, of which the last hour is reported).
BUCKET_TTL = 2 * 3600
MINUTES = 60
OUTCOMES = ("completed", "failed", "retried")
LAST_PROCESSED_KEY = f"{KEY_PREFIX}:last-processed:{{}}"

_VOLATILE = re.compile(r"0x[0-9a-fA-F]+|\b[0-9a-f]{8}-[0-9a-f-]{27}\b|\d+")


def minute_of(timestamp: float) -> int:
    """The minute bucket a Unix timestamp falls in."""
    return int(timestamp // 60)


def stats_key(queue: str, minute: int) -> str:
    """Key of a queue's counters for one minute."""
    return f"{KEY_PREFIX}:stats:{queue}:{minute}"


def totals_key(queue: str) -> str:
    """Key of a queue's running totals."""
    return f"{KEY_PREFIX}:totals:{queue}"


def reasons_key(queue: str, hour: int) -> str:
    """Key of a queue's failure reasons in one hour."""
    return f"{KEY_PREFIX}:failure-reasons:{queue}:{hour}"


def fingerprint(error_type: str, message: str) -> str:
    """A failure reason with hashes, addresses and numbers replaced, for grouping."""
    return f"{error_type}: {_VOLATILE.sub('#', message)[:160]}"


_JOB_END_SCRIPT = """
local now, outcome, duration, reason, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local last, bucket, totals, reasons = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
redis.call('SET', last, now)
if outcome ~= '' then
  redis.call('HINCRBY', bucket, outcome, 1)
  redis.call('HINCRBY', totals, outcome, 1)
end
if duration ~= '' then
  for _, key in ipairs({bucket, totals}) do
    redis.call('HINCRBYFLOAT', key, 'duration_ms', duration)
    redis.call('HINCRBY', key, 'timed', 1)
  end
end
redis.call('EXPIRE', bucket, ttl)
if reason ~= '' then
  redis.call('ZINCRBY', reasons, 1, reason)
  redis.call('EXPIRE', reasons, ttl)
end
return 1
"""


def record_job_end(
    pipe: Any,
    queue: str,
    *,
    outcome: str,
    duration_ms: float | None,
    now: float,
    reason: str | None = None,
) -> None:
    """Queue the counter updates for one finished run on ``pipe`` (no round trip here):
    one script, so a job's metrics cost one command."""
    counted = outcome if outcome in OUTCOMES else ""
    timed = duration_ms is not None and outcome in ("completed", "failed")
    keys = (
        LAST_PROCESSED_KEY.format(queue), stats_key(queue, minute_of(now)), totals_key(queue),
        reasons_key(queue, int(now // 3600)),
    )  # fmt: skip
    args = (repr(now), counted, repr(duration_ms) if timed else "", reason or "", BUCKET_TTL)
    pipe.eval(_JOB_END_SCRIPT, len(keys), *keys, *args)


@dataclass
class QueueSnapshot:
    """Everything known about one queue at one moment."""

    queue: str
    waiting: int
    active: int
    completed: int
    failed: int
    delayed: int
    stalled: int
    paused: bool
    workers: int
    last_processed_at: datetime | None
    oldest_waiting_age_s: float | None
    per_minute: list[dict[str, Any]]
    totals: dict[str, float]
    top_failure_reasons: list[tuple[str, int]]

    def _window(self, minutes: int) -> dict[str, float]:
        rows = self.per_minute[-minutes:]
        return {k: sum(r[k] for r in rows) for k in (*OUTCOMES, "duration_ms", "timed")}

    @property
    def jobs_per_minute(self) -> float:
        """Runs ended per minute over the last five minutes."""
        window = self._window(5)
        return round((window["completed"] + window["failed"] + window["retried"]) / 5, 2)

    @property
    def success_rate(self) -> float | None:
        """Share of runs in the last hour that completed (None without runs)."""
        window = self._window(MINUTES)
        runs = window["completed"] + window["failed"] + window["retried"]
        return round(window["completed"] / runs, 4) if runs else None

    @property
    def avg_duration_ms(self) -> float | None:
        """Mean run time in the last hour (None without runs)."""
        window = self._window(MINUTES)
        return round(window["duration_ms"] / window["timed"], 2) if window["timed"] else None

    def as_dict(self) -> dict[str, Any]:
        """The spec's metrics plus rates, durations and the last hour per minute."""
        return {
            "queue": self.queue,
            "waiting": self.waiting,
            "active": self.active,
            "completed": self.completed,
            "failed": self.failed,
            "delayed": self.delayed,
            "stalled": self.stalled,
            "paused": self.paused,
            "workers": self.workers,
            "last_processed_at": self.last_processed_at,
            "oldest_waiting_age_s": self.oldest_waiting_age_s,
            "jobs_per_minute": self.jobs_per_minute,
            "success_rate": self.success_rate,
            "avg_duration_ms": self.avg_duration_ms,
            "per_minute": self.per_minute,
            "totals": self.totals,
            "top_failure_reasons": self.top_failure_reasons,
        }


class QueueMetrics:
    """Reads a queue's snapshot from Redis."""

    def __init__(self, connection: Redis) -> None:
        self.connection = connection

    def snapshot(self, target: Stage, now: float | None = None) -> QueueSnapshot:
        """One queue's counts, rates and last hour, in two pipelined round trips."""
        now = time.time() if now is None else now
        names = target.rq_names
        current = minute_of(now)
        minutes = list(range(current - MINUTES + 1, current + 1))
        hour = int(now // 3600)
        with self.connection.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.llen(f"rq:queue:{name}")
                pipe.zcard(f"rq:wip:{name}")
                pipe.zcard(f"rq:finished:{name}")
                pipe.zcard(f"rq:failed:{name}")
                pipe.zcard(f"rq:scheduled:{name}")
                pipe.zcount(f"rq:wip:{name}", "-inf", now)
                pipe.lindex(f"rq:queue:{name}", 0)
            pipe.sismember(PAUSED_KEY, target.name)
            pipe.get(LAST_PROCESSED_KEY.format(target.name))
            for minute in minutes:
                pipe.hgetall(stats_key(target.name, minute))
            pipe.hgetall(totals_key(target.name))
            for h in (hour - 1, hour):
                pipe.zrevrange(reasons_key(target.name, h), 0, 9, withscores=True)
            results = pipe.execute()
        per_queue, rest = results[: 7 * len(names)], results[7 * len(names) :]
        counts = [sum(per_queue[i::7]) for i in range(6)]
        heads = [h.decode() for h in per_queue[6::7] if h]
        paused, last, *rest = rest
        buckets, rest = rest[:MINUTES], rest[MINUTES:]
        totals_raw, previous_reasons, current_reasons = rest
        return QueueSnapshot(
            queue=target.name,
            waiting=counts[0],
            active=counts[1],
            completed=counts[2],
            failed=counts[3],
            delayed=counts[4],
            stalled=counts[5],
            paused=bool(paused),
            workers=self._workers(names),
            last_processed_at=_from_timestamp(last),
            oldest_waiting_age_s=self._oldest_age(heads, now),
            per_minute=[_bucket(m, b) for m, b in zip(minutes, buckets, strict=True)],
            totals={k.decode(): float(v) for k, v in totals_raw.items()},
            top_failure_reasons=_merge_reasons(previous_reasons, current_reasons),
        )

    def _workers(self, names: list[str]) -> int:
        """Live workers serving any of the queue's RQ queues (each counted once)."""
        seen: set[str] = set()
        with self.connection.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.smembers(f"rq:workers:{name}")
            for members in pipe.execute():
                seen.update(m.decode() for m in members)
        if not seen:
            return 0
        with self.connection.pipeline(transaction=False) as pipe:
            for key in seen:
                pipe.exists(key)
            return sum(pipe.execute())

    def _oldest_age(self, head_ids: list[str], now: float) -> float | None:
        """Age of the oldest waiting job (the heads of the queue's lists)."""
        if not head_ids:
            return None
        with self.connection.pipeline(transaction=False) as pipe:
            for job_id in head_ids:
                pipe.hget(f"rq:job:{job_id}", "enqueued_at")
            stamps = [_parse_rq_time(v) for v in pipe.execute()]
        known = [s for s in stamps if s is not None]
        return round(now - min(known), 3) if known else None


def _bucket(minute: int, raw: dict[bytes, bytes]) -> dict[str, Any]:
    values = {k.decode(): float(v) for k, v in raw.items()}
    return {
        "minute": datetime.fromtimestamp(minute * 60, tz=UTC),
        "completed": int(values.get("completed", 0)),
        "failed": int(values.get("failed", 0)),
        "retried": int(values.get("retried", 0)),
        "duration_ms": values.get("duration_ms", 0.0),
        "timed": int(values.get("timed", 0)),
    }


def _merge_reasons(*hours: list[tuple[bytes, float]]) -> list[tuple[str, int]]:
    merged: dict[str, int] = {}
    for rows in hours:
        for reason, score in rows:
            merged[reason.decode()] = merged.get(reason.decode(), 0) + int(score)
    return sorted(merged.items(), key=lambda item: (-item[1], item[0]))[:10]


def _from_timestamp(value: bytes | None) -> datetime | None:
    return datetime.fromtimestamp(float(value), tz=UTC) if value else None


def _parse_rq_time(value: bytes | None) -> float | None:
    if not value:
        return None
    text = value.decode()
    for fmt in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=UTC).timestamp()
        except ValueError:
            continue
    return None
