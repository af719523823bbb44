"""Job hashes as anyone who can write to Redis may leave them, run by real workers.

Each test writes RQ job hashes by hand (``HSET rq:job:<id>``, ``RPUSH rq:queue:<name>``)
next to real intents and checks that the worker stays up, every real intent is
validated, and every bad job either lands in its queue's dead-letter queue with the
reason or, when there is no job hash to keep, is dropped with a logged warning. No
function, callback or webhook outside intentqueue's own is ever run: ``tests.evil``
leaves a marker file if it runs, and a local HTTP server counts webhook calls.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import logging
import threading
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from django.db import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from intentqueue.jobs import FAILURE_CALLBACK, FULFILLMENT_FUNC
from intentqueue.models import Intent
from intentqueue.processors.base import MAX_ERROR_LENGTH
from intentqueue.queues import get_connection
from intentqueue.status import IntentStatus as S
from intentqueue.worker import IntentWorker
from tests.conftest import Workers, wait_for
from tests.evil import MARKER_ENV
from tests.factories import IntentFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

QUEUE = "intent-fulfillment"
EVIL = "tests.evil.touch_marker"
HASH = "0x" + "ab" * 32
NOW = "2026-01-01T00:00:00.000000Z"


def call(func: str, *args: Any, instance: Any = None, **kwargs: Any) -> str:
    """A job's ``data`` as RQ's JSON serializer writes it (uncompressed, as RQ accepts)."""
    return json.dumps([func, instance, list(args), kwargs])


def job_data(**overrides: Any) -> dict[str, Any]:
    """Well-formed job data for an intent that does not exist."""
    return {"intentId": 999_999, "intentHash": HASH, "strategy": "standard", **overrides}


def fields(data: str | bytes, **overrides: Any) -> dict[str, Any]:
    """A job hash as RQ writes one for a queued job, with our failure callback."""
    return {
        "data": data, "created_at": NOW, "enqueued_at": NOW, "status": "queued",
        "origin": QUEUE, "description": "hand-written", "timeout": "300",
        "failure_callback_name": FAILURE_CALLBACK, "failure_ttl": "3600", **overrides,
    }  # fmt: skip


def put(
    client: redis.Redis, job_id: str | bytes, mapping: dict[str, Any] | None, queue: str = QUEUE
) -> None:
    """Write ``mapping`` as job ``job_id`` (unless None) and queue its id."""
    if mapping is not None:
        assert isinstance(job_id, str)
        client.hset(f"rq:job:{job_id}", mapping=mapping)
    client.sadd("rq:queues", f"rq:queue:{queue}")
    client.rpush(f"rq:queue:{queue}", job_id)


def reason_of(client: redis.Redis, job_id: str) -> str:
    """Everything a job's failure says: our meta, RQ's exc_info and its latest result."""
    raw = client.hgetall(f"rq:job:{job_id}")
    parts = []
    try:
        meta = json.loads(raw.get(b"meta") or b"{}")
    except ValueError:
        meta = {}
    for error in meta.get("errors") or []:
        parts.append(str(error.get("message")))
    if raw.get(b"exc_info"):
        exc = raw[b"exc_info"]
        with contextlib.suppress(zlib.error):
            exc = zlib.decompress(exc)
        parts.append(exc.decode("utf-8", "replace"))
    for _, entry in client.xrevrange(f"rq:results:{job_id}", "+", "-", count=1):
        if entry.get(b"exc_string"):
            parts.append(zlib.decompress(base64.b64decode(entry[b"exc_string"])).decode())
    return "\n".join(parts)


def failed_ids(client: redis.Redis, queue: str = QUEUE) -> set[str]:
    registry = FailedJobRegistry(queue, connection=client, serializer=JSONSerializer)
    return set(registry.get_job_ids(cleanup=False))


def queued_ids(client: redis.Redis) -> list[bytes]:
    """Ids still waiting in the fulfillment queues (valid intents move on to execution)."""
    keys = client.keys(f"rq:queue:{QUEUE}*")
    return [job for key in keys for job in client.lrange(key, 0, -1)]


class HookServer(http.server.ThreadingHTTPServer):
    """An HTTP server on a free local port that counts the requests it gets."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _hit(self) -> None:
                server.hits.append(self.path)
                self.send_response(204)
                self.end_headers()

            do_GET = do_POST = _hit  # noqa: N815  # the names http.server calls

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


