"""OpenTelemetry: one trace per intent, across the web process, both stages and retries.

- ``configure_tracing()`` (called when the app is ready) reads the standard variables:
  ``OTEL_TRACES_EXPORTER`` = ``otlp`` (with ``OTEL_EXPORTER_OTLP_*``), ``console`` or
  ``none`` (the default here: nothing is exported and spans cost next to nothing),
  ``OTEL_SERVICE_NAME``; it turns on the Django, Redis and requests (JSON-RPC)
  instrumentations when exporting.
- At enqueue, a PRODUCER span is started and its context injected into the job's meta;
  the context of the code that saved the intent is captured before the on-commit
  deferral, so the producer span is its child.
- In the worker, a CONSUMER span is started from that context around the job, so a
  retry, the execution job queued by the fulfillment job, and the chain calls all join
  the same trace. Span names and attributes follow the messaging conventions
  (``messaging.system``, ``messaging.destination.name``, ``messaging.message.id``,
  ``messaging.operation.type``) plus ``intentqueue.intent_hash`` and ``intentqueue.strategy``.
- Spans are flushed when a worker exits; console spans are written as they end.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

logger = logging.getLogger(__name__)

#: Job meta key holding the W3C trace context of the producer span.
META_KEY = "otel"
MESSAGING_SYSTEM = "rq"

tracer = trace.get_tracer("intentqueue")
_state = {"configured": False}


def configure_tracing() -> bool:
    """Install a tracer provider from the ``OTEL_*`` variables (once per process).

    Returns whether spans are exported. Does nothing when a provider was set already
    (by the application, or by ``opentelemetry-instrument``).
    """
    if _state["configured"]:
        return True
    exporters = [
        name.strip()
        for name in os.environ.get("OTEL_TRACES_EXPORTER", "none").lower().split(",")
        if name.strip() and name.strip() != "none"
    ]
    if not exporters:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    service = os.environ.get("OTEL_SERVICE_NAME", "intentqueue")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    for name in exporters:
        if name == "console":
            exporter = ConsoleSpanExporter(
                out=sys.stdout, formatter=lambda span: span.to_json(indent=None) + "\n"
            )
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        elif name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            logger.warning("OTEL_TRACES_EXPORTER: unknown exporter %r ignored", name)
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)  # flushes batched spans when a worker exits
    _instrument_libraries()
    _state["configured"] = True
    return True


def _instrument_libraries() -> None:
    from opentelemetry.instrumentation.django import DjangoInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.instrumentation.requests import RequestsInstrumentor

    for instrumentor in (DjangoInstrumentor(), RedisInstrumentor(), RequestsInstrumentor()):
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument()


def current_carrier() -> dict[str, str]:
    """The current trace context as W3C headers (empty when no span is recording)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def current_trace_id() -> str:
    """The current trace id as 32 hex digits, or '' outside a recording span."""
    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""


def _attributes(queue: str, job_id: str, operation: str, **extra: Any) -> dict[str, Any]:
    attributes = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.destination.name": queue,
        "messaging.message.id": job_id,
        "messaging.operation.type": operation,
    }
    attributes.update({f"intentqueue.{k}": v for k, v in extra.items() if v is not None})
    return attributes


@contextmanager
def producer_span(
    queue: str, job_id: str, *, parent: dict[str, str] | None = None, **extra: Any
) -> Iterator[dict[str, str]]:
    """A PRODUCER span for sending a job; yields the carrier to store in the job."""
    parent_context = propagate.extract(parent) if parent else None
    with tracer.start_as_current_span(
        f"send {queue}",
        context=parent_context,
        kind=SpanKind.PRODUCER,
        attributes=_attributes(queue, job_id, "send", **extra),
    ):
        yield current_carrier()


@contextmanager
def consumer_span(job: Any, queue: str) -> Iterator[Span]:
    """A CONSUMER span around one run of ``job``, child of its producer span."""
    carrier = job.meta.get(META_KEY) if isinstance(job.meta.get(META_KEY), dict) else None
    parent = propagate.extract(carrier) if carrier else otel_context.Context()
    data = job.args[0] if job.args and isinstance(job.args[0], dict) else {}
    with tracer.start_as_current_span(
        f"process {queue}",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes=_attributes(
            queue, job.id, "process",
            intent_hash=data.get("intentHash"), strategy=data.get("strategy"),
        ),
    ) as span:  # fmt: skip
        job.meta["trace_id"] = current_trace_id()
        yield span


def record_outcome(span: Span, outcome: str | None, error: str | None = None) -> None:
    """Mark a consumer span with the run's outcome."""
    span.set_attribute("intentqueue.outcome", outcome or "completed")
    if outcome in ("failed", "retried", "stalled"):
        span.set_status(Status(StatusCode.ERROR, error or outcome))
