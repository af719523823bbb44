"""Queue health: the spec's QueueHealth, with rules an on-call engineer can read.

A deployment is healthy when all of these hold (``problems`` lists each one that does
not, so a failing probe says why):
1. Redis answers (``redis_status`` is ``connected``);
2. no queue is paused (a paused queue starts nothing; pausing is deliberate, but it is
   reported so nobody forgets one);
3. every queue has at least one live worker (``INTENTQUEUE.health.require_workers``);
4. no queue's oldest waiting job is older than ``INTENTQUEUE.health.max_waiting_age``
   seconds (work is arriving faster than it is done, or nothing is taking it);
5. Redis does not evict keys (``maxmemory-policy`` is ``noeviction``: any other policy
   silently drops jobs under memory pressure) and uses at most
   ``INTENTQUEUE.health.max_memory_ratio`` of its ``maxmemory``;
6. no chain's circuit breaker is open (``breakers``: state, failures, opened_at per
   chain id; see ``intentqueue.breakers``).
"""

from __future__ import annotations

import logging
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from intentqueue.breakers import OPEN, breaker_states
from intentqueue.conf import intentqueue_settings
from intentqueue.metrics import QueueMetrics
from intentqueue.queues import describe_redis_error, get_connection, stages

logger = logging.getLogger(__name__)

SPEC_COUNTS = ("waiting", "active", "completed", "failed", "delayed")


def queue_problems(metrics: dict[str, Any]) -> list[str]:
    """What is wrong with one queue, by the rules above."""
    rules = intentqueue_settings.health
    problems = []
    if metrics["paused"]:
        problems.append("paused")
    if rules.require_workers and not metrics["workers"]:
        problems.append("no live worker")
    age = metrics["oldest_waiting_age_s"]
    if age is not None and age > rules.max_waiting_age:
        problems.append(f"oldest waiting job is {age:.0f}s old (limit {rules.max_waiting_age}s)")
    return problems


def redis_memory(connection: Redis) -> dict[str, Any]:
    """Redis memory use, limit and eviction policy (``INFO memory``)."""
    info = connection.info("memory")
    used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
    return {
        "used_memory": used,
        "maxmemory": limit,
        "maxmemory_policy": str(info.get("maxmemory_policy", "")),
        "used_ratio": round(used / limit, 4) if limit else None,
    }


def memory_problems(memory: dict[str, Any]) -> list[str]:
    """What is wrong with Redis's memory settings, by rule 5."""
    problems = []
    policy = memory["maxmemory_policy"]
    if policy and policy != "noeviction":
        problems.append(
            f"maxmemory-policy is {policy}: an evicting Redis silently drops jobs "
            "(set it to noeviction)"
        )
    ratio, limit = memory["used_ratio"], intentqueue_settings.health.max_memory_ratio
    if ratio is not None and ratio > limit:
        problems.append(f"memory at {ratio:.0%} of maxmemory (limit {limit:.0%})")
    return problems


def check_health(connection: Redis | None = None) -> dict[str, Any]:
    """``is_healthy``, ``metrics`` (the spec's counts over all queues), ``redis_status``,
    ``last_processed_at``, ``queues`` (each queue's metrics and problems), ``problems``."""
    connection = connection or get_connection()
    try:
        connection.ping()
        memory = redis_memory(connection)
        reader = QueueMetrics(connection)
        queues = {s.name: reader.snapshot(s).as_dict() for s in stages()}
        breakers = breaker_states(connection)
    except RedisError as error:
        problem = describe_redis_error(error, connection)
        logger.warning("health: %s", problem)
        return {
            "is_healthy": False,
            "metrics": dict.fromkeys(SPEC_COUNTS, 0),
            "redis_status": "disconnected",
            "last_processed_at": None,
            "queues": {},
            "redis": {},
            "breakers": {},
            "problems": [problem],
        }
    problems = [f"redis: {p}" for p in memory_problems(memory)]
    for name, metrics in queues.items():
        metrics["problems"] = queue_problems(metrics)
        problems += [f"{name}: {p}" for p in metrics["problems"]]
    problems += [f"chain {c}: circuit open" for c, b in breakers.items() if b["state"] == OPEN]
    processed = [m["last_processed_at"] for m in queues.values() if m["last_processed_at"]]
    return {
        "is_healthy": not problems,
        "metrics": {k: sum(m[k] for m in queues.values()) for k in SPEC_COUNTS},
        "redis_status": "connected",
        "last_processed_at": max(processed) if processed else None,
        "queues": queues,
        "redis": memory,
        "breakers": breakers,
        "problems": problems,
    }