@pytest.fixture
def hooks() -> Iterator[HookServer]:
    server = HookServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: Workers) -> Path:
    """Where ``tests.evil.touch_marker`` would write, in this process and in workers."""
    path = tmp_path / "evil-ran"
    monkeypatch.setenv(MARKER_ENV, str(path))
    workers.extra_env[MARKER_ENV] = str(path)
    return path


@dataclass
class Case:
    """A bad job and what must become of it: the dead-letter queue with ``reason`` in
    its failure, or (``dropped``) a warning naming it in the worker's log."""

    job_id: str
    mapping: dict[str, Any] | None
    reason: str
    dropped: bool = False
    queue: str = QUEUE
    raw_id: bytes | None = None


@dataclass
class Cases:
    prefix: str
    items: list[Case] = field(default_factory=list)

    def dlq(self, reason: str, mapping: dict[str, Any] | None, queue: str = QUEUE) -> None:
        self.items.append(Case(f"{self.prefix}-{len(self.items)}", mapping, reason, queue=queue))

    def dropped(self, reason: str, mapping: Any = None, raw_id: bytes | None = None) -> None:
        job_id = f"{self.prefix}-{len(self.items)}"
        self.items.append(Case(job_id, mapping, reason, dropped=True, raw_id=raw_id))

    def write(self, client: redis.Redis) -> None:
        for case in self.items:
            if case.raw_id is not None:
                put(client, case.raw_id, None)
            elif isinstance(case.mapping, str):  # not a hash at all
                client.set(f"rq:job:{case.job_id}", case.mapping)
                put(client, case.job_id, None)
            else:
                put(client, case.job_id, case.mapping, case.queue)


