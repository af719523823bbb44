"""Protective controls of the execution stage: a circuit breaker and an in-flight bound
per destination chain, their state in Redis and shared by every worker.

Circuit breaker (one per chain RPC endpoint)::

    closed --(failure_threshold consecutive NetworkErrors)--> open
    open   --(cooldown ms elapsed; the next job becomes the probe)--> half_open
    half_open --(the probe reached the RPC)--> closed
    half_open --(the probe got a NetworkError)--> open (a new cool-down)

While a chain's breaker is open its execution jobs are held with ``RecheckLater`` (no
attempt used) for the rest of the cool-down; other chains keep running. An operator may
open or close a breaker by hand (``QueueService.open_breaker``/``close_breaker``); a
breaker opened by hand stays open until it is closed by hand.

In-flight bound: at most ``breakers.max_in_flight_per_chain`` execution jobs of one
chain run at once (a sorted set of job ids scored by start time; entries older than
``worker.lock_duration`` belong to dead workers and are dropped), so a slow chain never
occupies every execution worker. A job that finds its chain full is held for a second.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from redis import Redis

from intentqueue.conf import intentqueue_settings
from intentqueue.exceptions import NetworkError, RecheckLater

KEY_PREFIX: Final = "intentqueue:breaker:"
INFLIGHT_PREFIX: Final = "intentqueue:inflight:"
#: Set of chain ids that have a breaker hash (health reads it instead of scanning keys).
INDEX_KEY: Final = "intentqueue:breakers"
CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"
#: Seconds a job waits for a free in-flight slot of its chain.
INFLIGHT_RECHECK_SECONDS: Final = 1


def _connection(connection: Redis | None) -> Redis:
    if connection is not None:
        return connection
    from intentqueue.queues import get_connection

    return get_connection()


def _key(chain_id: int | str) -> str:
    return f"{KEY_PREFIX}{chain_id}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


@dataclass(frozen=True)
class BreakerState:
    """One chain's breaker as read from Redis."""

    chain_id: str
    state: str = CLOSED
    failures: int = 0
    opened_at: float | None = None
    manual: bool = False
    #: Seconds until an open breaker lets a probe through (0 when not open).
    remaining: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state, "failures": self.failures, "opened_at": self.opened_at,
            "manual": self.manual, "remaining_s": round(self.remaining, 3),
        }  # fmt: skip


class CircuitBreaker:
    """The breaker of one chain's RPC endpoint."""

    def __init__(self, chain_id: int | str, connection: Redis | None = None) -> None:
        self.chain_id = str(chain_id)
        self.connection = _connection(connection)
        self.key = _key(self.chain_id)
        self.probe_key = f"{self.key}:probe"
        config = intentqueue_settings.breakers
        self.threshold = config.failure_threshold
        self.cooldown = config.cooldown / 1000

    def read(self) -> BreakerState:
        raw = {_text(k): _text(v) for k, v in self.connection.hgetall(self.key).items()}
        state = raw.get("state") or CLOSED
        opened_at = float(raw["opened_at"]) if raw.get("opened_at") else None
        remaining = 0.0
        if state == OPEN and opened_at is not None:
            remaining = max(0.0, opened_at + self.cooldown - time.time())
        return BreakerState(
            self.chain_id, state, int(raw.get("failures") or 0), opened_at,
            raw.get("manual") == "1", remaining,
        )  # fmt: skip

    def before_call(self, job_id: str = "") -> None:
        """Let a job through, or hold it (``RecheckLater``) while the breaker is open."""
        current = self.read()
        if current.state == CLOSED:
            return
        if current.manual:
            raise RecheckLater(
                f"chain {self.chain_id}: circuit opened by an operator", max(1, int(self.cooldown))
            )
        if current.state == OPEN and current.remaining > 0:
            raise RecheckLater(
                f"chain {self.chain_id}: circuit open ({current.failures} RPC failures)",
                max(1, int(current.remaining + 0.999)),
            )
        # Cool-down over (or a half-open probe whose holder died): one job probes.
        token = job_id or "probe"
        if self.connection.set(self.probe_key, token, nx=True, px=int(self.cooldown * 1000) + 1):
            self.connection.hset(self.key, "state", HALF_OPEN)
            return
        if _text(self.connection.get(self.probe_key)) == token:
            return  # the probe itself, run again
        raise RecheckLater(f"chain {self.chain_id}: circuit half-open, a probe is running", 1)

    def record_success(self) -> None:
        """The RPC answered: a run of failures ends, a half-open breaker closes."""
        current = self.read()
        if current.manual or (current.state == CLOSED and not current.failures):
            return
        if current.state == OPEN and current.remaining > 0:
            return  # a job that started before the breaker opened
        pipe = self.connection.pipeline()
        pipe.hset(self.key, mapping={"state": CLOSED, "failures": 0, "opened_at": ""})
        pipe.delete(self.probe_key)
        pipe.execute()

    def record_failure(self) -> None:
        """The RPC was unreachable: count it; open at the threshold or after a probe."""
        self.connection.sadd(INDEX_KEY, self.chain_id)
        failures = int(self.connection.hincrby(self.key, "failures", 1))
        state = _text(self.connection.hget(self.key, "state")) or CLOSED
        if state == HALF_OPEN or (state == CLOSED and failures >= self.threshold):
            self._open(manual=False)

    def _open(self, *, manual: bool) -> None:
        pipe = self.connection.pipeline()
        pipe.sadd(INDEX_KEY, self.chain_id)
        pipe.hset(
            self.key,
            mapping={"state": OPEN, "opened_at": repr(time.time()), "manual": int(manual)},
        )
        pipe.delete(self.probe_key)
        pipe.execute()

    def force_open(self) -> None:
        """Open by hand: stays open until ``force_close``."""
        self._open(manual=True)

    def force_close(self) -> None:
        """Close by hand and forget the failures."""
        pipe = self.connection.pipeline()
        pipe.sadd(INDEX_KEY, self.chain_id)
        pipe.hset(self.key, mapping={"state": CLOSED, "failures": 0, "opened_at": "", "manual": 0})
        pipe.delete(self.probe_key)
        pipe.execute()

    @contextlib.contextmanager
    def guard(self, job_id: str = "") -> Iterator[None]:
        """Check the breaker, then record how the block's RPC use went: a ``NetworkError``
        is a failure; anything else means the endpoint answered."""
        from intentqueue.chain.client import classify

        self.before_call(job_id)
        try:
            yield
        except RecheckLater:
            self.record_success()
            raise
        except Exception as error:
            if isinstance(classify(error), NetworkError):
                self.record_failure()
            else:
                self.record_success()
            raise
        self.record_success()


