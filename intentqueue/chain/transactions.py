"""Effectively-once transactions from one signer, shared by many worker processes.

Delivery of execution jobs is at-least-once (crashes, stalls, retries, duplicates), so
every transaction follows one recipe:

1. **Reserve and sign under a lock.** In one database transaction holding the signer's
   ``SignerNonce`` row, reuse the live transaction of this (intent, purpose) if there is
   one; otherwise take ``nonce = max(next_nonce, the chain's pending count)``, sign, and
   store nonce, raw bytes and hash. Balances and gas are checked before this, so a nonce
   is reserved only for a transaction that can be paid for.
2. **Broadcast the stored bytes**, after the row is committed. "already known", "nonce
   too low" and underpriced replacements may mean the node has it already (web3 retries
   a broadcast after a timeout, a crashed run may have sent it): they are not errors,
   the transaction is settled by its hash.
3. **Settle by hash.** Look up the receipt of every signature of the nonce. Mined in a
   canonical block: record block and confirmations. Not mined and the account's nonce
   has moved past it: the nonce went to some other transaction, so the row is DROPPED
   and the next ``submit`` signs again with a new nonce. Not mined and the nonce still
   open: broadcast again if the node lost it, replace it with a fee bump of 12.5% (geth
   wants 10%) when it is stuck, and wait.

A reserved nonce is never left as a gap: a transaction the node refuses for good, and
the unmined transaction of an intent that is over (FAILED, INVALID, FULFILLED), are
replaced by a 0-value transfer to the signer itself at the same nonce (``repair()``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final

from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from web3.types import TxReceipt

from intentqueue.chain.client import (
    ChainClient,
    FeeTooLowError,
    NonceConflictError,
    classify,
)
from intentqueue.chain.models import ChainTransaction, SignerNonce
from intentqueue.chain.wallets import Wallet
from intentqueue.exceptions import PermanentError, TransientError
from intentqueue.models import Intent
from intentqueue.status import TERMINAL

logger = logging.getLogger(__name__)

Status = ChainTransaction.Status
Purpose = ChainTransaction.Purpose

#: Rows that may still be (or become) the transaction of their nonce.
LIVE: Final = (Status.SIGNED, Status.SENT, Status.MINED, Status.CONFIRMED, Status.REPLACED)
#: Rows that may be waiting in a node's pool.
IN_FLIGHT: Final = (Status.SIGNED, Status.SENT, Status.REPLACED)
#: A replacement raises both fees by this factor at least (geth requires 10%).
FEE_BUMP: Final = 1.125
#: Replacements per nonce at most.
MAX_REPLACEMENTS: Final = 5
#: A sent transaction not mined after this long is checked for presence in the node.
LOOK_AGAIN_AFTER: Final = timedelta(seconds=3)
#: An unmined transaction of a finished intent is filled after this long untouched.
ABANDONED_AFTER: Final = timedelta(seconds=5)
#: Gas of a plain transfer (the filler).
TRANSFER_GAS: Final = 21_000


class TxState(StrEnum):
    """What ``settle()`` found out about a transaction."""

    PENDING = "pending"
    """Signed or sent, not in a canonical block yet."""
    MINED = "mined"
    """Succeeded, fewer confirmations than required."""
    CONFIRMED = "confirmed"
    """Succeeded with the required confirmations."""
    REVERTED = "reverted"
    """Mined with status 0: the nonce is used, the call failed."""
    DROPPED = "dropped"
    """Its nonce went to another transaction: sign again."""


@dataclass(frozen=True)
class Settlement:
    """The state of the transaction of one (intent, purpose)."""

    state: TxState
    tx: ChainTransaction | None
    block_number: int | None = None
    confirmations: int = 0

    @property
    def succeeded(self) -> bool:
        """Mined with status 1 (confirmed or not)."""
        return self.state in (TxState.MINED, TxState.CONFIRMED)


@dataclass(frozen=True)
class TxRequest:
    """A transaction to send, before its nonce; ``fees`` (``maxFeePerGas`` and
    ``maxPriorityFeePerGas``) as the caller priced it, or ``None`` for the current ones."""

    to: str
    gas: int
    data: str = "0x"
    value: int = 0
    fees: dict[str, int] | None = None


#: When each (chain, signer) was last repaired in this process (``time.monotonic()``).
_last_repair: dict[tuple[int, str], float] = {}


class TransactionSender:
    """Sends and settles transactions of ``wallet`` on ``client``'s chain."""

    def __init__(self, client: ChainClient, wallet: Wallet) -> None:
        self.client = client
        self.wallet = wallet
        self.chain_id = client.chain_id
        self.signer = wallet.address
        self.confirmations = client.config.confirmations

    def __repr__(self) -> str:
        return f"<TransactionSender {self.signer} on {self.chain_id}>"

    # --- public ---------------------------------------------------------------------

    def settle(
        self,
        intent: Intent,
        purpose: str,
        subject: str = "",
        *,
        since: datetime | None = None,
        rows: list[ChainTransaction] | None = None,
    ) -> Settlement | None:
        """The state of the transaction of (intent, purpose, subject); ``None`` if there
        is none. May broadcast again, or replace a stuck transaction.

        A transaction that reverted stays the answer (it is not sent again) unless it was
        signed before ``since``: an execution started afresh (an operator's retry) may
        try again. ``rows``: the intent's transactions as ``rows_of()`` loaded them in
        this run (saves the query; the state of the chosen one is settled afresh).
        """
        if rows is None:
            rows = self.rows_of(intent, purpose, subject)
        row, reverted = self._pick(rows, purpose, subject, since)
        if reverted is not None and (row is None or reverted.nonce > row.nonce):
            return Settlement(
                TxState.REVERTED, reverted, reverted.block_number, reverted.confirmations
            )
        if row is None:
            return None
        return self._settle_nonce(row)

    def rows_of(
        self, intent: Intent, purpose: str | None = None, subject: str | None = None
    ) -> list[ChainTransaction]:
        """This signer's transactions of ``intent`` on this chain that ``settle()`` may
        pick (live ones, and reverted ones), newest nonce first; of one purpose and
        subject if given. One query."""
        query = ChainTransaction.objects.filter(
            intent=intent, chain_id=self.chain_id, signer=self.signer
        ).filter(Q(status__in=LIVE) | Q(status=Status.FAILED, block_number__isnull=False))
        if purpose is not None:
            query = query.filter(purpose=purpose)
        if subject is not None:
            query = query.filter(subject=subject)
        return list(query.order_by("-nonce", "-id"))

    @staticmethod
    def _pick(
        rows: list[ChainTransaction], purpose: str, subject: str, since: datetime | None
    ) -> tuple[ChainTransaction | None, ChainTransaction | None]:
        """(the live row, the reverted row) of (purpose, subject) among ``rows`` (sorted
        by nonce then id, newest first), the newest of each."""
        live = reverted = None
        for row in rows:
            if row.purpose != purpose or row.subject != subject:
                continue
            if live is None and row.status in LIVE:
                live = row
            elif (
                reverted is None
                and row.status == Status.FAILED
                and row.block_number is not None
                and (since is None or row.created_at >= since)
            ):
                reverted = row
        return live, reverted

    def submit(
        self,
        intent: Intent,
        purpose: str,
        build: Callable[[], TxRequest],
        subject: str = "",
        *,
        since: datetime | None = None,
        rows: list[ChainTransaction] | None = None,
    ) -> Settlement:
        """Make sure the transaction of (intent, purpose, subject) exists exactly once.

        Settles the live transaction if there is one; otherwise (or when its nonce was
        taken by another transaction) calls ``build()``, which checks balances and
        estimates gas and may raise, then reserves a nonce, signs, stores and broadcasts.
        ``rows`` as for ``settle()``. (Whatever they say, the reservation looks for a
        live transaction again under the signer's lock.)
        """
        settled = self.settle(intent, purpose, subject, since=since, rows=rows)
        if settled is not None and settled.state != TxState.DROPPED:
            return settled
        self._repair_if_due()
        request = build()
        fees = request.fees or self.client.fees()
        row, created = self._reserve(intent, purpose, subject, request, fees)
        if created:
            self._broadcast(row)
        return self._settle_nonce(row)

    def _repair_if_due(self) -> None:
        """``repair()``, at most once per ``ABANDONED_AFTER`` per signer and process: a
        nonce counts as abandoned only after that long anyway, and the query (a join over
        the signer's transactions) was a tenth of a submit's database time."""
        key = (self.chain_id, self.signer)
        now = time.monotonic()
        if now - _last_repair.get(key, -math.inf) < ABANDONED_AFTER.total_seconds():
            return
        _last_repair[key] = now
        self.repair()

    def repair(self) -> int:
        """Fill the nonces of transactions nobody will settle any more.

        An unmined transaction whose intent is over (or that has no intent) and that no
        one touched for a while is replaced with a 0-value transfer to the signer at the
        same nonce; fillers that never reached a node are broadcast again. Returns how
        many nonces it filled.
        """
        cutoff = timezone.now() - ABANDONED_AFTER
        mine = ChainTransaction.objects.filter(chain_id=self.chain_id, signer=self.signer)
        stale = list(
            mine.filter(status__in=(Status.SIGNED, Status.SENT), updated_at__lt=cutoff)
            .filter(
                Q(purpose=Purpose.FILL)
                | Q(intent__isnull=True)
                | Q(intent__status__in=list(TERMINAL))
            )
            .order_by("nonce", "id")[:20]
        )
        if not stale:
            return 0
        filled = 0
        for row in stale:
            try:
                if row.purpose == Purpose.FILL:
                    self._settle_nonce(row)  # records it once mined, sends it if unsent
                    continue
                settled = self._settle_nonce(row, rebroadcast=False)
                if settled.state == TxState.PENDING and self._fill(
                    row, "abandoned: its intent is over"
                ):
                    filled += 1
            except TransientError as error:  # not this job's problem; the next pass tries again
                logger.warning("chain %s: repairing nonce %s: %s", self.chain_id, row.nonce, error)
        return filled

    # --- reserve and sign ----------------------------------------------------------

    def _live(self, intent: Intent, purpose: str, subject: str) -> Any:
        return ChainTransaction.objects.filter(
            intent=intent, purpose=purpose, subject=subject, chain_id=self.chain_id,
            signer=self.signer, status__in=LIVE,
        ).order_by("-nonce", "-id")  # fmt: skip

    def _counter(self) -> SignerNonce:
        """The signer's nonce row, created on first use, locked (call inside atomic)."""
        locked = SignerNonce.objects.select_for_update()
        counter = locked.filter(chain_id=self.chain_id, address=self.signer).first()
        if counter is not None:
            return counter
        try:
            with transaction.atomic():
                SignerNonce.objects.create(chain_id=self.chain_id, address=self.signer)
        except IntegrityError:  # another process created it first
            pass
        return locked.get(chain_id=self.chain_id, address=self.signer)

    def _reserve(
        self,
        intent: Intent,
        purpose: str,
        subject: str,
        request: TxRequest,
        fees: dict[str, int],
    ) -> tuple[ChainTransaction, bool]:
        # The chain's count is read before the lock, so that other signings do not wait
        # for this round trip. A count read early can only be lower than one read under
        # the lock, and every nonce we reserved since is below ``next_nonce``, so
        # ``max(next_nonce, pending)`` is the same. Only the reset case below trusts
        # the count over ``next_nonce``: it reads the count again under the lock.
        pending = self.client.nonce(self.signer, "pending")
        with transaction.atomic():
            counter = self._counter()
            existing = self._live(intent, purpose, subject).first()
            if existing is not None:  # a concurrent run of the same job got here first
                return existing, False
            nonce = max(counter.next_nonce, pending)
            if counter.next_nonce > pending and not self._in_flight_from(pending):
                pending = self.client.nonce(self.signer, "pending")
                nonce = max(counter.next_nonce, pending)
                if counter.next_nonce > pending and not self._in_flight_from(pending):
                    # Ahead of the chain with nothing of ours in flight: the chain was
                    # reset (a dev chain restarted); the chain's count is the truth.
                    nonce = pending
            row = self._sign_and_store(
                intent_id=intent.pk, purpose=purpose, subject=subject, nonce=nonce, attempt=0,
                request=request, fees=fees,
            )  # fmt: skip
            counter.next_nonce = nonce + 1
            counter.save(update_fields=["next_nonce", "updated_at"])
        logger.info(
            "chain %s: signed %s of intent %s, nonce %s, tx %s",
            self.chain_id, purpose, intent.hash, nonce, row.tx_hash,
        )  # fmt: skip
        return row, True

    def _in_flight_from(self, nonce: int) -> bool:
        return ChainTransaction.objects.filter(
            chain_id=self.chain_id, signer=self.signer, nonce__gte=nonce, status__in=IN_FLIGHT
        ).exists()

    def _sign_and_store(
        self,
        *,
        intent_id: int | None,
        purpose: str,
        subject: str,
        nonce: int,
        attempt: int,
        request: TxRequest,
        fees: dict[str, int],
    ) -> ChainTransaction:
        tx = {
            "type": 2,
            "chainId": self.chain_id,
            "nonce": nonce,
            "to": request.to,
            "value": request.value,
            "data": request.data,
            "gas": request.gas,
            "maxFeePerGas": fees["maxFeePerGas"],
            "maxPriorityFeePerGas": fees["maxPriorityFeePerGas"],
        }
        signed = self.wallet.sign(tx)
        return ChainTransaction.objects.create(
            intent_id=intent_id, purpose=purpose, subject=subject, chain_id=self.chain_id,
            signer=self.signer, nonce=nonce, attempt=attempt, tx_hash=signed.tx_hash,
            raw="0x" + signed.raw.hex(), to_address=request.to, value=request.value,
            data=request.data, gas_limit=request.gas, max_fee_per_gas=fees["maxFeePerGas"],
            max_priority_fee_per_gas=fees["maxPriorityFeePerGas"],
        )  # fmt: skip

    # --- broadcast -----------------------------------------------------------------------

    def _broadcast(self, row: ChainTransaction, *, quiet: bool = False) -> None:
        """Send the stored bytes of ``row``. Nonce conflicts are left to settlement."""
        try:
            self.client.send_raw(row.raw_bytes)
        except Exception as exc:
            error = classify(exc)
            text = str(error).lower()
            if isinstance(error, NonceConflictError):
                if "known" in text or "already imported" in text:
                    self._mark_sent(row)
                logger.info(
                    "chain %s: tx %s: %s (settled by hash)", self.chain_id, row.tx_hash, error
                )
                return
            if quiet:
                logger.warning(
                    "chain %s: broadcast of %s failed: %s", self.chain_id, row.tx_hash, error
                )
                return
            if isinstance(error, FeeTooLowError):
                self._replace(row, f"refused: {error}")
                return
            if isinstance(error, PermanentError):  # includes TransactionFailedError
                self._fill(row, f"refused by the node: {error}", failed=True)
                raise error from exc
            # Network, insufficient funds, other transient errors: the row stays SIGNED
            # and the retry broadcasts the very same bytes.
            raise error from exc
        self._mark_sent(row)

    def _mark_sent(self, row: ChainTransaction) -> None:
        now = timezone.now()
        ChainTransaction.objects.filter(pk=row.pk, status=Status.SIGNED).update(
            status=Status.SENT, sent_at=now, updated_at=now
        )
        if row.status == Status.SIGNED:
            row.status, row.sent_at = Status.SENT, now

    # --- settle --------------------------------------------------------------------------

    def _siblings(self, nonce: int) -> list[ChainTransaction]:
        return list(
            ChainTransaction.objects.filter(
                chain_id=self.chain_id, signer=self.signer, nonce=nonce
            ).order_by("id")
        )

    @staticmethod
    def _same_job(a: ChainTransaction, b: ChainTransaction) -> bool:
        return (a.intent_id, a.purpose, a.subject) == (b.intent_id, b.purpose, b.subject)

    def _settle_nonce(self, row: ChainTransaction, *, rebroadcast: bool = True) -> Settlement:
        siblings = self._siblings(row.nonce)
        for sibling in siblings:
            reverted = sibling.status == Status.FAILED and sibling.block_number is not None
            if sibling.status == Status.CONFIRMED or reverted:
                return self._outcome(row, sibling, siblings)
        candidates = [s for s in reversed(siblings) if s.status in (*IN_FLIGHT, Status.MINED)]
        if not candidates:
            return Settlement(TxState.DROPPED, row)
        for sibling in candidates:  # newest signature first
            found = self.client.mined(sibling.tx_hash)
            if found is not None:
                return self._record(sibling, *found, siblings, row)
        for sibling in candidates:
            if sibling.status == Status.MINED:  # its block left the canonical chain
                logger.warning("chain %s: tx %s is no longer in a canonical block",
                               self.chain_id, sibling.tx_hash)  # fmt: skip
                ChainTransaction.objects.filter(pk=sibling.pk).update(
                    status=Status.SENT, block_number=None, block_hash="", confirmations=0,
                    updated_at=timezone.now(),
                )  # fmt: skip
        latest = self.client.nonce(self.signer, "latest")
        if latest > row.nonce:
            # The nonce is used. By one of these, mined since the first look?
            for sibling in candidates:
                found = self.client.mined(sibling.tx_hash)
                if found is not None:
                    return self._record(sibling, *found, siblings, row)
            ChainTransaction.objects.filter(pk__in=[s.pk for s in candidates]).update(
                status=Status.DROPPED,
                error=f"nonce {row.nonce} was used by another transaction",
                updated_at=timezone.now(),
            )
            logger.warning("chain %s: nonce %s of %s went to another transaction; signing again",
                           self.chain_id, row.nonce, self.signer)  # fmt: skip
            return Settlement(TxState.DROPPED, row)
        newest = candidates[0]
        if rebroadcast:
            self._keep_going(newest, candidates, latest)
        return Settlement(TxState.PENDING, newest)

    def _keep_going(
        self, newest: ChainTransaction, candidates: list[ChainTransaction], latest: int
    ) -> None:
        """An unmined transaction: send it again if the node lost it, replace it if stuck."""
        if newest.status == Status.SIGNED:
            self._broadcast(newest)
            return
        now = timezone.now()
        first = min(s.created_at for s in candidates)
        if now - first > timedelta(seconds=self.client.config.pending_timeout):
            raise TransientError(
                f"transaction {newest.tx_hash} (nonce {newest.nonce}) not mined after "
                f"{self.client.config.pending_timeout}s"
            )
        age = now - (newest.sent_at or newest.created_at)
        if age < LOOK_AGAIN_AFTER:
            return
        if not self.client.is_known(newest.tx_hash):
            logger.info(
                "chain %s: node lost tx %s; sending it again", self.chain_id, newest.tx_hash
            )
            self._broadcast(newest, quiet=True)
        elif age > timedelta(seconds=self.client.config.replace_after) and latest == newest.nonce:
            self._replace(newest, f"not mined after {int(age.total_seconds())}s")

    def _record(
        self,
        mined: ChainTransaction,
        receipt: TxReceipt,
        head: int,
        siblings: list[ChainTransaction],
        asked: ChainTransaction,
    ) -> Settlement:
        """Store what the receipt says; the other signatures of the nonce are replaced."""
        block = int(receipt["blockNumber"])
        confirmations = max(0, head - block + 1)
        if int(receipt["status"]) == 0:
            status, error = Status.FAILED, f"reverted in block {block}"
        else:
            status = Status.CONFIRMED if confirmations >= self.confirmations else Status.MINED
            error = ""
        now = timezone.now()
        ChainTransaction.objects.filter(pk=mined.pk).update(
            status=status, block_number=block, block_hash=receipt["blockHash"].to_0x_hex(),
            confirmations=confirmations, gas_used=int(receipt["gasUsed"]), error=error,
            updated_at=now,
        )  # fmt: skip
        mined.status, mined.block_number, mined.confirmations = status, block, confirmations
        others = [s.pk for s in siblings if s.pk != mined.pk and s.status in IN_FLIGHT]
        ChainTransaction.objects.filter(pk__in=others).update(
            status=Status.REPLACED, updated_at=now
        )
        return self._outcome(asked, mined, siblings)

    def _outcome(
        self, asked: ChainTransaction, mined: ChainTransaction, siblings: list[ChainTransaction]
    ) -> Settlement:
        if not self._same_job(asked, mined):
            # The nonce went to a filler: the asked-for transaction never happened.
            ours = [s.pk for s in siblings if self._same_job(asked, s) and s.status in LIVE]
            ChainTransaction.objects.filter(pk__in=ours).update(
                status=Status.DROPPED, error=f"nonce replaced by {mined.tx_hash}",
                updated_at=timezone.now(),
            )  # fmt: skip
            return Settlement(TxState.DROPPED, asked)
        if mined.status == Status.FAILED:
            state = TxState.REVERTED
        elif mined.status == Status.CONFIRMED:
            state = TxState.CONFIRMED
        else:
            state = TxState.MINED
        return Settlement(state, mined, mined.block_number, mined.confirmations)

    # --- replacement and filling ------------------------------------------------------

    def _bumped_fees(self, row: ChainTransaction) -> dict[str, int]:
        now = self.client.fees()
        tip = max(
            math.ceil(int(row.max_priority_fee_per_gas) * FEE_BUMP), now["maxPriorityFeePerGas"]
        )
        max_fee = max(math.ceil(int(row.max_fee_per_gas) * FEE_BUMP), now["maxFeePerGas"], tip)
        return {"maxFeePerGas": max_fee, "maxPriorityFeePerGas": tip}

    def _replace(self, row: ChainTransaction, reason: str) -> ChainTransaction | None:
        """Sign the same transaction with higher fees at the same nonce (a new row)."""
        if row.attempt >= MAX_REPLACEMENTS:
            logger.warning(
                "chain %s: tx %s: %s; no replacements left", self.chain_id, row.tx_hash, reason
            )
            return None
        fees = self._bumped_fees(row)
        request = TxRequest(
            to=row.to_address, gas=row.gas_limit, data=row.data, value=int(row.value)
        )
        with transaction.atomic():
            self._counter()  # serialises with every other signing of this signer
            newer = ChainTransaction.objects.filter(
                chain_id=self.chain_id, signer=self.signer, nonce=row.nonce, id__gt=row.pk
            ).exists()
            if (
                newer
                or not ChainTransaction.objects.filter(pk=row.pk, status__in=IN_FLIGHT).exists()
            ):
                return None  # someone replaced or settled it meanwhile
            replacement = self._sign_and_store(
                intent_id=row.intent_id, purpose=row.purpose, subject=row.subject, nonce=row.nonce,
                attempt=row.attempt + 1, request=request, fees=fees,
            )  # fmt: skip
            ChainTransaction.objects.filter(pk=row.pk, status__in=IN_FLIGHT).update(
                status=Status.REPLACED, error=f"replaced by {replacement.tx_hash}: {reason}",
                updated_at=timezone.now(),
            )  # fmt: skip
        logger.info("chain %s: replaced tx %s (nonce %s) by %s: %s",
                    self.chain_id, row.tx_hash, row.nonce, replacement.tx_hash, reason)  # fmt: skip
        self._broadcast(replacement, quiet=True)
        return replacement

    def _fill(self, row: ChainTransaction, reason: str, *, failed: bool = False) -> bool:
        """Give ``row``'s nonce to a 0-value transfer to the signer (a new row)."""
        request = TxRequest(to=self.signer, gas=TRANSFER_GAS)
        fees = self._bumped_fees(row)
        with transaction.atomic():
            self._counter()
            if not ChainTransaction.objects.filter(pk=row.pk, status__in=IN_FLIGHT).exists():
                return False
            if ChainTransaction.objects.filter(
                chain_id=self.chain_id, signer=self.signer, nonce=row.nonce, purpose=Purpose.FILL
            ).exists():
                return False
            filler = self._sign_and_store(
                intent_id=row.intent_id, purpose=Purpose.FILL, subject="", nonce=row.nonce,
                attempt=row.attempt + 1, request=request, fees=fees,
            )  # fmt: skip
            ChainTransaction.objects.filter(pk=row.pk, status__in=IN_FLIGHT).update(
                status=Status.FAILED if failed else Status.REPLACED,
                error=f"{reason}; nonce {row.nonce} filled by {filler.tx_hash}",
                updated_at=timezone.now(),
            )  # fmt: skip
        logger.warning("chain %s: nonce %s of %s filled by %s (%s)",
                       self.chain_id, row.nonce, self.signer, filler.tx_hash, reason)  # fmt: skip
        self._broadcast(filler, quiet=True)
        return True
