"""Benchmarks of what intentqueue promises (``manage.py intentqueue_bench``).

Every scenario runs against a scratch database (Django's test database of the configured
one: run it with ``DATABASE_URL`` pointing at PostgreSQL for the pipeline figures) and a
Redis database index of its own that is flushed before and after, with real worker
processes. Each prints a table and writes ``var/bench/<scenario>.json``.

Scenarios:
- ``pipeline``: N intents through both stages with strategies and an execution step that
  do no I/O, against bare RQ no-op jobs run by the same worker model (the baseline);
- ``latency``: idle latency from an intent's commit to the start of its fulfillment job;
- ``ingest``: intents created per second through the ORM with enqueue on commit, one by
  one and in bulk;
- ``memory``: Redis memory per waiting job;
- ``execution``: intents per second executed on anvil (1 s blocks, 2 confirmations, 5
  execution workers), confirmations re-checked later versus waited for in the worker;
- ``admin``: response times of the admin's Queues page, dead-letter view and intent list
  with many intents and failed jobs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from django.conf import settings
from django.db import connection, transaction
from tqdm import tqdm

from intentqueue.bench_jobs import noop_first
from intentqueue.conf import rq_queues
from intentqueue.models import Intent
from intentqueue.processors.base import JobData, Processor
from intentqueue.status import IntentStatus
from intentqueue.strategies.base import Strategy, ValidationReport

ROOT = Path(__file__).resolve().parent.parent


class NoopStrategy(Strategy):
    """Accepts every intent without any I/O (benchmarks only)."""

    def can_handle(self, intent: Intent) -> bool:
        return True

    def validate(self, intent: Intent, *, on_chain: bool = True) -> ValidationReport:
        return ValidationReport(strategy=self.name)


class NoopExecutionProcessor(Processor):
    """An execution step without a chain (benchmarks only): claims the intent and marks it
    fulfilled with a zero transaction hash, through the same guarded transitions."""

    stage_key = "execution"

    def handle(self, intent: Intent, data: JobData) -> dict[str, Any]:
        context = self.context.as_kwargs()
        intent.start_execution(attempts=self.context.attempt, **context)
        intent.mark_fulfilled("0x" + "00" * 32, **context)
        return {"status": IntentStatus.FULFILLED}


def percentile(values: list[float], share: float) -> float:
    """The ``share`` percentile (0-1) of ``values`` (nearest rank)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


@dataclass
class Result:
    """One scenario's figures: rows for the table, everything for the JSON file."""

    scenario: str
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, value: float | str, goal: str = "") -> None:
        shown = f"{value:,.2f}" if isinstance(value, float) else str(value)
        self.rows.append((name, shown, goal))
        self.data[name] = value

    def table(self) -> str:
        width = max([len(r[0]) for r in self.rows] + [10])
        lines = [f"== {self.scenario}"]
        lines += [f"  {n:<{width}}  {v:>14}  {g}" for n, v, g in self.rows]
        return "\n".join(lines)


