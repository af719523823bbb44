"""The execution stage on real chains: in-process runs of the processor, then real
``manage.py rqworker`` processes on the embedded dev chains and on anvil.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from django.conf import settings
from django.db import transaction
from django.test import override_settings

from intentqueue.chain.client import UINT256_MAX
from intentqueue.chain.config import ChainNotConfigured
from intentqueue.chain.models import ChainTransaction
from intentqueue.chain.wallets import WalletNotConfigured
from intentqueue.exceptions import (
    InsufficientBalanceError,
    TransactionFailedError,
)
from intentqueue.hashing import reward_hash, route_tuple
from intentqueue.models import Intent, IntentTransition
from intentqueue.queues import job_id_for
from intentqueue.services import QueueService, submit_intent
from intentqueue.status import IntentStatus as S
from tests.chainkit import (
    RECIPIENT,
    TOKEN_UNIT,
    ChainPair,
    RpcRelay,
    Solver,
    execute,
    free_port,
    fund_solver,
    make_intent_parts,
    mint,
    payload,
    publish,
    validated_intent,
)
from tests.conftest import Workers, wait_for
from tests.factories import transfer_data

STANDARD = {"standard": {"class": "intentqueue.strategies.standard.StandardStrategy"}}
NATIVE = {
    **STANDARD,
    "native-intents": {"class": "intentqueue.strategies.native.NativeIntentsStrategy"},
}
Status = ChainTransaction.Status


@contextmanager
def chains_configured(pair: ChainPair, **destination: Any) -> Iterator[None]:
    conf = {**settings.INTENTQUEUE, "chains": pair.settings(**destination), "strategies": NATIVE}
    with override_settings(INTENTQUEUE=conf):
        yield


def status_of(intent: Intent) -> str:
    intent.refresh_from_db()
    return intent.status


def approve_portal(pair: ChainPair, solver: Solver) -> None:
    """The solver's allowance to the destination portal, set up front."""
    destination = pair.destination
    call = destination.token.functions.approve(destination.portal.address, UINT256_MAX)
    destination.transact(call, sender=solver.account)


def fulfill_directly(pair: ChainPair, route: dict[str, Any], reward: dict[str, Any],
                     account: Any, ihash: str) -> str:  # fmt: skip
    """Fulfill on the destination from ``account`` (claimant: itself), outside the solver."""
    destination = pair.destination
    amount = sum(int(t["amount"]) for t in route["tokens"])
    mint(destination, account.address, amount)
    destination.transact(
        destination.token.functions.approve(destination.portal.address, amount), sender=account
    )
    claimant = bytes(12) + bytes.fromhex(account.address[2:])
    call = destination.portal.functions.fulfill(
        bytes.fromhex(ihash[2:]), route_tuple(route), reward_hash(reward), claimant
    )
    return str(destination.transact(call, sender=account)["transactionHash"].to_0x_hex())


# --- in-process --------------------------------------------------------------------------


