"""What the execution stage persists so that every transaction happens at most once.

- ``SignerNonce``: the next nonce of one signer on one chain. Its row is the lock that
  serialises nonce allocation across worker processes (``select_for_update`` on
  PostgreSQL; on SQLite every write transaction takes the database lock at BEGIN).
- ``ChainTransaction``: one signed transaction, stored with its nonce, raw bytes and hash
  *before* it is broadcast. A replacement (fee bump, or a 0-value filler for an
  abandoned nonce) is a new row with the same nonce: every hash ever signed is kept.

Imported by ``intentqueue.models`` so Django registers them with the ``intentqueue`` app.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from intentqueue.fields import Uint256Field


class SignerNonce(models.Model):
    """The next nonce the solver will use for ``address`` on ``chain_id``."""

    chain_id = models.PositiveBigIntegerField()
    address = models.CharField(max_length=42, help_text="Checksummed signer address.")
    next_nonce = models.PositiveBigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        app_label = "intentqueue"
        constraints = [
            models.UniqueConstraint(fields=["chain_id", "address"], name="signer_nonce_unique")
        ]

    def __str__(self) -> str:
        return f"{self.address} on {self.chain_id}: next nonce {self.next_nonce}"


class ChainTransaction(models.Model):
    """One signed transaction of the solver, from signing to its final state."""

    class Status(models.TextChoices):
        """Where a signed transaction stands."""

        SIGNED = "signed", "Signed"
        """Stored; not known to have reached a node yet."""
        SENT = "sent", "Sent"
        """A node accepted it (or already knew it)."""
        MINED = "mined", "Mined"
        """In a canonical block, fewer confirmations than the chain requires."""
        CONFIRMED = "confirmed", "Confirmed"
        """In a canonical block with the required confirmations; succeeded."""
        REPLACED = "replaced", "Replaced"
        """Superseded by another signature for the same nonce (a fee bump or a filler)."""
        FAILED = "failed", "Failed"
        """Reverted on chain (``block_number`` set), or refused by the node for good (the
        nonce then went to a filler)."""
        DROPPED = "dropped", "Dropped"
        """Its nonce was used by a transaction that is not one of its signatures."""

    class Purpose(models.TextChoices):
        """Why it was sent."""

        APPROVE = "approve", "Approve a route token"
        FULFILL = "fulfill", "Fulfill the intent"
        FILL = "fill", "Fill an abandoned nonce"

    intent = models.ForeignKey(
        "intentqueue.Intent",
        on_delete=models.PROTECT,
        related_name="chain_transactions",
        null=True,
        blank=True,
    )
    purpose = models.CharField(max_length=16, choices=Purpose.choices)
    #: What the transaction is for within its purpose (the token of an approval).
    subject = models.CharField(max_length=66, blank=True)
    chain_id = models.PositiveBigIntegerField()
    signer = models.CharField(max_length=42)
    nonce = models.PositiveBigIntegerField()
    #: Replacement number for this nonce: 0 for the first signature.
    attempt = models.PositiveSmallIntegerField(default=0)
    tx_hash = models.CharField(max_length=66, unique=True)
    raw = models.TextField(help_text="The signed bytes, 0x hex: broadcast again as they are.")
    to_address = models.CharField(max_length=42)
    value = Uint256Field(default=0)
    data = models.TextField(blank=True, help_text="Calldata, 0x hex.")
    gas_limit = models.PositiveBigIntegerField()
    max_fee_per_gas = Uint256Field()
    max_priority_fee_per_gas = Uint256Field()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.SIGNED)
    block_number = models.PositiveBigIntegerField(null=True, blank=True)
    block_hash = models.CharField(max_length=66, blank=True)
    confirmations = models.PositiveIntegerField(default=0)
    gas_used = models.PositiveBigIntegerField(null=True, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        app_label = "intentqueue"
        ordering = ["chain_id", "signer", "nonce", "attempt", "id"]
        indexes = [
            models.Index(fields=["chain_id", "signer", "nonce"], name="chaintx_signer_nonce"),
            models.Index(fields=["intent", "purpose", "subject"], name="chaintx_intent_purpose"),
            models.Index(fields=["chain_id", "signer", "status"], name="chaintx_signer_status"),
        ]

    def __str__(self) -> str:
        return f"{self.purpose} {self.tx_hash[:12]}… nonce {self.nonce} ({self.status})"

    def __repr__(self) -> str:
        return f"<ChainTransaction {self.purpose} {self.tx_hash} nonce={self.nonce} {self.status}>"

    @property
    def raw_bytes(self) -> bytes:
        """The signed bytes."""
        return bytes.fromhex(self.raw.removeprefix("0x"))
