"""Protective controls of the execution stage: circuit breakers and in-flight bounds per
chain (state in the real Redis), manual open/close audited, health and Prometheus, and
real workers holding one chain's jobs while the other chain keeps finishing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from django.conf import settings
from django.contrib.auth.models import Permission
from django.test import Client, override_settings
from django.urls import reverse
from eth_account import Account
from rq.job import Job
from rq.serializers import JSONSerializer

from intentqueue.breakers import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, InFlightLimit
from intentqueue.chain import wallets
from intentqueue.checks import check_solver_keystore
from intentqueue.exceptions import IntentQueueError, NetworkError, PermanentError, RecheckLater
from intentqueue.health import check_health
from intentqueue.models import OperatorAction
from intentqueue.processors.base import JobData
from intentqueue.processors.execution import BlockchainProcessor
from intentqueue.prometheus import exposition
from intentqueue.services import QueueService
from intentqueue.status import IntentStatus as S
from tests.chainkit import (
    TOKEN_UNIT,
    ChainPair,
    RpcRelay,
    Solver,
    execute,
    fund_solver,
    make_intent_parts,
    mint,
    reset_caches,
    validated_intent,
)
from tests.conftest import ROOT, Workers, wait_for

STANDARD = {"standard": {"class": "intentqueue.strategies.standard.StandardStrategy"}}


@contextmanager
def breakers(**options: Any) -> Iterator[None]:
    conf = {**settings.INTENTQUEUE, "breakers": options}
    with override_settings(INTENTQUEUE=conf):
        yield


# --- the breaker on its own ------------------------------------------------------------


class TestBreaker:
    def test_opens_after_the_threshold_and_holds_for_the_cool_down(self) -> None:
        with breakers(failure_threshold=3, cooldown=60000):
            breaker = CircuitBreaker(10)
            for _ in range(2):
                breaker.record_failure()
            assert breaker.read().state == CLOSED
            breaker.before_call()  # still closed: let through
            breaker.record_failure()
            state = breaker.read()
            assert (state.state, state.failures) == (OPEN, 3)
            assert 59 < state.remaining <= 60
            with pytest.raises(RecheckLater, match="chain 10: circuit open") as held:
                breaker.before_call()
            assert 59 <= held.value.delay_seconds <= 60
            assert CircuitBreaker(11).read().state == CLOSED  # other chains unaffected

    def test_a_success_ends_a_run_of_failures(self) -> None:
        with breakers(failure_threshold=3):
            breaker = CircuitBreaker(10)
            breaker.record_failure()
            breaker.record_failure()
            breaker.record_success()
            breaker.record_failure()
            assert breaker.read().state == CLOSED and breaker.read().failures == 1

    def test_half_open_lets_one_probe_through(self) -> None:
        with breakers(failure_threshold=1, cooldown=300):
            breaker = CircuitBreaker(10)
            breaker.record_failure()
            with pytest.raises(RecheckLater):
                breaker.before_call("job-a")
            time.sleep(0.35)
            breaker.before_call("job-a")  # the probe
            assert breaker.read().state == HALF_OPEN
            with pytest.raises(RecheckLater, match="probe is running"):
                breaker.before_call("job-b")
            breaker.record_failure()  # the probe failed: open again, a new cool-down
            assert breaker.read().state == OPEN
            with pytest.raises(RecheckLater):
                breaker.before_call("job-b")
            time.sleep(0.35)
            breaker.before_call("job-b")
            breaker.record_success()  # the probe reached the RPC
            assert breaker.read().state == CLOSED and breaker.read().failures == 0
            breaker.before_call("job-c")

    def test_guard_counts_network_errors_only(self) -> None:
        with breakers(failure_threshold=2):
            breaker = CircuitBreaker(10)
            with pytest.raises(ValueError), breaker.guard():
                raise ValueError("not the network")
            with pytest.raises(NetworkError), breaker.guard():
                raise NetworkError("RPC unreachable: connection refused")
            with pytest.raises(ConnectionRefusedError), breaker.guard():
                raise ConnectionRefusedError("connection refused")  # classified as network
            assert breaker.read().state == OPEN

    def test_shared_by_every_client_of_the_redis(self, redis_client: redis.Redis) -> None:
        with breakers(failure_threshold=1):
            CircuitBreaker(10).record_failure()
            assert CircuitBreaker(10, redis_client).read().state == OPEN


# --- the in-flight bound -------------------------------------------------------------------


class TestInFlight:
    def test_bound_per_chain_and_stale_entries_dropped(self, redis_client: redis.Redis) -> None:
        with breakers(max_in_flight_per_chain=2):
            limit = InFlightLimit(10)
            with limit.slot("a"), limit.slot("b"):
                with (
                    pytest.raises(RecheckLater, match="2 execution jobs in flight") as held,
                    limit.slot("c"),
                ):
                    pass
                assert held.value.delay_seconds == 1
                with limit.slot("a"):  # a job run again keeps its own slot
                    pass
                with InFlightLimit(11).slot("c"):  # another chain has its own bound
                    pass
            assert limit.count() == 0
            # a worker that died holding a slot: dropped after the lock duration
            redis_client.zadd(limit.key, {"dead-1": time.time() - 31, "dead-2": time.time() - 40})
            with limit.slot("d"), limit.slot("e"):
                assert limit.count() == 2

    def test_concurrent_jobs_never_exceed_the_bound(self) -> None:
        with breakers(max_in_flight_per_chain=3):
            running, peak, held = [0], [0], [0]
            lock = threading.Lock()
            start = threading.Barrier(12)

            def job(n: int) -> None:
                start.wait()
                for _ in range(20):
                    try:
                        with InFlightLimit(10).slot(f"job-{n}"):
                            with lock:
                                running[0] += 1
                                peak[0] = max(peak[0], running[0])
                            time.sleep(0.005)
                            with lock:
                                running[0] -= 1
                        return
                    except RecheckLater:
                        with lock:
                            held[0] += 1
                        time.sleep(0.01)

            threads = [threading.Thread(target=job, args=(n,)) for n in range(12)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert peak[0] == 3 and held[0] > 0


# --- operators, health and metrics ---------------------------------------------------------


@pytest.mark.django_db
class TestOperators:
    def test_manual_open_and_close_are_audited_and_visible(
        self, dev_chains: ChainPair, solver: Solver
    ) -> None:
        fund_solver(dev_chains, solver, tokens=10 * TOKEN_UNIT)
        conf = {**settings.INTENTQUEUE, "chains": dev_chains.settings(), "strategies": STANDARD}
        destination = str(dev_chains.destination.chain_id)
        with override_settings(INTENTQUEUE=conf):
            service = QueueService()
            service.open_breaker(destination, actor="alice", reason="RPC provider maintenance")
            health = check_health()
            assert health["breakers"][destination]["state"] == OPEN
            assert health["breakers"][destination]["manual"] is True
            assert health["breakers"][str(dev_chains.source.chain_id)]["state"] == CLOSED
            assert f"chain {destination}: circuit open" in health["problems"]
            text = exposition().decode()
            assert f'intentqueue_circuit_open{{chain="{destination}"}} 1.0' in text
            assert f'intentqueue_circuit_open{{chain="{dev_chains.source.chain_id}"}} 0.0' in text

            intent = validated_intent(dev_chains, *make_intent_parts(dev_chains))
            data = JobData(intent.pk, intent.hash, intent.strategy, None).to_json()
            with pytest.raises(RecheckLater, match="opened by an operator"):
                BlockchainProcessor(None).process(data)
            time.sleep(0.1)
            with pytest.raises(RecheckLater):  # stays open by hand, whatever the cool-down
                BlockchainProcessor(None).process(data)

            service.close_breaker(destination, actor="bob", reason="provider back")
            assert execute(intent)["status"] == S.FULFILLED
            assert check_health()["breakers"][destination]["state"] == CLOSED
            assert f'intentqueue_circuit_open{{chain="{destination}"}} 0.0' in exposition().decode()
        rows = list(
            OperatorAction.objects.order_by("at").values_list("actor", "action", "queue", "reason")
        )
        assert rows == [
            ("alice", "breaker_open", f"chain {destination}", "RPC provider maintenance"),
            ("bob", "breaker_close", f"chain {destination}", "provider back"),
        ]

    def test_not_a_chain_id_is_refused_and_audited(self) -> None:
        with pytest.raises(IntentQueueError, match="not a chain id"):
            QueueService().open_breaker("rq:*", actor="eve")
        assert OperatorAction.objects.count() == 0


@pytest.mark.django_db
class TestAdmin:
    def test_queues_page_lists_breakers_and_opens_and_closes_them(self, admin_user: Any) -> None:
        client = Client()
        client.force_login(admin_user)
        with breakers(failure_threshold=1):
            CircuitBreaker(10).record_failure()
            page = client.get(reverse("admin:intentqueue_queues")).text
            assert 'data-chain="10" data-state="open"' in page
            assert reverse("admin:intentqueue_breaker_close", args=["10"]) in page
            QueueService().close_breaker(10, actor="setup")
            url = reverse("admin:intentqueue_breaker_open", args=["10"])
            confirm = client.post(url)
            assert confirm.status_code == 200 and "Open the circuit of chain 10" in confirm.text
            assert CircuitBreaker(10).read().state == CLOSED  # nothing done before confirming
            done = client.post(url, {"post": "yes", "reason": "provider incident"}, follow=True)
            assert [str(m) for m in done.context["messages"]] == ["Opened the circuit of chain 10."]
            assert CircuitBreaker(10).read().manual
            url = reverse("admin:intentqueue_breaker_close", args=["10"])
            client.post(url, {"post": "yes"}, follow=True)
            assert CircuitBreaker(10).read().state == CLOSED
        actions = list(OperatorAction.objects.order_by("at").values_list("actor", "action"))
        assert actions == [
            ("setup", "breaker_close"), ("admin", "breaker_open"), ("admin", "breaker_close")
        ]  # fmt: skip

    def test_needs_the_pause_permission(self, django_user_model: Any) -> None:
        user = django_user_model.objects.create_user("viewer", is_staff=True)
        user.user_permissions.add(Permission.objects.get(codename="view_queues"))
        client = Client()
        client.force_login(user)
        CircuitBreaker(10).record_failure()
        page = client.get(reverse("admin:intentqueue_queues")).text
        assert 'data-chain="10"' in page and "iq-button-breaker" not in page
        url = reverse("admin:intentqueue_breaker_open", args=["10"])
        assert client.post(url, {"post": "yes"}).status_code == 403
        assert not CircuitBreaker(10).read().manual and not OperatorAction.objects.exists()


# --- signer keys from an encrypted keystore ------------------------------------------------

PASSWORD = "correct horse battery staple"


@pytest.fixture
def keystore(solver: Solver, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The solver's key in an encrypted JSON keystore (cheap scrypt: tests only), unlocked
    by a password file; no plain key in the environment."""
    document = Account.encrypt(solver.key, PASSWORD, kdf="scrypt", iterations=2**10)
    path = tmp_path / "solver.json"
    path.write_text(json.dumps(document))
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    monkeypatch.delenv(wallets.KEY_ENV, raising=False)
    monkeypatch.delenv(wallets.KEYSTORE_PASSWORD_ENV, raising=False)
    monkeypatch.setenv(wallets.KEYSTORE_ENV, str(path))
    monkeypatch.setenv(wallets.KEYSTORE_PASSWORD_FILE_ENV, str(password_file))
    reset_caches()
    yield path
    reset_caches()