@pytest.mark.django_db
class TestProcessor:
    def test_fulfills_once_and_records_tx_block_and_confirmations(
        self, dev_chains: ChainPair, solver: Solver
    ) -> None:
        fund_solver(dev_chains, solver, tokens=10 * TOKEN_UNIT)
        route, reward = make_intent_parts(dev_chains, amount=3 * TOKEN_UNIT)
        with chains_configured(dev_chains):
            intent = validated_intent(dev_chains, route, reward)
            before = dev_chains.destination.token.functions.balanceOf(RECIPIENT).call()
            result = execute(intent)
            assert result["status"] == S.FULFILLED
            assert execute(intent) == {"status": S.FULFILLED, "skipped": True}  # a late re-run
        assert status_of(intent) == S.FULFILLED
        done = intent.timeline.get(to_status=S.FULFILLED)
        assert done.extra["tx_hash"] == result["tx_hash"]
        assert done.extra["chain_id"] == dev_chains.destination.chain_id
        assert done.extra["confirmations"] >= 2 and done.extra["block"] == result["block"]
        transactions = list(intent.chain_transactions.values_list("purpose", "status"))
        assert transactions == [("approve", "confirmed"), ("fulfill", "confirmed")]
        (event,) = dev_chains.destination.fulfilled_events(intent.hash)
        assert event["transactionHash"].to_0x_hex() == result["tx_hash"]
        after = dev_chains.destination.token.functions.balanceOf(RECIPIENT).call()
        assert after - before == 3 * TOKEN_UNIT

    def test_already_fulfilled_by_us_ends_fulfilled_without_sending(
        self, dev_chains: ChainPair, solver: Solver
    ) -> None:
        fund_solver(dev_chains, solver)
        route, reward = make_intent_parts(dev_chains)
        with chains_configured(dev_chains):
            intent = validated_intent(dev_chains, route, reward)
            tx_hash = fulfill_directly(dev_chains, route, reward, solver.account, intent.hash)
            nonce = dev_chains.destination.w3.eth.get_transaction_count(solver.address)
            result = execute(intent)
        assert result["status"] == S.FULFILLED and result["tx_hash"] == tx_hash
        extra = intent.timeline.get(to_status=S.FULFILLED).extra
        assert extra["found_on_chain"] is True and extra["confirmations"] >= 2
        assert not ChainTransaction.objects.filter(intent=intent).exists()
        assert dev_chains.destination.w3.eth.get_transaction_count(solver.address) == nonce

    def test_fulfilled_by_another_solver_fails_with_a_note_without_sending(
        self, dev_chains: ChainPair, solver: Solver
    ) -> None:
        fund_solver(dev_chains, solver, tokens=10 * TOKEN_UNIT)
        route, reward = make_intent_parts(dev_chains)
        rival = dev_chains.destination.funder
        with chains_configured(dev_chains):
            intent = validated_intent(dev_chains, route, reward)
            tx_hash = fulfill_directly(dev_chains, route, reward, rival, intent.hash)
            result = execute(intent)  # completes: nothing to retry
        assert status_of(intent) == S.FAILED and result["fulfilled_by_other"] is True
        assert intent.last_error_type == "fulfilled_by_other"
        assert f"by another solver (claimant 0x{'00' * 12}{rival.address[2:].lower()})" in (
            intent.last_error
        )
        assert tx_hash in intent.last_error
        assert dev_chains.destination.w3.eth.get_transaction_count(solver.address) == 0
        assert len(dev_chains.destination.fulfilled_events(intent.hash)) == 1

    def test_a_fulfill_that_would_revert_fails_before_anything_is_sent(
        self, dev_chains: ChainPair, solver: Solver
    ) -> None:
        fund_solver(dev_chains, solver, tokens=10 * TOKEN_UNIT)
        approve_portal(dev_chains, solver)
        token = dev_chains.destination.token.address
        # The call moves more than the route brings to the portal.
        calls = [{"target": token, "data": transfer_data(RECIPIENT, 6 * TOKEN_UNIT), "value": 0}]
        route, reward = make_intent_parts(dev_chains, amount=5 * TOKEN_UNIT, calls=calls)
        with chains_configured(dev_chains):
            intent = validated_intent(dev_chains, route, reward)
            with pytest.raises(TransactionFailedError, match=r"CallFailed\(uint256,bytes\)"):
                execute(intent)
        assert not ChainTransaction.objects.filter(intent=intent).exists()

    def test_short_balance_is_found_before_a_nonce_is_reserved(
        self, dev_chains: ChainPair, solver: Solver
    ) -> None:
        fund_solver(dev_chains, solver, tokens=TOKEN_UNIT)
        approve_portal(dev_chains, solver)
        route, reward = make_intent_parts(dev_chains, amount=2 * TOKEN_UNIT)
        with chains_configured(dev_chains):
            intent = validated_intent(dev_chains, route, reward)
            with pytest.raises(InsufficientBalanceError, match="the route needs"):
                execute(intent)
        assert status_of(intent) == S.EXECUTING
        assert not ChainTransaction.objects.filter(intent=intent).exists()

    def test_native_route_is_paid_as_the_fulfill_value(
        self, dev_chains: ChainPair, solver: Solver
    ) -> None:
        fund_solver(dev_chains, solver)
        route, reward = make_intent_parts(dev_chains, native=10**15)
        w3 = dev_chains.destination.w3
        with chains_configured(dev_chains):
            intent = validated_intent(dev_chains, route, reward, strategy="native-intents")
            before = w3.eth.get_balance(RECIPIENT)
            assert execute(intent)["status"] == S.FULFILLED
            # The standard strategy does not deliver native value.
            other = validated_intent(dev_chains, *make_intent_parts(dev_chains, native=10**15))
            with pytest.raises(Exception, match="does not deliver native value"):
                execute(other)
        assert w3.eth.get_balance(RECIPIENT) - before == 10**15
        assert list(intent.chain_transactions.values_list("purpose", flat=True)) == ["fulfill"]

    def test_configuration_problems_are_permanent(
        self, dev_chains: ChainPair, solver: Solver
    ) -> None:
        route, reward = make_intent_parts(dev_chains)
        with chains_configured(dev_chains):
            intent = validated_intent(dev_chains, route, reward)
            with pytest.raises(WalletNotConfigured, match="wallet type 'kernel' is not configured"):
                execute(intent, wallet_type="kernel")
        unconfigured = override_settings(INTENTQUEUE={**settings.INTENTQUEUE, "chains": {}})
        with unconfigured, pytest.raises(ChainNotConfigured, match="chain 31338 is not"):
            execute(intent)
        assert status_of(intent) == S.VALIDATED  # nothing claimed, nothing sent

    def test_nothing_to_do_for_finished_or_unvalidated_intents(
        self, dev_chains: ChainPair, solver: Solver
    ) -> None:
        with chains_configured(dev_chains):
            for status in (S.FULFILLED, S.FAILED, S.INVALID, S.PENDING):
                intent = validated_intent(dev_chains, *make_intent_parts(dev_chains))
                Intent.objects.filter(pk=intent.pk).update(status=status)
                intent.refresh_from_db()
                assert execute(intent) == {"status": status, "skipped": True}


