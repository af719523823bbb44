"""Prometheus exposition of the queue metrics (read from Redis and the database at scrape)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from django.db.models import Count
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from intentqueue.health import check_health
from intentqueue.models import Intent
from intentqueue.status import IntentStatus

STATES = ("waiting", "active", "completed", "failed", "delayed", "stalled")


class QueueCollector(Collector):
    """Builds every intentqueue metric family from one health check."""

    def collect(self) -> Iterator[Metric]:
        health = check_health()
        yield _gauge(
            "intentqueue_redis_up",
            "1 if Redis answers.",
            [((), health["redis_status"] == "connected")],
        )
        yield _gauge(
            "intentqueue_healthy", "1 if every health rule holds.", [((), health["is_healthy"])]
        )
        queues: dict[str, dict[str, Any]] = health["queues"]
        jobs = GaugeMetricFamily(
            "intentqueue_queue_jobs", "Jobs of a queue by state.", labels=["queue", "state"]
        )
        for name, m in queues.items():
            for state in STATES:
                jobs.add_metric([name, state], m[state])
        yield jobs
        per_queue = {
            "intentqueue_queue_paused": ("1 if the queue is paused.", "paused"),
            "intentqueue_queue_workers": ("Live workers serving the queue.", "workers"),
            "intentqueue_queue_oldest_waiting_age_seconds": (
                "Age of the oldest waiting job.", "oldest_waiting_age_s",
            ),
            "intentqueue_queue_jobs_per_minute": (
                "Runs ended per minute (last 5 minutes).", "jobs_per_minute",
            ),
        }  # fmt: skip
        for metric, (doc, key) in per_queue.items():
            yield _gauge(metric, doc, [((n,), m[key] or 0) for n, m in queues.items()], ["queue"])
        yield _gauge(
            "intentqueue_queue_last_processed_timestamp_seconds",
            "When the queue last finished a run (Unix time).",
            [((n,), m["last_processed_at"].timestamp() if m["last_processed_at"] else 0)
             for n, m in queues.items()],
            ["queue"],
        )  # fmt: skip
        runs = CounterMetricFamily(
            "intentqueue_job_runs", "Job runs ended, by outcome.", labels=["queue", "outcome"]
        )
        durations = SummaryMetricFamily(
            "intentqueue_job_duration_seconds", "Run time of completed and failed runs.",
            labels=["queue"],
        )  # fmt: skip
        for name, m in queues.items():
            totals = m["totals"]
            for outcome in ("completed", "failed", "retried"):
                runs.add_metric([name, outcome], totals.get(outcome, 0))
            durations.add_metric(
                [name], count_value=totals.get("timed", 0),
                sum_value=totals.get("duration_ms", 0) / 1000,
            )  # fmt: skip
        yield runs
        yield durations
        breakers: dict[str, dict[str, Any]] = health.get("breakers", {})
        yield _gauge(
            "intentqueue_circuit_open", "1 if the chain's RPC circuit breaker is open.",
            [((c,), b["state"] == "open") for c, b in breakers.items()], ["chain"],
        )  # fmt: skip
        yield _gauge(
            "intentqueue_circuit_failures", "Consecutive RPC network failures of the chain.",
            [((c,), b["failures"]) for c, b in breakers.items()], ["chain"],
        )  # fmt: skip
        counts = dict(
            Intent.objects.order_by()
            .values_list("status")
            .annotate(n=Count("id"))
            .values_list("status", "n")
        )
        yield _gauge(
            "intentqueue_intents", "Intents in the database by status.",
            [((s.value,), counts.get(s.value, 0)) for s in IntentStatus], ["status"],
        )  # fmt: skip


def _gauge(
    name: str, doc: str, samples: list[tuple[tuple[str, ...], Any]], labels: list[str] | None = None
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels or [])
    for label_values, value in samples:
        family.add_metric(list(label_values), float(value))
    return family


def exposition() -> bytes:
    """The metrics in Prometheus' text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector())
    return generate_latest(registry)
