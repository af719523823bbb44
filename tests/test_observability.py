"""Metrics, health, Prometheus, traces and logs, against real workers and Redis."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.db import transaction
from django.test import Client, override_settings
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from intentqueue.models import Intent
from intentqueue.services import QueueService
from intentqueue.status import IntentStatus as S
from tests.conftest import ROOT, Workers, wait_for
from tests.factories import IntentFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SCRIPTED_FAILING = {
    "standard": {
        # No on-chain validations: these workers are configured with no chain to read.
        "class": "tests.strategies.OffChainStandardStrategy",
        "options": {"supported_chains": [1, 10]},
    },
    "failing": {
        "class": "tests.strategies.ScriptedStrategy",
        "options": {"fail": "permanent", "fail_times": 99},
    },
}


@pytest.fixture(scope="session")
def span_exporter() -> InMemorySpanExporter:
    """An in-memory exporter on this process's tracer provider (installed once)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


@pytest.fixture
def spans(span_exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    span_exporter.clear()
    yield span_exporter
    span_exporter.clear()


def prometheus_samples(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_health_prometheus_and_database_agree(workers: Workers) -> None:
    with workers.configure(strategies=SCRIPTED_FAILING):
        with transaction.atomic():
            IntentFactory.create_batch(40)
            IntentFactory.create_batch(10, strategy="failing")
        workers.run_burst()
    assert Intent.objects.filter(status=S.VALIDATED).count() == 40
    assert Intent.objects.filter(status=S.FAILED).count() == 10
    metrics = QueueService().get_queue_metrics("intent-fulfillment")
    assert (metrics["completed"], metrics["failed"], metrics["waiting"]) == (40, 10, 0)
    last_hour = metrics["per_minute"]
    assert len(last_hour) == 60
    assert sum(m["completed"] for m in last_hour) == 40
    assert sum(m["failed"] for m in last_hour) == 10
    assert metrics["success_rate"] == 0.8
    assert metrics["avg_duration_ms"] > 0
    assert metrics["jobs_per_minute"] == 10.0  # 50 runs over the last five minutes
    reason, count = metrics["top_failure_reasons"][0]
    assert count == 10 and reason.startswith("permanent: PermanentError: permanent failure")
    assert metrics["last_processed_at"] is not None
    execution = QueueService().get_queue_metrics("blockchain-execution")
    assert execution["waiting"] == 40

    client = Client()
    with override_settings(INTENTQUEUE={**settings.INTENTQUEUE, "metrics_token": "s3cret"}):
        response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret")
    assert response.status_code == 200
    samples = prometheus_samples(response.content.decode())
    runs = 'intentqueue_job_runs_total{outcome="%s",queue="intent-fulfillment"}'
    assert samples[runs % "completed"] == 40
    assert samples[runs % "failed"] == 10
    jobs = 'intentqueue_queue_jobs{queue="%s",state="%s"}'
    assert samples[jobs % ("intent-fulfillment", "completed")] == 40
    assert samples[jobs % ("blockchain-execution", "waiting")] == 40
    assert samples['intentqueue_intents{status="VALIDATED"}'] == 40
    assert samples['intentqueue_intents{status="FAILED"}'] == 10
    assert samples['intentqueue_job_duration_seconds_count{queue="intent-fulfillment"}'] == 50
    assert samples["intentqueue_redis_up"] == 1


def test_health_rules_and_probe_endpoints(workers: Workers) -> None:
    client = Client()
    assert client.get("/healthz").json() == {"status": "ok"}
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert "intent-fulfillment: no live worker" in body["problems"]
    assert "redis://" not in response.content.decode()  # nothing secret in a probe
    # A live worker on each queue makes it healthy.
    workers.start("intent-fulfillment")
    workers.start("blockchain-execution")
    wait_for(lambda: client.get("/readyz").status_code == 200, timeout=30)
    assert client.get("/readyz").json()["redis_status"] == "connected"
    # A paused queue is reported.
    QueueService().pause_queue("blockchain-execution")
    body = client.get("/readyz").json()
    assert body["problems"] == ["blockchain-execution: paused"]
    # A stopped worker is reported.
    workers.stop_all()
    wait_for(lambda: "no live worker" in " ".join(client.get("/readyz").json()["problems"]))


def test_old_waiting_job_is_a_problem(workers: Workers) -> None:
    with workers.configure(health={"max_waiting_age": 1, "require_workers": False}):
        IntentFactory()
        wait_for(lambda: not QueueService().get_queue_health()["is_healthy"], timeout=10)
        problems = QueueService().get_queue_health()["problems"]
    assert problems and "oldest waiting job is" in problems[0]


def test_health_with_redis_down() -> None:
    down = {"redis": {"url": "redis://127.0.0.1:1/0"}}
    with override_settings(INTENTQUEUE=down):
        response = Client().get("/readyz")
    assert response.status_code == 503
    assert response.json()["redis_status"] == "disconnected"


def test_queue_health_command_exit_status(workers: Workers) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "queue_health"],
        cwd=ROOT, env=workers.env(), capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["redis_status"] == "connected" and report["is_healthy"] is False


def test_metrics_endpoint_needs_token_or_permission() -> None:
    client = Client()
    assert client.get("/metrics").status_code == 401
    with override_settings(INTENTQUEUE={**settings.INTENTQUEUE, "metrics_token": "right"}):
        assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    staff = User.objects.create_user("ops", password="x", is_staff=True)
    client.force_login(staff)
    assert client.get("/metrics").status_code == 401
    staff.user_permissions.add(Permission.objects.get(codename="view_queues"))
    client.force_login(User.objects.get(pk=staff.pk))
    assert client.get("/metrics").status_code == 200


def _worker_spans(output: str) -> list[dict[str, object]]:
    found = []
    for raw in output.splitlines():
        line = raw.strip()
        if line.startswith("{") and '"context"' in line:
            found.append(json.loads(line))
    return found


def test_one_trace_from_request_through_worker_and_next_stage(
    workers: Workers, spans: InMemorySpanExporter
) -> None:
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("client request") as root:
        with transaction.atomic():
            intent = IntentFactory()
        trace_id = format(root.get_span_context().trace_id, "032x")
    produced: list[ReadableSpan] = [
        s for s in spans.get_finished_spans() if s.name.startswith("send")
    ]
    assert len(produced) == 1
    producer = produced[0]
    assert (
        producer.parent is not None and producer.parent.span_id == root.get_span_context().span_id
    )
    assert producer.kind == trace.SpanKind.PRODUCER
    assert producer.attributes is not None
    assert producer.attributes["messaging.system"] == "rq"
    assert producer.attributes["messaging.destination.name"] == "intent-fulfillment"
    assert producer.attributes["intentqueue.intent_hash"] == intent.hash

    workers.extra_env.update(OTEL_TRACES_EXPORTER="console", LOG_FORMAT="json", LOG_LEVEL="DEBUG")
    output = workers.run_burst()
    worker_spans = _worker_spans(output)
    consumer = next(s for s in worker_spans if s["name"] == "process intent-fulfillment")
    context = consumer["context"]
    assert isinstance(context, dict)
    assert context["trace_id"] == f"0x{trace_id}"
    assert consumer["parent_id"] == f"0x{producer.context.span_id:016x}"
    assert consumer["kind"] == "SpanKind.CONSUMER"
    attributes = consumer["attributes"]
    assert isinstance(attributes, dict) and attributes["messaging.message.id"].startswith(
        "fulfillment-"
    )
    # The execution job queued by the worker continues the same trace.
    sent = next(s for s in worker_spans if s["name"] == "send blockchain-execution")
    assert sent["context"]["trace_id"] == f"0x{trace_id}"  # type: ignore[index]
    assert sent["parent_id"] == context["span_id"]
    # The timeline records the trace id.
    assert set(intent.timeline.values_list("trace_id", flat=True)) == {trace_id}
    # Every log line written while the job ran carries the job context.
    job_lines = [
        json.loads(line) for line in output.splitlines()
        if line.startswith("{") and '"level"' in line and intent.hash in line
    ]  # fmt: skip
    assert job_lines, output[-3000:]
    for entry in job_lines:
        assert entry["intent_hash"] == intent.hash
        assert entry["correlation_id"] == intent.correlation_id
        assert entry["job_id"].startswith("fulfillment-")
        assert entry["trace_id"] == trace_id


def test_retries_join_the_trace(workers: Workers, spans: InMemorySpanExporter) -> None:
    retrying = {
        **SCRIPTED_FAILING,
        "flaky": {
            "class": "tests.strategies.ScriptedStrategy",
            "options": {"fail": "network", "fail_times": 1},
        },
    }
    with workers.configure(strategies=retrying):
        tracer = trace.get_tracer("tests")
        with tracer.start_as_current_span("client request") as root:
            intent = IntentFactory(strategy="flaky")
        workers.extra_env.update(OTEL_TRACES_EXPORTER="console")
        workers.start()
        wait_for(lambda: Intent.objects.get(pk=intent.pk).status == S.VALIDATED)
        workers.stop_all()
    trace_id = f"0x{root.get_span_context().trace_id:032x}"
    consumers = [
        s
        for s in _worker_spans(workers.logs(tail=None))
        if s["name"] == "process intent-fulfillment"
    ]
    assert len(consumers) == 2
    assert {s["context"]["trace_id"] for s in consumers} == {trace_id}  # type: ignore[index]
    assert consumers[0]["attributes"]["intentqueue.outcome"] == "retried"  # type: ignore[index]
    assert re.match(r"^0x[0-9a-f]{16}$", str(consumers[1]["parent_id"]))