# --- real workers ------------------------------------------------------------------------

FAST_STALLS = {"stalled_interval": 1000, "lock_duration": 1000, "max_stalled_count": 3}


def configure(workers: Workers, pair: ChainPair, solver: Solver, **options: Any) -> Any:
    """Workers on ``pair`` with the standard strategy (on-chain checks included) and the
    solver's key in their environment."""
    workers.extra_env.update(solver.env())
    execution = options.pop("execution", {})
    destination = options.pop("destination", {})
    return workers.configure(
        chains=pair.settings(**destination),
        strategies=STANDARD,
        queues={"execution": {"default_job_options": execution}} if execution else {},
        **options,
    )


def enqueue(intent: Intent) -> str:
    return QueueService().add_intent_to_execution_queue(intent).job_id


def one_event(pair: ChainPair, intent: Intent) -> str:
    events = pair.destination.fulfilled_events(intent.hash)
    assert len(events) == 1, events
    return str(events[0]["transactionHash"].to_0x_hex())


def assert_key_never_shown(solver: Solver, workers: Workers, client: redis.Redis) -> None:
    secret = solver.key[2:].lower()
    assert secret not in workers.logs(tail=None).lower()
    for key in client.scan_iter():
        kind = client.type(key)
        if kind == b"hash":
            blob = b" ".join(v for v in client.hgetall(key).values())
        elif kind == b"string":
            blob = client.get(key) or b""
        else:
            continue
        assert secret.encode() not in blob.lower(), key
    for row in IntentTransition.objects.all():
        assert secret not in (row.error + str(row.extra)).lower()


