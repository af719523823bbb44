"""The execution stage: fulfil a validated intent on its destination chain.

An execution job may run many times: it is re-run while its transaction waits for
confirmations (``RecheckLater``, no attempt used), retried after errors, delivered twice,
or recovered after its worker died. Every run therefore starts from what the chain and
the database say, and sends nothing that was sent before (``chain.transactions``):

1. An intent that is FULFILLED, FAILED or INVALID already: nothing to do.
2. VALIDATED -> EXECUTING (guarded; a re-run leaves EXECUTING as it is).
3. ``Portal.fulfilled(intentHash)`` on the destination chain, and our own fulfill
   transaction if there is one. Ours is settled by its hash: confirmed -> FULFILLED with
   tx hash, block and confirmations on the timeline; mined or pending -> check again in a
   second; reverted -> FAILED (no retry).
4. Fulfilled on chain and no transaction of ours (a run whose records were lost, or
   another solver): the ``IntentFulfilled`` event names the transaction. When the
   claimant is our wallet the intent becomes FULFILLED with that transaction; when it is
   someone else's the intent becomes FAILED with error type ``fulfilled_by_other`` and a
   note naming the claimant and transaction (we delivered nothing and earn no reward, so
   it must not count as our fulfillment), and the job completes: retrying cannot help.
5. Otherwise each route token whose allowance to the portal is short is approved (one
   transaction per token, the maximum amount, so concurrent intents of the same token do
   not overwrite each other's allowance), and once the approvals are mined
   ``Portal.fulfill(intentHash, route, rewardHash, claimant)`` is sent with the route's
   native amount as value. Balances are checked and gas estimated before a nonce is
   reserved: a short balance is ``InsufficientBalanceError`` (backoff), a call that would
   revert is ``TransactionFailedError`` (FAILED, no retry).
"""

from __future__ import annotations

import functools
import logging
import math
from collections import defaultdict
from datetime import datetime
from typing import Any, Final

from django.core.exceptions import ImproperlyConfigured
from eth_abi import encode as abi_encode
from eth_utils.abi import collapse_if_tuple
from web3.exceptions import ContractLogicError

from intentqueue.breakers import CircuitBreaker, InFlightLimit
from intentqueue.chain.client import (
    UINT256_MAX,
    ZERO_BYTES32,
    ChainClient,
    checksum,
    classify,
    contract_abi,
    describe_revert,
    get_client,
    revert_selector,
    selector,
)
from intentqueue.chain.config import ChainConfig, get_chain
from intentqueue.chain.models import ChainTransaction
from intentqueue.chain.transactions import Settlement, TransactionSender, TxRequest, TxState
from intentqueue.chain.wallets import Wallet, get_wallet
from intentqueue.exceptions import (
    IllegalTransitionError,
    InsufficientBalanceError,
    IntentQueueError,
    PermanentError,
    RecheckLater,
    TransactionFailedError,
    ValidationFailed,
)
from intentqueue.hashing import reward_hash, route_tuple
from intentqueue.models import Intent
from intentqueue.processors.base import JobContext, JobData, Processor
from intentqueue.status import TERMINAL, IntentStatus
from intentqueue.strategies import get_strategy
from intentqueue.strategies.base import to_amount, token_amounts

logger = logging.getLogger(__name__)

Purpose = ChainTransaction.Purpose

#: Seconds between looks at a transaction waiting to be mined or confirmed.
RECHECK_SECONDS: Final = 1
#: Gas limit = estimate * GAS_MARGIN (estimates are exact for the state they ran on).
GAS_MARGIN: Final = 1.25
#: Statuses in which an execution job has nothing to do (yet).
_NOT_READY = {IntentStatus.PENDING, IntentStatus.VALIDATING}


class BlockchainProcessor(Processor):
    """Sends an intent's fulfillment on its destination chain, effectively once."""

    stage_key = "execution"

    def handle(self, intent: Intent, data: JobData) -> dict[str, Any]:
        if intent.status in TERMINAL or intent.status in _NOT_READY:
            logger.info("intent %s is %s: nothing to execute", intent.hash, intent.status)
            return {"status": intent.status, "skipped": True}
        try:
            strategy = get_strategy(data.strategy)
            chain = get_chain(intent.destination_chain_id)
        except ImproperlyConfigured as error:
            raise PermanentError(f"misconfigured: {error}") from error
        wallet = get_wallet(data.wallet_type)
        execution = Execution(intent, chain, get_client(chain.chain_id), wallet, self.context)
        if not strategy.supports_native_value and execution.native_value:
            raise PermanentError(
                f"strategy {strategy.name!r} does not deliver native value "
                f"({execution.native_value} wei in the route)"
            )
        # Protective controls (``intentqueue.breakers``): an open circuit or a full chain
        # holds the job without using an attempt; other chains are not affected.
        job_id = self.context.job_id
        with (
            InFlightLimit(chain.chain_id).slot(job_id),
            CircuitBreaker(chain.chain_id).guard(job_id),
        ):
            return execution.run()