def hostile_jobs(hook_url: str) -> tuple[Cases, Cases]:
    """Bad jobs of every kind, in two batches (queued before and after real intents)."""
    first, second = Cases("bad"), Cases("worse")
    valid_call = call(FULFILLMENT_FUNC, job_data())
    # Data that is not a job.
    first.dlq("job data is not valid JSON", fields(valid_call[:-9]))  # truncated
    first.dlq("job data is not valid JSON", fields("not json at all {"))
    first.dlq("job data is not valid JSON", fields(b"\xff\xfe\x00\x81 not utf-8"))
    first.dlq("job data must be [function, null, args, kwargs]", fields('{"func": "x"}'))
    first.dlq("must hold a list of args", fields(json.dumps([FULFILLMENT_FUNC, None, {}, {}])))
    first.dlq("must hold a list of args", fields(json.dumps([FULFILLMENT_FUNC, None, [], []])))
    first.dlq("names no function", fields(call(FULFILLMENT_FUNC, job_data(), instance={"a": 1})))
    first.dlq("job data is not valid JSON", fields("[" * 50_000 + "]" * 50_000))  # deep
    # JSON of the wrong shape.
    first.dlq("job data must be an object, got list", fields(call(FULFILLMENT_FUNC, [1, 2])))
    for bad_id in ("1", -5, 0, 2**70, True, 1.0, None):
        first.dlq(
            "intentId must be a positive integer",
            fields(call(FULFILLMENT_FUNC, job_data(intentId=bad_id))),
        )
    first.dlq("unknown keys", fields(call(FULFILLMENT_FUNC, job_data(evil=1))))
    first.dlq("metadata must be an object", fields(call(FULFILLMENT_FUNC, job_data(metadata=[]))))
    first.dlq("intentHash must be", fields(call(FULFILLMENT_FUNC, job_data(intentHash="0x12"))))
    first.dlq("no intent", fields(valid_call))
    first.dlq("exactly one argument", fields(call(FULFILLMENT_FUNC, job_data(), job_data())))
    first.dlq("exactly one argument", fields(call(FULFILLMENT_FUNC, job_data(), extra=1)))
    # Functions, callbacks and webhooks that are not ours.
    first.dlq("refusing to run 'os.system': not an intentqueue job",
              fields(call("os.system", "touch /tmp/intentqueue-os-system")))  # fmt: skip
    first.dlq("refusing to run 'builtins.eval'", fields(call("builtins.eval", "1/0")))
    first.dlq("refusing to run 'nonexistent.module.func'", fields(call("nonexistent.module.func")))
    first.dlq(f"refusing to run '{EVIL}'", fields(call(EVIL)))
    for kind in ("success", "failure", "stopped"):
        first.dlq(
            f"refusing to run {kind} callback '{EVIL}'",
            fields(valid_call, **{f"{kind}_callback_name": EVIL}),
        )
    hook = json.dumps([{"url": hook_url, "job_status": "failed", "method": "POST"}])
    first.dlq("refusing to run a job with webhooks", fields(valid_call, webhooks=hook))
    # Huge blobs: 5 MB of a field, 5 MB of garbage.
    big = call(FULFILLMENT_FUNC, job_data(strategy="x" * 5_000_000))
    second.dlq("strategy must be a non-empty name", fields(big))
    second.dlq("job data is not valid JSON", fields("[" + "1," * 2_500_000))
    # Job hashes RQ cannot load, or loads with fields missing or of the wrong kind.
    second.dlq(f"refusing to run '{EVIL}'", {"data": call(EVIL)})  # nothing but data
    second.dlq("Unexpected job format", {"status": "queued", "origin": QUEUE})  # no data
    second.dlq("UnicodeDecodeError", fields(valid_call, origin=b"\xff\xfe"))
    second.dlq("UnicodeDecodeError", fields(valid_call, description=b"\xc3\x28"))
    second.dlq("is not a valid JobStatus", fields(valid_call, status="bogus"))
    second.dlq("does not match format", fields(valid_call, created_at="yesterday"))
    second.dlq("job hash cannot be read", fields(valid_call, timeout="forever"))
    second.dlq("job hash cannot be read", fields(valid_call, retries_left="many"))
    second.dlq("job hash cannot be read", fields(valid_call, dependency_ids="[oops"))
    second.dlq("no intent", fields(valid_call, meta=b"\xff{not json"))
    second.dlq("no intent", fields(valid_call, meta="[1, 2]"))
    junk_meta = {"otel": {"traceparent": 5}, "max_attempts": "x", "errors": "x", "rechecks": []}
    second.dlq("no intent", fields(valid_call, meta=json.dumps(junk_meta)))
    second.dlq(f"refusing to run '{EVIL}'", fields(call(EVIL), failure_ttl="0"))
    # Fields RQ loads but cannot write back, or cannot time: the failure is still kept.
    second.dlq("job could not be finished", fields(call(EVIL), dependency_ids="1"))
    second.dlq("job data is not valid JSON", fields("[not json", dependency_ids="1"))
    second.dlq(f"refusing to run '{EVIL}'", fields(call(EVIL), failure_callback_timeout="2" * 10))
    second.dlq(f"refusing to run '{EVIL}'", fields(call(EVIL), origin="", status=""))
    # A job whose hash names another queue runs, and fails, as a job of its own queue.
    second.dlq(f"refusing to run '{EVIL}'", fields(call(EVIL), origin="blockchain-execution"))
    second.dlq("no intent", fields(valid_call, origin=""), queue=f"{QUEUE}-p1")
    # Nothing to keep: the id is dropped with a warning.
    second.dropped("No such job")  # queued id, no hash
    second.dropped("WRONGTYPE", mapping="a string, not a hash")
    second.dropped("not UTF-8", raw_id=b"\xff\xfe\xfd")
    return first, second


