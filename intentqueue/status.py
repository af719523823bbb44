"""Intent statuses and the transitions allowed between them."""

from __future__ import annotations

from django.db import models


class IntentStatus(models.TextChoices):
    """Where an intent stands. The database is the truth; jobs only move it along."""

    PENDING = "PENDING", "Pending"
    """Saved, waiting for (or queued in) the fulfillment queue."""
    VALIDATING = "VALIDATING", "Validating"
    """A fulfillment job is running the strategy's validations."""
    VALIDATED = "VALIDATED", "Validated"
    """Valid: queued for (or waiting on) the execution queue."""
    EXECUTING = "EXECUTING", "Executing"
    """An execution job is sending or confirming the transaction."""
    FULFILLED = "FULFILLED", "Fulfilled"
    """Fulfilled on the destination chain (final)."""
    INVALID = "INVALID", "Invalid"
    """Rejected by validation; it will not be executed unless revalidated."""
    FAILED = "FAILED", "Failed"
    """A job gave up (permanent error or retries exhausted); see the last error."""


S = IntentStatus

#: For each target status, the statuses an intent may move to it from. A status listed
#: as its own source is a re-claim by a retried or recovered job.
ALLOWED_SOURCES: dict[IntentStatus, frozenset[IntentStatus]] = {
    S.PENDING: frozenset({S.FAILED, S.INVALID}),
    S.VALIDATING: frozenset({S.PENDING, S.VALIDATING}),
    S.VALIDATED: frozenset({S.VALIDATING, S.FAILED}),
    S.EXECUTING: frozenset({S.VALIDATED, S.EXECUTING}),
    S.FULFILLED: frozenset({S.EXECUTING}),
    S.INVALID: frozenset({S.VALIDATING}),
    S.FAILED: frozenset({S.VALIDATING, S.EXECUTING, S.VALIDATED, S.PENDING}),
}

#: Statuses no job will change any more.
TERMINAL = frozenset({S.FULFILLED, S.INVALID, S.FAILED})

#: Statuses in which an intent must have a live job, and the stage that job belongs to.
QUEUED_STAGE: dict[IntentStatus, str] = {
    S.PENDING: "fulfillment",
    S.VALIDATING: "fulfillment",
    S.VALIDATED: "execution",
    S.EXECUTING: "execution",
}


def can_transition(source: IntentStatus | str, target: IntentStatus | str) -> bool:
    """Whether an intent in ``source`` may move to ``target``."""
    return IntentStatus(source) in ALLOWED_SOURCES[IntentStatus(target)]