class Execution:
    """One run of an execution job for one intent."""

    def __init__(
        self,
        intent: Intent,
        chain: ChainConfig,
        client: ChainClient,
        wallet: Wallet,
        context: JobContext,
    ) -> None:
        self.intent = intent
        self.chain = chain
        self.client = client
        self.wallet = wallet
        self.context = context
        self.sender = TransactionSender(client, wallet)
        self.started_at: datetime | None = None
        self.rows: list[ChainTransaction] | None = None
        self._sent = False
        try:
            self.route_tokens = _aggregate(token_amounts(intent.route_tokens, "route_tokens"))
            self.native_value = to_amount(intent.route_native_amount, "route_native_amount")
        except ValidationFailed as error:
            raise PermanentError(f"unreadable route: {error}") from error

    # --- the run ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        if not self._claim():
            return {"status": self.intent.status, "skipped": True}
        # The intent's transactions, loaded once for this run (``_sent`` says whether the
        # run sent any since, which makes them out of date).
        self.rows = self.sender.rows_of(self.intent)
        settled = self.sender.settle(
            self.intent, Purpose.FULFILL, since=self.started_at, rows=self.rows
        )
        if settled is not None and settled.state != TxState.DROPPED:
            # Our own transaction decides; the portal is asked only if it reverted.
            return self._follow(settled)
        if settled is not None:  # dropped: the settlement changed rows we hold
            self._sent = True
        claimant = self.client.fulfilled(self.intent.hash)
        if claimant != ZERO_BYTES32:
            return self._already_fulfilled(claimant)
        self._approve_route_tokens()
        if self._sent:
            self.rows = self.sender.rows_of(self.intent)
        try:
            # The settlement above found no live fulfill transaction (or a dropped one,
            # which ``submit`` settles again from the rows); the reservation checks again
            # under the signer's lock.
            settled = self.sender.submit(
                self.intent, Purpose.FULFILL, self._build_fulfill, since=self.started_at,
                rows=self.rows,
            )  # fmt: skip
        except _AlreadyFulfilledError:
            return self._already_fulfilled(self.client.fulfilled(self.intent.hash))
        return self._follow(settled)

    def _claim(self) -> bool:
        """VALIDATED -> EXECUTING; False if the intent moved on meanwhile.

        Sets ``started_at``, when this execution began: transactions that reverted before
        it (an operator retried the intent) do not stop it from trying again.
        """
        if self.intent.status == IntentStatus.EXECUTING:
            self.started_at = (
                self.intent.timeline.filter(
                    to_status=IntentStatus.EXECUTING, from_status=IntentStatus.VALIDATED
                )
                .order_by("-at")
                .values_list("at", flat=True)
                .first()
            )
            return True
        try:
            entry = self.intent.start_execution(
                attempts=self.context.attempt, **self.context.as_kwargs()
            )
        except IllegalTransitionError:
            self.intent.refresh_from_db(fields=["status"])
            logger.info("intent %s is %s: not executing", self.intent.hash, self.intent.status)
            return False
        self.started_at = entry.at
        return True

    def _follow(self, settled: Settlement) -> dict[str, Any]:
        """Act on the state of our fulfill transaction."""
        tx = settled.tx
        assert tx is not None
        if settled.state == TxState.CONFIRMED:
            return self._finish(tx.tx_hash, settled.block_number, settled.confirmations, tx=tx)
        if settled.state == TxState.REVERTED:
            claimant = self.client.fulfilled(self.intent.hash)
            if claimant != ZERO_BYTES32:  # someone got there first; ours reverted on that
                return self._already_fulfilled(claimant, reverted=tx.tx_hash)
            raise TransactionFailedError(
                f"fulfill transaction {tx.tx_hash} reverted in block {settled.block_number} "
                f"on chain {self.chain.chain_id}"
            )
        if settled.state == TxState.MINED:
            raise RecheckLater(
                f"tx {tx.tx_hash}: {settled.confirmations} of {self.chain.confirmations} "
                "confirmations",
                RECHECK_SECONDS,
            )
        if settled.state == TxState.DROPPED:
            raise RecheckLater(f"nonce of tx {tx.tx_hash} was taken: signing again", 0)
        raise RecheckLater(f"tx {tx.tx_hash} (nonce {tx.nonce}) not mined yet", RECHECK_SECONDS)

    def _finish(
        self,
        tx_hash: str,
        block: int | None,
        confirmations: int,
        *,
        tx: ChainTransaction | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        details: dict[str, Any] = {
            "chain_id": self.chain.chain_id,
            "block": block,
            "confirmations": confirmations,
            **extra,
        }
        if tx is not None:
            details.update(
                block_hash=tx.block_hash or None, nonce=tx.nonce, signer=tx.signer,
                gas_used=tx.gas_used,
            )  # fmt: skip
        try:
            self.intent.mark_fulfilled(tx_hash, extra=details, **self.context.as_kwargs())
        except IllegalTransitionError:  # a duplicate run finished first
            self.intent.refresh_from_db(fields=["status"])
            return {"status": self.intent.status, "tx_hash": tx_hash, "skipped": True}
        logger.info("intent %s fulfilled by %s in block %s", self.intent.hash, tx_hash, block)
        self._settle_approvals()
        return {"status": IntentStatus.FULFILLED, "tx_hash": tx_hash, "block": block,
                "confirmations": confirmations}  # fmt: skip

    def _settle_approvals(self) -> None:
        """Record the final state of this intent's approvals (best effort: they were only
        waited for until mined)."""
        rows = None if self._sent else self.rows
        for token in self.route_tokens:
            subject = token.lower()
            if rows is not None and not any(
                row.purpose == Purpose.APPROVE and row.subject == subject for row in rows
            ):
                continue  # no approval of this token by this intent
            try:
                self.sender.settle(self.intent, Purpose.APPROVE, subject, rows=rows)
            except IntentQueueError as error:
                logger.info("intent %s: approval of %s not settled: %s", self.intent.hash, token,
                            error)  # fmt: skip

    # --- fulfilled without a transaction of ours ------------------------------------------

    def _already_fulfilled(self, claimant: bytes, *, reverted: str = "") -> dict[str, Any]:
        ours = claimant == self.wallet.claimant
        who = "0x" + claimant.hex()
        event = self.client.fulfilled_event(self.intent.hash, claimant)
        note: dict[str, Any] = {"claimant": who, "found_on_chain": True}
        if reverted:
            note["reverted_tx"] = reverted
        if event is None:
            if not ours:
                return self._fulfilled_by_other(who, None, note)
            logger.warning("intent %s: fulfilled for us, no event in the last %s blocks",
                           self.intent.hash, self.chain.log_lookback)  # fmt: skip
            return self._finish("", None, 0, note="fulfilled on chain; transaction not found",
                                **note)  # fmt: skip
        found = self.client.mined(event["tx_hash"])
        if found is None:
            raise RecheckLater(f"fulfilling tx {event['tx_hash']} not canonical", RECHECK_SECONDS)
        receipt, head = found
        confirmations = head - int(receipt["blockNumber"]) + 1
        if confirmations < self.chain.confirmations:
            raise RecheckLater(
                f"fulfilling tx {event['tx_hash']}: {confirmations} of "
                f"{self.chain.confirmations} confirmations",
                RECHECK_SECONDS,
            )
        note["block_hash"] = event["block_hash"]
        if not ours:
            return self._fulfilled_by_other(who, event, {**note, "confirmations": confirmations})
        return self._finish(event["tx_hash"], event["block"], confirmations, **note)

    def _fulfilled_by_other(
        self, claimant: str, event: dict[str, Any] | None, note: dict[str, Any]
    ) -> dict[str, Any]:
        where = f" in tx {event['tx_hash']} (block {event['block']})" if event else ""
        message = (
            f"fulfilled on chain {self.chain.chain_id} by another solver (claimant "
            f"{claimant}){where}; nothing was sent"
        )
        extra = {**note, "tx_hash": event["tx_hash"] if event else None,
                 "block": event["block"] if event else None}  # fmt: skip
        try:
            self.intent.mark_failed(
                message, "fulfilled_by_other", extra=extra, **self.context.as_kwargs()
            )
        except IllegalTransitionError:
            self.intent.refresh_from_db(fields=["status"])
        logger.warning("intent %s: %s", self.intent.hash, message)
        return {"status": self.intent.status, "fulfilled_by_other": True, **extra}

    # --- approvals ----------------------------------------------------------------------

    def _approve_route_tokens(self) -> None:
        """Approve every route token whose allowance is short; wait until they are mined."""
        portal, signer = self.chain.portal, self.wallet.address
        waiting = []
        for token, amount in self.route_tokens.items():
            if self.client.allowance(token, signer, portal) >= amount:
                continue
            settled = self.sender.submit(
                self.intent, Purpose.APPROVE, self._approval(token), subject=token.lower(),
                since=self.started_at, rows=None if self._sent else self.rows,
            )  # fmt: skip
            self._sent = True
            if settled.state == TxState.REVERTED:
                assert settled.tx is not None
                raise TransactionFailedError(
                    f"approval of {token} reverted: tx {settled.tx.tx_hash} on chain "
                    f"{self.chain.chain_id}"
                )
            if not settled.succeeded:
                waiting.append(token)
        if waiting:
            raise RecheckLater(f"waiting for approvals of {', '.join(waiting)}", RECHECK_SECONDS)

    def _approval(self, token: str) -> Any:
        def build() -> TxRequest:
            contract = self.client.token(token)
            data = contract.encode_abi("approve", args=[self.chain.portal, UINT256_MAX])
            gas = self._estimate(token, data, 0, what=f"approve {token}")
            fees = self._check_native(gas, 0)
            return TxRequest(to=checksum(token), gas=gas, data=data, fees=fees)

        return build

    # --- fulfill ------------------------------------------------------------------------

    def fulfill_data(self) -> str:
        """Calldata of ``Portal.fulfill`` for this intent, claimed by our wallet.

        Encoded with ``eth_abi`` from the ABI's own signature (``_fulfill_abi()``): the
        same bytes as ``portal.encode_abi("fulfill", ...)`` at a fraction of the CPU."""
        route = _checksummed_route(route_tuple(self.intent.route))
        function_selector, types = _fulfill_abi()
        args = (
            bytes.fromhex(self.intent.hash[2:]), route, reward_hash(self.intent.reward),
            self.wallet.claimant,
        )  # fmt: skip
        return function_selector + abi_encode(types, args).hex()

    def _build_fulfill(self) -> TxRequest:
        signer = self.wallet.address
        for token, amount in self.route_tokens.items():
            held = self.client.token_balance(token, signer)
            if held < amount:
                raise InsufficientBalanceError(
                    f"solver {signer} holds {held} of token {token} on chain "
                    f"{self.chain.chain_id}; the route needs {amount}"
                )
        data = self.fulfill_data()
        gas = self._estimate(self.chain.portal, data, self.native_value, what="fulfill")
        fees = self._check_native(gas, self.native_value)
        return TxRequest(
            to=checksum(self.chain.portal), gas=gas, data=data,
            value=self.native_value, fees=fees,
        )  # fmt: skip

    def _estimate(self, to: str, data: str, value: int, *, what: str) -> int:
        call = {"from": self.wallet.address, "to": checksum(to), "data": data,
                "value": value}  # fmt: skip
        try:
            estimate = self.client.w3.eth.estimate_gas(call)  # type: ignore[arg-type]
        except ContractLogicError as error:
            signature = revert_selector(error) or ""
            if signature.startswith("IntentAlreadyFulfilled"):
                raise _AlreadyFulfilledError from error
            raise TransactionFailedError(
                f"{what} would revert on chain {self.chain.chain_id}: {describe_revert(error)}"
            ) from error
        except Exception as error:
            classified = classify(error)
            classified.args = (f"estimating {what}: {classified}",)
            raise classified from error
        return math.ceil(int(estimate) * GAS_MARGIN)

    def _check_native(self, gas: int, value: int) -> dict[str, int]:
        """The current fees, after checking the solver can pay gas and value at them."""
        fees = self.client.fees()
        needed = gas * fees["maxFeePerGas"] + value
        held = self.client.balance(self.wallet.address)
        if held < needed:
            raise InsufficientBalanceError(
                f"solver {self.wallet.address} holds {held} wei on chain {self.chain.chain_id}; "
                f"needs {needed} (gas {gas} at {fees['maxFeePerGas']} wei + value {value})"
            )
        return fees


class _AlreadyFulfilledError(Exception):
    """The fulfill call reverts with ``IntentAlreadyFulfilled``."""


def _aggregate(pairs: list[tuple[str, int]]) -> dict[str, int]:
    """Route amounts per (checksummed) token; a token listed twice is added up."""
    totals: defaultdict[str, int] = defaultdict(int)
    for token, amount in pairs:
        totals[checksum(token)] += amount
    return dict(totals)


def _checksummed_route(route: tuple[Any, ...]) -> tuple[Any, ...]:
    salt, deadline, portal, native, tokens, calls = route
    return (
        salt,
        deadline,
        checksum(portal),
        native,
        [(checksum(token), amount) for token, amount in tokens],
        [(checksum(target), data, value) for target, data, value in calls],
    )


@functools.cache
def _fulfill_abi() -> tuple[str, list[str]]:
    """(selector, argument types) of ``Portal.fulfill`` from the committed ABI."""
    (item,) = (
        entry for entry in contract_abi("Portal")
        if entry.get("type") == "function" and entry.get("name") == "fulfill"
    )  # fmt: skip
    types = [collapse_if_tuple(dict(argument)) for argument in item["inputs"]]
    return selector(f"fulfill({','.join(types)})"), types