def check_outcomes(client: redis.Redis, batches: list[Cases], log: str, marker: Path) -> None:
    assert not marker.exists(), marker.read_text()
    assert "unhandled exception" not in log, log[-4000:]
    assert queued_ids(client) == []
    failed = failed_ids(client) | failed_ids(client, f"{QUEUE}-p1")
    for case in (c for batch in batches for c in batch.items):
        if case.dropped:
            assert case.reason in log and "dropped" in log, (case, log[-4000:])
            continue
        assert case.job_id in failed, (case, reason_of(client, case.job_id))
        assert case.job_id in failed_ids(client, case.queue), case
        reason = reason_of(client, case.job_id)
        assert case.reason in reason, (case.reason, reason[-2000:])
        status = client.hget(f"rq:job:{case.job_id}", "status")
        assert status == b"failed", (case, status)
        meta = json.loads(client.hget(f"rq:job:{case.job_id}", "meta") or b"{}")
        final = meta["errors"][-1]
        assert final["final"] and len(final["message"]) <= MAX_ERROR_LENGTH, final


def test_burst_worker_sets_aside_hostile_jobs_and_validates_real_intents(
    workers: Workers, redis_client: redis.Redis, marker: Path, hooks: HookServer
) -> None:
    first, second = hostile_jobs(hooks.url)
    first.write(redis_client)
    with transaction.atomic():  # queued on commit, between the two batches
        intents = [IntentFactory() for _ in range(3)]
    second.write(redis_client)
    log = workers.run_burst(timeout=120)  # exits 0, or the fixture fails the test
    (Path(workers.tmp_dir) / "burst.log").write_text(log)
    for intent in intents:
        intent.refresh_from_db()
        assert intent.status == S.VALIDATED, (intent.status, intent.last_error, log[-3000:])
    check_outcomes(redis_client, [first, second], log, marker)
    assert hooks.hits == []
    assert not Path("/tmp/intentqueue-os-system").exists()


def test_long_running_worker_survives_hostile_jobs(
    workers: Workers, redis_client: redis.Redis, marker: Path, hooks: HookServer
) -> None:
    proc = workers.start()
    first, second = hostile_jobs(hooks.url)
    first.write(redis_client)
    second.write(redis_client)
    intent = IntentFactory()  # queued after all of them
    wait_for(lambda: Intent.objects.get(pk=intent.pk).status == S.VALIDATED, timeout=60)
    assert proc.poll() is None, workers.logs()
    later = IntentFactory()
    wait_for(lambda: Intent.objects.get(pk=later.pk).status == S.VALIDATED, timeout=30)
    assert proc.poll() is None, workers.logs()
    check_outcomes(redis_client, [first, second], workers.logs(tail=None), marker)
    assert hooks.hits == []


# --- generated job data, through the worker's own code path, in this process ------------

PROPERTIES = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
ids = st.one_of(
    st.integers(), st.integers(2**63 - 5, 2**80), st.text(max_size=10), st.floats(),
    st.booleans(), st.none(), st.just("1"), json_values,
)  # fmt: skip
job_dicts = st.fixed_dictionaries(
    {},
    optional={
        "intentId": ids,
        "intentHash": st.one_of(st.just(HASH), st.text(max_size=70), st.just(HASH.upper())),
        "strategy": st.one_of(st.just("standard"), st.text(max_size=80), json_values),
        "walletType": json_values,
        "metadata": json_values,
        "evil": json_values,
    },
)
functions = st.one_of(
    st.just(FULFILLMENT_FUNC),
    st.sampled_from([EVIL, "os.system", "builtins.eval", "nonexistent.module.func", "", "a..b",
                     "intentqueue.jobs.on_job_failure", "intentqueue.jobs.IntentJob"]),
    st.text(max_size=40),
)  # fmt: skip
calls = st.builds(
    lambda f, args, kwargs: json.dumps([f, None, args, kwargs]),
    functions,
    st.one_of(st.lists(job_dicts, min_size=1, max_size=2), st.lists(json_values, max_size=3)),
    st.one_of(st.just({}), st.dictionaries(st.text(max_size=5), json_values, max_size=2)),
)
bad_data = st.one_of(
    calls,
    calls.flatmap(lambda text: st.integers(0, len(text) - 1).map(lambda n: text[:n])),
    json_values.map(json.dumps),
    st.binary(max_size=100),
)


