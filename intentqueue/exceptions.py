"""The error taxonomy. One base class; each kind says how the queue reacts to it.

| error                         | effect                                              |
|-------------------------------|-----------------------------------------------------|
| ``ValidationFailed``          | intent INVALID, the job completes                   |
| ``TransientError``            | retried with the queue's backoff                    |
| ``InsufficientBalanceError``  | retried with the queue's backoff                    |
| ``NetworkError``              | retried at once (still counts as an attempt)        |
| ``TransactionFailedError``    | intent FAILED, no retry                             |
| ``PermanentError`` and kin    | straight to the dead-letter queue, no retry         |
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class RetryPolicy(StrEnum):
    """What the queue does with a job that raised an error."""

    BACKOFF = "backoff"
    IMMEDIATE = "immediate"
    NEVER = "never"
    #: Not a failure: run the job again after ``delay_seconds`` without using an attempt
    #: (e.g. a sent transaction waiting for confirmations: no worker blocks on it).
    RECHECK = "recheck"


class IntentQueueError(Exception):
    """Base of every error this app raises on purpose."""

    #: How a job that raised this error is retried.
    retry_policy: RetryPolicy = RetryPolicy.NEVER
    #: Short machine-readable kind, stored with the error on the intent's timeline.
    error_type: str = "error"


# --- configuration and input -------------------------------------------------------


class UnknownQueueError(IntentQueueError, KeyError):
    """A queue name that is not configured."""

    error_type = "unknown_queue"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidPayloadError(IntentQueueError, ValueError):
    """An intent payload that cannot be accepted; ``errors`` maps field paths to messages."""

    error_type = "invalid_payload"

    def __init__(self, errors: dict[str, str]) -> None:
        self.errors = dict(errors)
        summary = "; ".join(f"{path}: {message}" for path, message in self.errors.items())
        super().__init__(f"invalid intent payload: {summary}")


class IllegalTransitionError(IntentQueueError):
    """A status change that is not allowed, or that lost a race to another one."""

    error_type = "illegal_transition"

    def __init__(self, intent_hash: str, current: str, target: str, detail: str = "") -> None:
        self.intent_hash, self.current, self.target = intent_hash, current, target
        message = f"intent {intent_hash}: cannot move from {current} to {target}"
        super().__init__(f"{message} ({detail})" if detail else message)


# --- job outcomes ---------------------------------------------------------------------


class ValidationFailed(IntentQueueError):
    """The intent is not acceptable: it becomes INVALID and its job completes."""

    error_type = "validation_failed"

    def __init__(self, reasons: list[str] | str) -> None:
        self.reasons = [reasons] if isinstance(reasons, str) else list(reasons)
        super().__init__("; ".join(self.reasons))


class TransientError(IntentQueueError):
    """A temporary problem (timeout, funding not seen yet): retried with backoff."""

    retry_policy = RetryPolicy.BACKOFF
    error_type = "transient"


class InsufficientBalanceError(TransientError):
    """The solver cannot pay for the route yet: retried with backoff."""

    error_type = "insufficient_balance"


class NetworkError(IntentQueueError):
    """A connection refused or reset: retried at once, still counting as an attempt."""

    retry_policy = RetryPolicy.IMMEDIATE
    error_type = "network"


class RecheckLater(IntentQueueError):
    """Nothing failed, the job is waiting on the outside world: it runs again after
    ``delay_seconds`` without using an attempt, and frees its worker meanwhile."""

    retry_policy = RetryPolicy.RECHECK
    error_type = "recheck"

    def __init__(self, message: str, delay_seconds: int = 1) -> None:
        self.delay_seconds = max(0, int(delay_seconds))
        super().__init__(message)


class PermanentError(IntentQueueError):
    """Retrying cannot help: the job goes straight to the dead-letter queue."""

    error_type = "permanent"


class TransactionFailedError(PermanentError):
    """The transaction is invalid or reverted: the intent is FAILED, no retry."""

    error_type = "transaction_failed"


class UnknownStrategyError(PermanentError, KeyError):
    """A strategy name that is not configured."""

    error_type = "unknown_strategy"

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class BadJobDataError(PermanentError):
    """Job data in Redis that does not have the shape our jobs have."""

    error_type = "bad_job_data"


class StalledJobError(PermanentError):
    """The job's worker died more often than ``worker.max_stalled_count`` allows."""

    error_type = "stalled"


class EnqueueRateLimitedError(IntentQueueError):
    """A client enqueued more than its limit allows; nothing was enqueued."""

    error_type = "rate_limited"

    def __init__(self, source: str, limit: int, period: float, **kwargs: Any) -> None:
        self.source, self.limit, self.period = source, limit, period
        super().__init__(
            f"enqueue limit for source {source!r} reached: at most {limit} per {period:g}s"
        )


def retry_policy_for(error: BaseException) -> RetryPolicy:
    """How a job that raised ``error`` is retried. Unknown exceptions count as transient."""
    if isinstance(error, IntentQueueError):
        return error.retry_policy
    if isinstance(error, ConnectionError | TimeoutError):
        return RetryPolicy.IMMEDIATE if isinstance(error, ConnectionError) else RetryPolicy.BACKOFF
    return RetryPolicy.BACKOFF