def breaker_chain_ids(connection: Redis | None = None) -> list[str]:
    """Chain ids with a configured chain or a breaker in Redis, sorted."""
    found = {str(c) for c in intentqueue_settings.chains}
    found.update(_text(c) for c in _connection(connection).smembers(INDEX_KEY))
    return sorted(found, key=lambda c: (len(c), c))


def breaker_states(connection: Redis | None = None) -> dict[str, dict[str, Any]]:
    """Every breaker's state, by chain id."""
    connection = _connection(connection)
    return {
        chain_id: CircuitBreaker(chain_id, connection).read().as_dict()
        for chain_id in breaker_chain_ids(connection)
    }


# --- in-flight bound ---------------------------------------------------------------------

_ACQUIRE = """
local key, member = KEYS[1], ARGV[1]
local now, stale, limit = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', key, '-inf', stale)
if redis.call('ZSCORE', key, member) or redis.call('ZCARD', key) < limit then
  redis.call('ZADD', key, now, member)
  redis.call('PEXPIRE', key, ARGV[5])
  return 1
end
return 0
"""


class InFlightLimit:
    """At most ``breakers.max_in_flight_per_chain`` running execution jobs per chain."""

    def __init__(self, chain_id: int | str, connection: Redis | None = None) -> None:
        self.chain_id = str(chain_id)
        self.connection = _connection(connection)
        self.key = f"{INFLIGHT_PREFIX}{self.chain_id}"
        self.limit = intentqueue_settings.breakers.max_in_flight_per_chain
        self.lock_ms = intentqueue_settings.worker.lock_duration

    def count(self) -> int:
        stale = time.time() - self.lock_ms / 1000
        return int(self.connection.zcount(self.key, f"({stale}", "+inf"))

    @contextlib.contextmanager
    def slot(self, job_id: str) -> Iterator[None]:
        """Hold a slot for the block, or raise ``RecheckLater`` when the chain is full."""
        if self.limit <= 0:
            yield
            return
        member = job_id or f"anonymous:{time.time()}"
        now = time.time()
        acquired = self.connection.eval(
            _ACQUIRE, 1, self.key, member, repr(now), repr(now - self.lock_ms / 1000),
            self.limit, self.lock_ms * 2,
        )  # fmt: skip
        if not int(acquired):
            raise RecheckLater(
                f"chain {self.chain_id}: {self.limit} execution jobs in flight",
                INFLIGHT_RECHECK_SECONDS,
            )
        try:
            yield
        finally:
            self.connection.zrem(self.key, member)