@pytest.mark.django_db
class TestKeystore:
    def test_keystore_signer_executes_an_intent(
        self, dev_chains: ChainPair, solver: Solver, keystore: Any
    ) -> None:
        fund_solver(dev_chains, solver, tokens=10 * TOKEN_UNIT)
        conf = {**settings.INTENTQUEUE, "chains": dev_chains.settings(), "strategies": STANDARD}
        with override_settings(INTENTQUEUE=conf):
            assert check_solver_keystore() == []
            wallet = wallets.get_wallet()
            assert wallet.address == solver.address
            secret = solver.key[2:].lower()
            assert secret not in repr(wallet).lower() and secret not in str(vars(wallet)).lower()
            intent = validated_intent(dev_chains, *make_intent_parts(dev_chains))
            result = execute(intent)
        assert result["status"] == S.FULFILLED
        signers = set(intent.chain_transactions.values_list("signer", flat=True))
        assert {s.lower() for s in signers} == {solver.address.lower()}

    def test_wrong_password_is_a_clear_error_at_start_and_in_a_job(
        self, dev_chains: ChainPair, solver: Solver, keystore: Any,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:  # fmt: skip
        monkeypatch.delenv(wallets.KEYSTORE_PASSWORD_FILE_ENV)
        monkeypatch.setenv(wallets.KEYSTORE_PASSWORD_ENV, "not the password")
        reset_caches()
        (error,) = check_solver_keystore()
        assert error.id == "intentqueue.E011"
        assert error.msg == (
            f"{wallets.KEYSTORE_ENV} ({keystore}): wrong password "
            f"(from {wallets.KEYSTORE_PASSWORD_ENV})"
        )
        conf = {**settings.INTENTQUEUE, "chains": dev_chains.settings(), "strategies": STANDARD}
        with override_settings(INTENTQUEUE=conf):
            intent = validated_intent(dev_chains, *make_intent_parts(dev_chains))
            data = JobData(intent.pk, intent.hash, intent.strategy, None).to_json()
            with pytest.raises(PermanentError, match="wrong password") as raised:
                BlockchainProcessor(None).process(data)
        text = str(raised.value) + repr(raised.value.__cause__) + repr(raised.value.__context__)
        assert "not the password" not in text and solver.key[2:] not in text

    def test_a_missing_password_and_a_non_keystore_are_named(
        self, keystore: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv(wallets.KEYSTORE_PASSWORD_FILE_ENV)
        with pytest.raises(wallets.WalletNotConfigured, match="has no password"):
            wallets.build_wallet("basic")
        monkeypatch.setenv(wallets.KEYSTORE_PASSWORD_ENV, PASSWORD)
        not_a_keystore = tmp_path / "key.txt"
        not_a_keystore.write_text("0x" + "11" * 32)
        monkeypatch.setenv(wallets.KEYSTORE_ENV, str(not_a_keystore))
        with pytest.raises(wallets.WalletNotConfigured, match="is not a JSON keystore"):
            wallets.build_wallet("basic")
        monkeypatch.setenv(wallets.KEY_ENV, "0x" + "22" * 32)
        with pytest.raises(wallets.WalletNotConfigured, match="set only one of"):
            wallets.build_wallet("basic")


# --- real workers ------------------------------------------------------------------------------


class _Down(dict[str, int]):
    """``RpcRelay.drops`` that drops every call of every method."""

    def get(self, key: str, default: Any = None) -> int:  # type: ignore[override]
        return 1

    def __getitem__(self, key: str) -> int:
        return 1

    def __setitem__(self, key: str, value: int) -> None:
        pass


def swapped(pair: ChainPair) -> ChainPair:
    """The pair the other way round: intents whose destination is the source chain."""
    return ChainPair(pair.destination, pair.source)


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
class TestWorkers:
    def test_a_down_chain_is_held_while_the_other_keeps_finishing(
        self, workers: Workers, dev_chains: ChainPair, solver: Solver, redis_client: redis.Redis
    ) -> None:
        fund_solver(dev_chains, solver, tokens=20 * TOKEN_UNIT)
        mint(dev_chains.source, solver.address, 20 * TOKEN_UNIT)
        down_id = str(dev_chains.destination.chain_id)
        other = swapped(dev_chains)
        with RpcRelay(dev_chains.destination.url) as relay:
            relay.drops = _Down()
            workers.extra_env.update(solver.env())
            with workers.configure(
                chains=dev_chains.settings(rpc_url=relay.url),
                strategies=STANDARD,
                breakers={"failure_threshold": 2, "cooldown": 4000},
                queues={"execution": {"default_job_options": {"attempts": 20}}},
            ):
                held = validated_intent(dev_chains, *make_intent_parts(dev_chains))
                running = [validated_intent(other, *make_intent_parts(other)) for _ in range(2)]
                service = QueueService()
                held_job = service.add_intent_to_execution_queue(held).job_id
                for intent in running:
                    service.add_intent_to_execution_queue(intent)
                workers.start("blockchain-execution")
                workers.start("blockchain-execution")

                breaker = CircuitBreaker(down_id)
                wait_for(lambda: breaker.read().state == OPEN, timeout=30)
                opened = time.monotonic()
                health = check_health()
                assert f"chain {down_id}: circuit open" in health["problems"]
                assert health["breakers"][down_id]["failures"] >= 2
                assert f'intentqueue_circuit_open{{chain="{down_id}"}} 1.0' in (
                    exposition().decode()
                )
                for intent in running:  # the other chain keeps finishing
                    wait_for(lambda i=intent: _status(i) == S.FULFILLED, timeout=40)
                assert _status(held) == S.EXECUTING  # held, not failed
                wait_for(lambda: _rechecks(redis_client, held_job) > 0, timeout=10)

                open_for = time.monotonic() - opened
                relay.drops = {}  # the RPC answers again: the next probe closes the circuit
                wait_for(lambda: _status(held) == S.FULFILLED, timeout=40)
                assert breaker.read().state == CLOSED
                recovered = time.monotonic() - opened
        network = held.timeline.filter(error_type="network").count()
        rechecks = _rechecks(redis_client, held_job)
        # two failures opened it; later runs while open used no attempt (only the failed
        # probes did, at most one per 4 s cool-down)
        assert 2 <= network <= 3 + open_for / 4, (network, open_for, workers.logs())
        assert rechecks >= 1
        print(f"\nbreaker: held job rechecked {rechecks}x, {network} network errors, "
              f"recovered {recovered:.1f}s after opening")  # fmt: skip

    def test_in_flight_bound_with_real_workers(
        self, workers: Workers, dev_chains: ChainPair, solver: Solver, redis_client: redis.Redis
    ) -> None:
        fund_solver(dev_chains, solver, tokens=20 * TOKEN_UNIT)
        key = f"intentqueue:inflight:{dev_chains.destination.chain_id}"
        workers.extra_env.update(solver.env())
        with workers.configure(
            chains=dev_chains.settings(), strategies=STANDARD,
            breakers={"max_in_flight_per_chain": 1},
        ):  # fmt: skip
            intents = [
                validated_intent(dev_chains, *make_intent_parts(dev_chains)) for _ in range(3)
            ]
            service = QueueService()
            job_ids = [service.add_intent_to_execution_queue(i).job_id for i in intents]
            for _ in range(3):
                workers.start("blockchain-execution")
            peak = 0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                peak = max(peak, int(redis_client.zcard(key)))
                if all(_status(i) == S.FULFILLED for i in intents):
                    break
                time.sleep(0.01)
        assert [_status(i) for i in intents] == [S.FULFILLED] * 3, workers.logs()
        assert peak == 1
        assert sum(_rechecks(redis_client, j) for j in job_ids) >= 1
        for intent in intents:  # held runs used no attempt and recorded no error
            assert not intent.timeline.exclude(error_type="").exists()

    def test_a_worker_with_a_wrong_keystore_password_refuses_to_start(
        self, workers: Workers, solver: Solver, keystore: Any
    ) -> None:
        env = {**workers.env(), wallets.KEYSTORE_PASSWORD_ENV: "not the password"}
        env.pop(wallets.KEYSTORE_PASSWORD_FILE_ENV, None)
        started = subprocess.run(
            [sys.executable, "manage.py", "rqworker", "blockchain-execution", "--burst"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        output = started.stdout + started.stderr
        assert started.returncode != 0
        assert "intentqueue.E011" in output and "wrong password" in output
        assert "not the password" not in output and solver.key[2:] not in output


def _status(intent: Any) -> str:
    intent.refresh_from_db(fields=["status"])
    return str(intent.status)


def _rechecks(client: redis.Redis, job_id: str) -> int:
    try:
        job = Job.fetch(job_id, connection=client, serializer=JSONSerializer)
    except Exception:
        return 0
    return int(job.meta.get("rechecks", 0))
