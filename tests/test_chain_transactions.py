"""Effectively-once transactions against real chains: nonces, lost broadcasts, taken
nonces, refusals, fillers, reorgs and fee bumps."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings
from django.utils import timezone
from eth_account import Account
from eth_utils import keccak, to_checksum_address
from web3 import Web3
from web3.datastructures import AttributeDict

from intentqueue.chain.client import ChainClient, get_client
from intentqueue.chain.config import parse_chain
from intentqueue.chain.models import ChainTransaction, SignerNonce
from intentqueue.chain.transactions import TransactionSender, TxRequest, TxState
from intentqueue.chain.wallets import get_wallet
from intentqueue.exceptions import InsufficientBalanceError, TransactionFailedError
from intentqueue.models import Intent
from intentqueue.status import IntentStatus
from tests.chainkit import (
    DESTINATION_ID,
    ChainPair,
    Solver,
    anvil,
    fund_solver,
    require_anvil,
)
from tests.factories import IntentFactory

pytestmark = pytest.mark.django_db

Status = ChainTransaction.Status
MARK = "0x000000000000000000000000000000000000dEaD"


@pytest.fixture
def sender(dev_chains: ChainPair, solver: Solver) -> Iterator[TransactionSender]:
    fund_solver(dev_chains, solver)
    chains = dev_chains.settings(confirmations=2)
    with override_settings(INTENTQUEUE={**settings.INTENTQUEUE, "chains": chains}):
        yield TransactionSender(get_client(DESTINATION_ID), get_wallet())


def transfer(value: int = 1, gas: int = 21_000, to: str = MARK) -> Any:
    return lambda: TxRequest(to=to, gas=gas, value=value)


def intent(status: IntentStatus = IntentStatus.EXECUTING) -> Intent:
    return IntentFactory(status=status)


def rows(**filters: Any) -> list[tuple[Any, ...]]:
    query = ChainTransaction.objects.filter(**filters).order_by("nonce", "id")
    return list(query.values_list("purpose", "nonce", "status"))


def settle_until(
    sender: TransactionSender, item: Intent, want: TxState, purpose: str = "fulfill"
) -> Any:
    import time

    deadline = time.monotonic() + 15
    while True:
        settled = sender.settle(item, purpose)
        if settled is not None and settled.state == want:
            return settled
        assert time.monotonic() < deadline, settled
        time.sleep(0.1)


def test_each_transaction_is_stored_before_it_is_sent_with_the_next_nonce(
    sender: TransactionSender,
) -> None:
    intents = [intent() for _ in range(3)]
    for item in intents:
        settled = sender.submit(item, "fulfill", transfer())
        assert settled.state in (TxState.MINED, TxState.CONFIRMED)
    stored = list(ChainTransaction.objects.order_by("nonce"))
    assert [t.nonce for t in stored] == [0, 1, 2]
    for row in stored:
        assert row.tx_hash == "0x" + keccak(row.raw_bytes).hex()
        assert row.signer == sender.signer and row.chain_id == DESTINATION_ID
    assert SignerNonce.objects.get(address=sender.signer).next_nonce == 3
    assert sender.client.nonce(sender.signer) == 3


def test_submitting_the_same_transaction_again_sends_nothing(sender: TransactionSender) -> None:
    item = intent()
    first = sender.submit(item, "fulfill", transfer())
    again = sender.submit(item, "fulfill", lambda: pytest.fail("built again"))
    assert first.tx is not None and again.tx is not None
    assert again.tx.tx_hash == first.tx.tx_hash
    assert ChainTransaction.objects.count() == 1 and sender.client.nonce(sender.signer) == 1
    final = settle_until(sender, item, TxState.CONFIRMED)
    assert final.confirmations >= 2 and final.block_number == first.block_number


def test_a_transaction_signed_but_never_sent_is_sent_as_stored(sender: TransactionSender) -> None:
    item = intent()
    fees = sender.client.fees()
    # A run that died between storing and broadcasting.
    row, created = sender._reserve(item, "fulfill", "", TxRequest(to=MARK, gas=21_000), fees)
    assert created and row.status == Status.SIGNED
    assert sender.client.receipt(row.tx_hash) is None
    settled = sender.settle(item, "fulfill")
    assert settled is not None and settled.tx is not None
    assert settled.tx.tx_hash == row.tx_hash  # the very same bytes, not a new signature
    settled = settle_until(sender, item, TxState.CONFIRMED)
    assert sender.client.nonce(sender.signer) == 1


def test_a_transaction_the_node_has_already_is_settled_by_its_hash(
    sender: TransactionSender,
) -> None:
    item = intent()
    row, _ = sender._reserve(item, "fulfill", "", TxRequest(to=MARK, gas=21_000),
                             sender.client.fees())  # fmt: skip
    # It reached the node, but the run never learned (a timeout, a crash).
    sender.client.send_raw(row.raw_bytes)
    sender._broadcast(row)  # "nonce too low" / "already known": not an error
    settled = settle_until(sender, item, TxState.CONFIRMED)
    assert settled.tx.tx_hash == row.tx_hash
    assert ChainTransaction.objects.count() == 1 and sender.client.nonce(sender.signer) == 1


def test_a_nonce_taken_by_another_transaction_is_signed_again(
    sender: TransactionSender, solver: Solver
) -> None:
    item = intent()
    row, _ = sender._reserve(item, "fulfill", "", TxRequest(to=MARK, gas=21_000, value=7),
                             sender.client.fees())  # fmt: skip
    # Something else used the account's nonce first.
    other = solver.account.sign_transaction(
        {"to": solver.address, "value": 0, "gas": 21_000, "nonce": row.nonce,
         "chainId": DESTINATION_ID, "maxFeePerGas": 10**10, "maxPriorityFeePerGas": 10**9}
    )  # fmt: skip
    sender.client.send_raw(bytes(other.raw_transaction))
    before = sender.client.balance(MARK)
    assert sender.settle(item, "fulfill").state == TxState.DROPPED
    settled = sender.submit(item, "fulfill", transfer(value=7))
    assert settled.tx.nonce == row.nonce + 1
    settle_until(sender, item, TxState.CONFIRMED)
    assert sender.client.balance(MARK) == before + 7  # sent once
    assert rows(intent=item) == [("fulfill", 0, "dropped"), ("fulfill", 1, "confirmed")]


def test_nonce_counter_follows_the_chain(sender: TransactionSender, solver: Solver) -> None:
    # The account was used outside the solver: the chain's count wins.
    for nonce in range(2):
        tx = solver.account.sign_transaction(
            {"to": MARK, "value": 0, "gas": 21_000, "nonce": nonce, "chainId": DESTINATION_ID,
             "maxFeePerGas": 10**10, "maxPriorityFeePerGas": 10**9}
        )  # fmt: skip
        sender.client.send_raw(bytes(tx.raw_transaction))
    assert sender.submit(intent(), "fulfill", transfer()).tx.nonce == 2
    # The counter is far ahead with nothing in flight (a dev chain restarted): rewound.
    SignerNonce.objects.filter(address=sender.signer).update(next_nonce=1000)
    assert sender.submit(intent(), "fulfill", transfer()).tx.nonce == 3
    assert SignerNonce.objects.get(address=sender.signer).next_nonce == 4


def test_a_revert_is_final(sender: TransactionSender, dev_chains: ChainPair) -> None:
    token = dev_chains.destination.token
    data = token.encode_abi("transferFrom", args=[MARK, MARK, 5])  # no allowance
    item = intent()
    settled = sender.submit(item, "fulfill", lambda: TxRequest(to=token.address, gas=100_000,
                                                               data=data))  # fmt: skip
    settled = settle_until(sender, item, TxState.REVERTED)
    row = ChainTransaction.objects.get(intent=item)
    assert row.status == Status.FAILED and row.block_number == settled.block_number
    assert "reverted in block" in row.error


def test_a_transaction_refused_for_good_gives_its_nonce_to_a_filler(
    sender: TransactionSender,
) -> None:
    item = intent()
    with pytest.raises(TransactionFailedError, match="intrinsic gas too low"):
        sender.submit(item, "fulfill", transfer(gas=20_000))
    assert rows() == [("fulfill", 0, "failed"), ("fill", 0, "sent")]
    filler = ChainTransaction.objects.get(purpose="fill")
    assert filler.to_address == sender.signer and int(filler.value) == 0
    assert (
        int(filler.max_fee_per_gas)
        >= int(ChainTransaction.objects.get(purpose="fulfill").max_fee_per_gas) * 1.1
    )
    # The nonce is used: the next transaction is not stuck behind a gap.
    settled = sender.submit(intent(), "fulfill", transfer())
    assert settled.tx.nonce == 1 and settled.succeeded


def test_an_abandoned_nonce_is_filled(sender: TransactionSender, dev_chains: ChainPair) -> None:
    item = intent()
    poor = TxRequest(to=MARK, gas=21_000, value=10**30)
    with pytest.raises(InsufficientBalanceError):
        sender.submit(item, "fulfill", lambda: poor)
    assert rows() == [("fulfill", 0, "signed")]  # reserved; a retry would send the same bytes
    # Its retries ran out: the intent is over and nobody will send that transaction.
    Intent.objects.filter(pk=item.pk).update(status=IntentStatus.FAILED)
    ChainTransaction.objects.update(updated_at=timezone.now() - timedelta(minutes=1))
    assert sender.repair() == 1
    assert rows() == [("fulfill", 0, "replaced"), ("fill", 0, "sent")]
    settled = sender.submit(intent(), "fulfill", transfer())
    assert settled.tx.nonce == 1
    settle_until(sender, Intent.objects.exclude(pk=item.pk).get(), TxState.CONFIRMED)
    assert sender.client.nonce(sender.signer) == 2


def test_a_receipt_from_a_block_that_is_no_longer_canonical_counts_as_not_mined(
    dev_chains: ChainPair, solver: Solver
) -> None:
    fund_solver(dev_chains, solver)
    chain = dev_chains.destination
    chains = dev_chains.settings(confirmations=50)
    with override_settings(INTENTQUEUE={**settings.INTENTQUEUE, "chains": chains}):
        sender = TransactionSender(get_client(DESTINATION_ID), get_wallet())
        snapshot = chain.w3.provider.make_request("evm_snapshot", [])["result"]  # type: ignore[arg-type]
        item = intent()
        mined = sender.submit(item, "fulfill", transfer())
        assert mined.state == TxState.MINED
        receipt = sender.client.receipt(mined.tx.tx_hash)
        assert receipt is not None and sender.client.is_canonical(receipt)
        forged = AttributeDict({**receipt, "blockHash": bytes(32)})
        assert not sender.client.is_canonical(forged)  # type: ignore[arg-type]
        # A reorg: the chain goes back before the transaction and grows other blocks.
        chain.w3.provider.make_request("evm_revert", [snapshot])  # type: ignore[arg-type]
        chain.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
        settled = sender.settle(item, "fulfill")
        assert settled.state == TxState.PENDING
        assert ChainTransaction.objects.get(intent=item).status == Status.SENT
        # The node lost it with the old blocks: sent again (the same bytes), mined again.
        ChainTransaction.objects.update(sent_at=timezone.now() - timedelta(seconds=10))
        settle_until(sender, item, TxState.MINED)
        assert ChainTransaction.objects.count() == 1
        assert sender.client.nonce(solver.address) == 1


def test_a_stuck_transaction_is_replaced_with_a_fee_bump(
    solver: Solver, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_anvil()
    with anvil(DESTINATION_ID, "--no-mining") as url:
        w3 = Web3(Web3.HTTPProvider(url))
        w3.provider.make_request("anvil_setBalance", [solver.address, hex(10**20)])  # type: ignore[arg-type]
        entry = {"rpc_url": url, "portal": MARK, "replace_after": 1, "confirmations": 1}
        chains = {str(DESTINATION_ID): entry}
        with override_settings(INTENTQUEUE={**settings.INTENTQUEUE, "chains": chains}):
            client = ChainClient(parse_chain(str(DESTINATION_ID), entry))
            sender = TransactionSender(client, get_wallet())
            item = intent()
            first = sender.submit(item, "fulfill", transfer(value=3))
            assert first.state == TxState.PENDING
            ChainTransaction.objects.update(sent_at=timezone.now() - timedelta(seconds=5))
            assert sender.settle(item, "fulfill").state == TxState.PENDING
            old, new = ChainTransaction.objects.order_by("id")
            assert (old.nonce, new.nonce, old.status, new.attempt) == (0, 0, "replaced", 1)
            assert int(new.max_priority_fee_per_gas) >= int(old.max_priority_fee_per_gas) * 1.1
            w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
            settled = sender.settle(item, "fulfill")
            assert settled.state == TxState.CONFIRMED and settled.tx.tx_hash == new.tx_hash
            assert rows() == [("fulfill", 0, "replaced"), ("fulfill", 0, "confirmed")]
            assert w3.eth.get_balance(to_checksum_address(MARK)) == 3
            assert w3.eth.get_transaction_count(solver.address) == 1
            assert Account  # the solver key signed both; only one was mined


def test_submit_repairs_abandoned_nonces_at_most_every_few_seconds(
    sender: TransactionSender,
) -> None:
    from intentqueue.chain import transactions

    transactions._last_repair.clear()
    poor = TxRequest(to=MARK, gas=21_000, value=10**30)
    first = intent()
    with pytest.raises(InsufficientBalanceError):
        sender.submit(first, "fulfill", lambda: poor)  # a repair pass ran here (nothing)
    Intent.objects.filter(pk=first.pk).update(status=IntentStatus.FAILED)
    ChainTransaction.objects.update(updated_at=timezone.now() - timedelta(minutes=1))
    # Abandoned now, but a pass ran less than ABANDONED_AFTER ago: not filled yet.
    with pytest.raises(InsufficientBalanceError):
        sender.submit(intent(), "fulfill", lambda: poor)
    assert ("fill", 0, "sent") not in rows()
    transactions._last_repair.clear()  # as if ABANDONED_AFTER had passed
    with pytest.raises(InsufficientBalanceError):
        sender.submit(intent(), "fulfill", lambda: poor)
    assert ("fill", 0, "sent") in rows()