class Bench:
    """Scratch database, isolated Redis and worker processes for the scenarios."""

    def __init__(self, redis_db: int = 13, out: Any = sys.stdout) -> None:
        base = settings.REDIS_URL.rsplit("/", 1)[0]
        self.redis_url = f"{base}/{redis_db}"
        self.redis = redis.Redis.from_url(self.redis_url)
        self.out = out
        self.procs: list[subprocess.Popen[bytes]] = []

    # --- environment ---------------------------------------------------------------------

    def settings(self, **extra: Any) -> dict[str, Any]:
        """The INTENTQUEUE the scenarios (and their workers) run with."""
        return {
            "redis": {"url": self.redis_url},
            "strategies": {
                "standard": {"class": "intentqueue.strategies.standard.StandardStrategy"},
                "noop": {"class": "intentqueue.bench.NoopStrategy"},
            },
            "default_strategy": "noop",
            **extra,
        }

    @contextmanager
    def configured(self, **extra: Any) -> Iterator[dict[str, Any]]:
        """This process configured like the workers."""
        from django.test import override_settings

        conf = self.settings(**extra)
        with override_settings(
            INTENTQUEUE=conf, RQ_QUEUES=rq_queues(conf, {"URL": self.redis_url})
        ):
            yield conf

    def env(self, conf: dict[str, Any]) -> dict[str, str]:
        """Environment of a worker process on the scratch database and Redis."""
        params = connection.settings_dict
        if connection.vendor == "sqlite":
            url = f"sqlite:///{params['NAME']}"
        else:
            auth = params.get("USER") or "postgres"
            if params.get("PASSWORD"):
                auth += f":{params['PASSWORD']}"
            host = f"{params['HOST'] or '127.0.0.1'}:{params['PORT'] or 5432}"
            url = f"postgres://{auth}@{host}/{params['NAME']}"
        return {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": os.environ.get("DJANGO_SETTINGS_MODULE", "project.settings"),
            "SECRET_KEY": settings.SECRET_KEY,
            "DATABASE_URL": url,
            "REDIS_URL": self.redis_url,
            "INTENTQUEUE_JSON": json.dumps(conf),
            "LOG_LEVEL": "WARNING",
        }

    def start_workers(self, conf: dict[str, Any], queue: str, count: int, *args: str) -> None:
        """``count`` worker processes on ``queue``."""
        for _ in range(count):
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, str(ROOT / "manage.py"), "rqworker", queue, *args],
                    cwd=ROOT, env=self.env(conf),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )  # fmt: skip

    def stop_workers(self) -> None:
        """Stop every worker process started so far."""
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()

    def reset(self) -> None:
        """Empty the scratch database's intents and the Redis database."""
        self.stop_workers()
        Intent.objects.all().delete()
        self.redis.flushdb()

    def wait(self, done: Callable[[], int], total: int, desc: str, timeout: float = 600) -> None:
        """Poll ``done()`` with a progress bar until it reaches ``total``."""
        deadline = time.monotonic() + timeout
        with tqdm(total=total, desc=desc, file=self.out, leave=False) as bar:
            while True:
                current = done()
                bar.update(current - bar.n)
                if current >= total:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{desc}: {current}/{total} after {timeout}s")
                time.sleep(0.05)

    def commands_processed(self) -> int:
        """Redis commands processed so far (all databases)."""
        return int(self.redis.info("stats")["total_commands_processed"])

    # --- scenarios -----------------------------------------------------------------------

    def pipeline(self, count: int = 2000, workers: int = 1) -> Result:
        """N intents through both stages (no I/O), then bare RQ no-op jobs in two stages
        with the same in-process worker model; ``workers`` processes per stage."""
        result = Result("pipeline")
        execution = {"execution": "intentqueue.bench.NoopExecutionProcessor"}
        with self.configured(processors=execution) as conf:
            self.reset()
            from intentqueue.services import QueueService

            service = QueueService(self.redis)
            service.pause_queue("intent-fulfillment")
            from intentqueue.services import submit_intents

            for _ in range(max(1, count // 500)):
                submit_intents(_payloads(min(500, count)))
            total = Intent.objects.count()
            self.start_workers(conf, "intent-fulfillment", workers)
            self.start_workers(conf, "blockchain-execution", workers)
            time.sleep(3)
            commands = self.commands_processed()
            started = time.perf_counter()
            service.resume_queue("intent-fulfillment")
            fulfilled = Intent.objects.filter(status=IntentStatus.FULFILLED)
            self.wait(fulfilled.count, total, "pipeline")
            elapsed = time.perf_counter() - started
            commands = self.commands_processed() - commands
            self.stop_workers()
            stages = _stage_latencies()
        ours = total / elapsed
        baseline = self._baseline(total, workers)
        result.add("intents", total)
        result.add("workers per stage", workers)
        result.add("intents/s", ours, "goal >= 250/s")
        result.add("fulfillment p50 ms", percentile(stages["fulfillment"], 0.5))
        result.add("fulfillment p99 ms", percentile(stages["fulfillment"], 0.99))
        result.add("execution p50 ms", percentile(stages["execution"], 0.5))
        result.add("execution p99 ms", percentile(stages["execution"], 0.99))
        result.add("Redis commands per job", commands / (2 * total))
        result.add("baseline intents/s (bare RQ)", baseline)
        result.add("ratio to baseline", ours / baseline, "goal >= 0.8")
        return result

    def _baseline(self, count: int, workers: int) -> float:
        """Bare RQ: ``count`` no-op jobs that each enqueue a no-op job on a second queue,
        run by RQ's in-process worker; returns pairs per second."""
        from rq import Queue
        from rq.serializers import JSONSerializer

        self.redis.flushdb()
        first = Queue("bench-a", connection=self.redis, serializer=JSONSerializer)
        with self.redis.pipeline() as pipe:
            first.enqueue_many(
                [Queue.prepare_data(noop_first, args=("bench-b",), result_ttl=60)
                 for _ in range(count)],
                pipeline=pipe,
            )  # fmt: skip
            pipe.execute()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        worker = [
            sys.executable, "-m", "rq.cli", "worker", "--url", self.redis_url,
            "-w", "rq.worker.SimpleWorker", "--serializer", "rq.serializers.JSONSerializer",
            "-q",
        ]  # fmt: skip
        started = time.perf_counter()
        procs = []
        for queue in ("bench-a", "bench-b"):
            for _ in range(workers):
                procs.append(
                    subprocess.Popen(
                        [*worker, queue], cwd=ROOT, env=env,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )
                )  # fmt: skip
        finished = "rq:finished:bench-b"
        self.wait(lambda: int(self.redis.zcard(finished)), count, "baseline", timeout=600)
        elapsed = time.perf_counter() - started
        for proc in procs:
            proc.terminate()
            proc.wait()
        self.redis.flushdb()
        return count / elapsed

    def latency(self, count: int = 200) -> Result:
        """Idle latency from commit to job start, one idle worker."""
        result = Result("latency")
        with self.configured() as conf:
            self.reset()
            self.start_workers(conf, "intent-fulfillment", 1)
            time.sleep(3)  # the worker is up and idle
            samples = []
            for _ in tqdm(range(count), desc="latency", file=self.out, leave=False):
                intent = _new_intent()
                committed = time.time()
                job_key = f"rq:job:fulfillment-{intent.hash[2:]}"
                while not self.redis.hget(job_key, "started_at"):
                    time.sleep(0.0005)
                started = _rq_time(self.redis.hget(job_key, "started_at"))
                samples.append((started - committed) * 1000)
                time.sleep(0.02)
            self.stop_workers()
        result.add("intents", count)
        result.add("p50 ms", percentile(samples, 0.5), "goal < 5 ms")
        result.add("p99 ms", percentile(samples, 0.99), "goal < 50 ms")
        result.add("max ms", max(samples))
        result.data["samples_ms"] = samples
        return result

    def ingest(self, count: int = 10000) -> Result:
        """ORM ingest with enqueue on commit: one intent per transaction, then in bulk."""
        from intentqueue.services import submit_intents

        result = Result("ingest")
        single, bulk = max(1, count // 10), max(500, count - count % 500)
        with self.configured():
            self.reset()
            started = time.perf_counter()
            for _ in tqdm(range(single), desc="ingest single", file=self.out, leave=False):
                _new_intent()
            single_rate = single / (time.perf_counter() - started)
            self.reset()
            batches = [_payloads(500) for _ in range(bulk // 500)]
            started = time.perf_counter()
            for batch in tqdm(batches, desc="ingest bulk", file=self.out, leave=False):
                submit_intents(batch)
            bulk_rate = bulk / (time.perf_counter() - started)
            waiting = self.redis.llen("rq:queue:intent-fulfillment")
        result.add("single intents/s", single_rate)
        result.add("bulk intents/s", bulk_rate, "goal >= 2,000/s")
        result.add("bulk jobs queued", waiting)
        return result

    def memory(self, count: int = 10000) -> Result:
        """Redis memory per waiting fulfillment job."""
        from intentqueue.services import submit_intents

        result = Result("memory")
        with self.configured():
            self.reset()
            before = int(self.redis.info("memory")["used_memory"])
            for _ in tqdm(range(count // 500), desc="memory", file=self.out, leave=False):
                submit_intents(_payloads(500))
            after = int(self.redis.info("memory")["used_memory"])
        result.add("waiting jobs", count)
        result.add("bytes per waiting job", (after - before) / count, "goal < 1 KB")
        return result


def _stage_latencies() -> dict[str, list[float]]:
    """Per intent and stage, ms from the job's claim to the stage's end (VALIDATING ->
    VALIDATED, EXECUTING -> FULFILLED)."""
    from intentqueue.models import IntentTransition

    ends: dict[str, str] = {
        IntentStatus.VALIDATED: "fulfillment", IntentStatus.FULFILLED: "execution",
    }  # fmt: skip
    claims = {"fulfillment": IntentStatus.VALIDATING, "execution": IntentStatus.EXECUTING}
    marks: dict[tuple[int, str], Any] = {}
    rows = IntentTransition.objects.filter(error="").values_list("intent_id", "to_status", "at")
    for intent_id, status, at in rows:
        marks[(intent_id, status)] = at
    stages: dict[str, list[float]] = {"fulfillment": [], "execution": []}
    for (intent_id, status), at in marks.items():
        stage_name = ends.get(status)
        claimed = marks.get((intent_id, claims[stage_name])) if stage_name else None
        if stage_name and claimed:
            stages[stage_name].append((at - claimed).total_seconds() * 1000)
    return stages


#: Scenario name -> ``Bench`` method.
SCENARIOS = {"latency": "latency", "ingest": "ingest", "memory": "memory", "pipeline": "pipeline"}


def _payloads(count: int) -> list[dict[str, Any]]:
    """Valid payloads with fresh salts."""
    now = int(time.time())
    token, portal = "0x" + "22" * 20, "0x" + "11" * 20
    data = "0xa9059cbb" + "55" * 32 + f"{1000000:064x}"
    return [_payload(now, token, portal, data) for _ in range(count)]


def _payload(now: int, token: str, portal: str, data: str) -> dict[str, Any]:
    return {
        "sourceChainId": 1,
        "destination": 10,
        "route": {
            "salt": "0x" + os.urandom(32).hex(),
            "deadline": now + 3600,
            "portal": portal,
            "nativeAmount": "0",
            "tokens": [{"token": token, "amount": "1000000"}],
            "calls": [{"target": token, "data": data, "value": "0"}],
        },
        "reward": {
            "deadline": now + 7200,
            "creator": "0x" + "33" * 20,
            "prover": "0x" + "44" * 20,
            "nativeAmount": "0",
            "tokens": [{"token": token, "amount": "1100000"}],
        },
        "source": "bench",
    }


def _new_intent() -> Intent:
    from intentqueue.services import submit_intent

    with transaction.atomic():
        return submit_intent(_payloads(1)[0])


def _rq_time(value: bytes | str | None) -> float:
    from datetime import UTC, datetime

    text = value.decode() if isinstance(value, bytes) else (value or "")
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