@dataclass
class InProcess:
    """An ``IntentWorker`` driven one step at a time, as its ``work`` loop drives it."""

    worker: IntentWorker
    client: redis.Redis
    warnings: list[str]

    def drain(self) -> None:
        while (result := self.worker.dequeue_job_and_maintain_ttl(None)) is not None:
            self.worker.execute_job(*result)


@pytest.fixture
def in_process(redis_client: redis.Redis, marker: Path) -> Iterator[InProcess]:
    worker = IntentWorker([QUEUE], connection=get_connection())
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler, log = Collect(logging.WARNING), logging.getLogger("intentqueue.worker")
    log.addHandler(handler)
    yield InProcess(worker, redis_client, seen)
    log.removeHandler(handler)
    assert not marker.exists()


def ends_in_dead_letter_queue(run: InProcess, job_id: str) -> dict[str, Any]:
    run.drain()
    assert queued_ids(run.client) == []
    assert job_id in failed_ids(run.client), reason_of(run.client, job_id)
    assert run.client.hget(f"rq:job:{job_id}", "status") == b"failed"
    meta = json.loads(run.client.hget(f"rq:job:{job_id}", "meta") or b"{}")
    final = meta["errors"][-1]
    assert final["final"] and final["message"].strip(), final
    assert len(final["message"]) <= MAX_ERROR_LENGTH
    return dict(final)


@PROPERTIES
@given(data=bad_data, with_callback=st.booleans())
def test_generated_bad_job_data_goes_to_the_dead_letter_queue(
    in_process: InProcess, data: str | bytes, with_callback: bool
) -> None:
    job_id = f"gen-{uuid.uuid4().hex}"
    mapping = fields(data)
    if not with_callback:
        del mapping["failure_callback_name"]
    put(in_process.client, job_id, mapping)
    final = ends_in_dead_letter_queue(in_process, job_id)
    assert final["type"] == "bad_job_data", final


#: Values for any field of a job hash: text RQ may not parse, bytes that are not UTF-8.
field_values = st.one_of(
    st.binary(max_size=30),
    st.text(max_size=30),
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["", "0", "-1", "1e9", "null", "[]", "{}", "[1]", '{"a": 1}', NOW,
                     "queued", "finished", "started", "99999999999999999999"]),
)  # fmt: skip
HASH_FIELDS = [
    "created_at", "enqueued_at", "started_at", "ended_at", "last_heartbeat", "status",
    "origin", "description", "worker_name", "group_id", "timeout", "result_ttl",
    "failure_ttl", "ttl", "meta", "dependency_ids", "allow_dependency_failures",
    "enqueue_at_front", "number_of_retries", "retry_intervals", "repeats_left",
    "repeat_intervals", "webhooks", "success_callback_name", "failure_callback_name",
    "stopped_callback_name", "success_callback_timeout", "failure_callback_timeout",
    "exc_info", "result", "dependency_id",
]  # fmt: skip


@PROPERTIES
@given(
    junk=st.dictionaries(st.sampled_from(HASH_FIELDS), field_values, min_size=1, max_size=5),
    data=st.sampled_from([call(EVIL), call(FULFILLMENT_FUNC, job_data()), "[not json"]),
)
def test_generated_job_hash_fields_never_stop_the_worker(
    in_process: InProcess, junk: dict[str, Any], data: str
) -> None:
    job_id = f"gen-{uuid.uuid4().hex}"
    put(in_process.client, job_id, fields(data, **junk))
    ends_in_dead_letter_queue(in_process, job_id)


@settings(PROPERTIES, max_examples=30)
@given(raw_id=st.binary(min_size=1, max_size=20))
def test_generated_queue_entries_without_a_job_are_dropped_with_a_warning(
    in_process: InProcess, raw_id: bytes
) -> None:
    in_process.warnings.clear()
    put(in_process.client, raw_id, None)
    in_process.drain()
    assert queued_ids(in_process.client) == []
    assert any("dropped" in message for message in in_process.warnings)