def happy_path(workers: Workers, pair: ChainPair, solver: Solver, client: redis.Redis) -> None:
    fund_solver(pair, solver, tokens=100 * TOKEN_UNIT)
    route, reward = make_intent_parts(pair)
    publish(pair, route, reward)
    with configure(workers, pair, solver):
        workers.start("intent-fulfillment")
        workers.start("blockchain-execution")
        intent = submit_intent(payload(pair, route, reward))
        wait_for(lambda: status_of(intent) in (S.FULFILLED, S.FAILED, S.INVALID), timeout=60)
    assert intent.status == S.FULFILLED, (intent.last_error, workers.logs())
    steps = list(intent.timeline.values_list("from_status", "to_status", "error_type"))
    assert steps == [
        ("PENDING", "VALIDATING", ""), ("VALIDATING", "VALIDATED", ""),
        ("VALIDATED", "EXECUTING", ""), ("EXECUTING", "FULFILLED", ""),
    ]  # fmt: skip
    done = intent.timeline.get(to_status=S.FULFILLED)
    assert done.queue == "blockchain-execution"
    assert done.extra["tx_hash"] == one_event(pair, intent)
    assert done.extra["block"] > 0 and done.extra["confirmations"] >= 2
    assert done.extra["chain_id"] == pair.destination.chain_id
    assert_key_never_shown(solver, workers, client)


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
class TestWorkers:
    def test_happy_path_on_the_dev_chain(
        self, workers: Workers, dev_chains: ChainPair, solver: Solver, redis_client: redis.Redis
    ) -> None:
        happy_path(workers, dev_chains, solver, redis_client)

    def test_happy_path_on_anvil(
        self, workers: Workers, anvil_chains: ChainPair, solver: Solver,
        redis_client: redis.Redis,
    ) -> None:  # fmt: skip
        happy_path(workers, anvil_chains, solver, redis_client)

    def test_funding_seen_late_is_retried_then_executed(
        self, workers: Workers, dev_chains: ChainPair, solver: Solver
    ) -> None:
        fund_solver(dev_chains, solver, tokens=10 * TOKEN_UNIT)
        route, reward = make_intent_parts(dev_chains)
        retries = {"attempts": 5, "backoff": {"type": "fixed", "delay": 1000}}
        with configure(workers, dev_chains, solver):
            fulfillment = {"fulfillment": {"default_job_options": retries}}
            with workers.configure(queues=fulfillment):
                workers.start("intent-fulfillment")
                workers.start("blockchain-execution")
                intent = submit_intent(payload(dev_chains, route, reward))  # not funded yet
                wait_for(lambda: intent.timeline.filter(error_type="transient").exists())
                publish(dev_chains, route, reward)
                wait_for(lambda: status_of(intent) in (S.FULFILLED, S.FAILED), timeout=40)
        assert intent.status == S.FULFILLED, intent.last_error
        error = intent.timeline.filter(error_type="transient").first()
        assert error is not None and "intent_funded: the reward is not funded" in error.error
        one_event(dev_chains, intent)

    def test_worker_killed_right_after_broadcast(
        self, workers: Workers, dev_chains: ChainPair, solver: Solver
    ) -> None:
        fund_solver(dev_chains, solver, tokens=10 * TOKEN_UNIT)
        approve_portal(dev_chains, solver)
        with RpcRelay(dev_chains.destination.url) as relay:
            relay.hold("eth_sendRawTransaction")  # forwarded to the chain, never answered
            with configure(workers, dev_chains, solver, worker=FAST_STALLS,
                           destination={"rpc_url": relay.url}):  # fmt: skip
                intent = validated_intent(dev_chains, *make_intent_parts(dev_chains))
                enqueue(intent)
                victim = workers.start("blockchain-execution")
                wait_for(lambda: dev_chains.destination.fulfilled_events(intent.hash), timeout=30)
                workers.kill(victim)  # the transaction is on chain; its worker never learned
                relay.clear()
                row = ChainTransaction.objects.get(intent=intent, purpose="fulfill")
                assert row.status == Status.SIGNED  # stored before it was sent
                workers.start("blockchain-execution")
                wait_for(lambda: status_of(intent) == S.FULFILLED, timeout=40)
        assert one_event(dev_chains, intent) == row.tx_hash
        assert ChainTransaction.objects.filter(intent=intent, purpose="fulfill").count() == 1
        assert intent.timeline.filter(error_type="stalled").count() == 1
        assert intent.timeline.get(to_status=S.FULFILLED).extra["tx_hash"] == row.tx_hash

    def test_the_same_job_delivered_several_times(
        self, workers: Workers, dev_chains: ChainPair, solver: Solver, redis_client: redis.Redis
    ) -> None:
        fund_solver(dev_chains, solver, tokens=10 * TOKEN_UNIT)
        with configure(workers, dev_chains, solver):
            intent = validated_intent(dev_chains, *make_intent_parts(dev_chains))
            job_id = enqueue(intent)
            for _ in range(3):  # at-least-once delivery: the same job id, again and again
                redis_client.rpush("rq:queue:blockchain-execution", job_id)
            for _ in range(3):
                workers.start("blockchain-execution")
            wait_for(lambda: status_of(intent) == S.FULFILLED, timeout=40)
            time.sleep(2)  # let the duplicates finish too
        one_event(dev_chains, intent)
        rows = ChainTransaction.objects.filter(intent=intent).values_list("purpose", "status")
        assert sorted(rows) == [("approve", "confirmed"), ("fulfill", "confirmed")]
        assert intent.timeline.filter(to_status=S.FULFILLED).count() == 1

    def test_lost_receipt_lookups_are_retried_without_sending_again(
        self, workers: Workers, dev_chains: ChainPair, solver: Solver
    ) -> None:
        fund_solver(dev_chains, solver, tokens=10 * TOKEN_UNIT)
        approve_portal(dev_chains, solver)
        with RpcRelay(dev_chains.destination.url) as relay:
            relay.drop("eth_getTransactionReceipt", 2)
            with configure(workers, dev_chains, solver, destination={"rpc_url": relay.url},
                           execution={"attempts": 4}):  # fmt: skip
                intent = validated_intent(dev_chains, *make_intent_parts(dev_chains))
                enqueue(intent)
                workers.start("blockchain-execution")
                wait_for(lambda: status_of(intent) in (S.FULFILLED, S.FAILED), timeout=40)
        assert intent.status == S.FULFILLED, intent.last_error
        one_event(dev_chains, intent)
        assert ChainTransaction.objects.filter(intent=intent).count() == 1
        errors = list(
            intent.timeline.filter(error_type="network").values_list("attempt", flat=True)
        )
        assert errors == [1, 2]

    def test_four_workers_one_signer_two_hundred_intents(
        self, workers: Workers, anvil_chains: ChainPair, solver: Solver
    ) -> None:
        # On anvil: the embedded chain serialises every call in this test's process and
        # manages about 5 fulfillments a second, anvil about 18 (2 cores, 4 workers).
        chains = anvil_chains
        count = 200
        fund_solver(chains, solver, tokens=count * TOKEN_UNIT)
        with configure(workers, chains, solver):
            with transaction.atomic():
                intents = [
                    validated_intent(chains, *make_intent_parts(chains, amount=TOKEN_UNIT))
                    for _ in range(count)
                ]
            for _ in range(4):
                workers.start("blockchain-execution")
            time.sleep(3)  # let them start: the measurement covers the jobs only
            started = time.monotonic()
            for intent in intents:
                enqueue(intent)
            wait_for(
                lambda: Intent.objects.filter(status=S.FULFILLED).count() == count,
                timeout=120, interval=0.5,
            )  # fmt: skip
            elapsed = time.monotonic() - started
        print(f"\n{count} intents fulfilled by 4 workers in {elapsed:.1f}s "
              f"({count / elapsed:.1f}/s)")  # fmt: skip
        fulfills = ChainTransaction.objects.filter(purpose="fulfill")
        assert fulfills.filter(status=Status.CONFIRMED).count() == count
        assert not fulfills.exclude(status=Status.CONFIRMED).exists()
        assert not IntentTransition.objects.exclude(error="").exists()
        nonces = sorted(ChainTransaction.objects.exclude(status__in=["dropped", "replaced"])
                        .values_list("nonce", flat=True))  # fmt: skip
        chain_nonce = chains.destination.w3.eth.get_transaction_count(solver.address)
        assert nonces == list(range(chain_nonce))  # no gap, no nonce used twice
        events = chains.destination.fulfilled_events(None)
        ours = Counter(e["topics"][1].to_0x_hex() for e in events) & Counter(
            {i.hash: count for i in intents}
        )
        assert set(ours.values()) == {1} and len(ours) == count  # one event per intent

    def test_insufficient_balance_is_retried_with_backoff(
        self, workers: Workers, dev_chains: ChainPair, solver: Solver
    ) -> None:
        fund_solver(dev_chains, solver)  # gas money, no tokens
        backoff = {"attempts": 3, "backoff": {"type": "fixed", "delay": 2000}}
        with configure(workers, dev_chains, solver, execution=backoff):
            intent = validated_intent(dev_chains, *make_intent_parts(dev_chains))
            enqueue(intent)
            workers.start("blockchain-execution")
            wait_for(lambda: intent.timeline.filter(error_type="insufficient_balance").exists())
            mint(dev_chains.destination, solver.address, 10 * TOKEN_UNIT)  # topped up
            wait_for(lambda: status_of(intent) in (S.FULFILLED, S.FAILED), timeout=40)
        assert intent.status == S.FULFILLED, intent.last_error
        error = intent.timeline.get(error_type="insufficient_balance")
        assert error.attempt == 1 and "the route needs" in error.error
        done = intent.timeline.get(to_status=S.FULFILLED)
        assert (done.at - error.at).total_seconds() >= 1.5  # waited for the backoff
        assert intent.chain_transactions.filter(purpose="fulfill").count() == 1

    def test_rpc_down_is_retried_at_once_then_fails(
        self, workers: Workers, dev_chains: ChainPair, solver: Solver
    ) -> None:
        slow_backoff = {"attempts": 3, "backoff": {"type": "exponential", "delay": 30000}}
        closed = f"http://127.0.0.1:{free_port()}"
        with configure(workers, dev_chains, solver, execution=slow_backoff,
                       destination={"rpc_url": closed}):  # fmt: skip
            intent = validated_intent(dev_chains, *make_intent_parts(dev_chains))
            started = time.monotonic()
            enqueue(intent)
            workers.start("blockchain-execution")
            wait_for(lambda: status_of(intent) == S.FAILED, timeout=30)
        assert time.monotonic() - started < 20  # no 30 s backoff was waited
        errors = list(
            intent.timeline.filter(error_type="network").values_list("attempt", flat=True)
        )
        assert errors == [1, 2, 3]
        assert intent.last_error_type == "network" and "RPC unreachable" in intent.last_error

    def test_a_revert_fails_the_intent_without_retry(
        self, workers: Workers, dev_chains: ChainPair, solver: Solver
    ) -> None:
        fund_solver(dev_chains, solver, tokens=10 * TOKEN_UNIT)
        token = dev_chains.destination.token.address
        calls = [{"target": token, "data": transfer_data(RECIPIENT, 9 * TOKEN_UNIT), "value": 0}]
        with configure(workers, dev_chains, solver):
            intent = validated_intent(dev_chains, *make_intent_parts(dev_chains, calls=calls))
            job_id = enqueue(intent)
            workers.start("blockchain-execution")
            wait_for(lambda: status_of(intent) == S.FAILED, timeout=30)
        assert intent.last_error_type == "transaction_failed"
        assert "fulfill would revert" in intent.last_error
        assert intent.timeline.filter(to_status=S.EXECUTING).count() == 1  # no retry
        failed = [j for _, j in QueueService().failed_job_ids("blockchain-execution")]
        assert failed == [job_id] and job_id == job_id_for("execution", intent.hash)
        assert not intent.chain_transactions.filter(purpose="fulfill").exists()
