"""What every job processor shares: job data, loading the intent, failure handling.

A processor turns one job into guarded status changes of one intent. Errors follow the
taxonomy of ``intentqueue.exceptions``; ``handle_job_failure`` (RQ's ``on_failure``
callback, run after every failed attempt) records the attempt on the intent's timeline
and decides between retry with backoff, retry at once, and the dead-letter queue.
"""

from __future__ import annotations

import logging
import re
import reprlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from django.utils import timezone
from rq.exceptions import AbandonedJobError
from rq.job import Job, Retry

from intentqueue.conf import intentqueue_settings
from intentqueue.exceptions import (
    BadJobDataError,
    IllegalTransitionError,
    IntentQueueError,
    RecheckLater,
    RetryPolicy,
    StalledJobError,
    retry_policy_for,
)
from intentqueue.logcontext import bind
from intentqueue.metrics import fingerprint
from intentqueue.models import Intent
from intentqueue.queues import Stage, stage

logger = logging.getLogger(__name__)

_HASH = re.compile(r"^0x[0-9a-f]{64}$")
_METADATA_KEYS = {
    "source", "timestamp", "correlationId", "validatedAt", "attempts", "maxAttempts",
}  # fmt: skip
#: Longest error message kept on the intent and in job meta.
MAX_ERROR_LENGTH = 2000
#: Intent ids are 64-bit database keys; a bigger number fails in the database driver.
MAX_INTENT_ID = 2**63 - 1
_REPR = reprlib.Repr(maxlevel=3, maxstring=60, maxother=60, maxlist=4, maxtuple=4, maxdict=4)


def shown(value: Any, *, quote: bool = True) -> str:
    """``value`` (its repr, or the text itself) cut short for an error message: job data
    comes from Redis and can be megabytes long or nested thousands of levels deep."""
    if not quote and isinstance(value, str):
        return value if len(value) <= 120 else f"{value[:120]}...({len(value)} characters)"
    try:
        return _REPR.repr(value)
    except ValueError:  # an integer with more digits than Python converts to text
        return f"<{type(value).__name__} too long to show>"


@dataclass(frozen=True)
class JobData:
    """The data of a FulfillmentJob / ExecutionJob: a reference to the intent, not a copy."""

    intent_id: int
    intent_hash: str
    strategy: str
    wallet_type: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored as the job's only argument."""
        data: dict[str, Any] = {
            "intentId": self.intent_id,
            "intentHash": self.intent_hash,
            "strategy": self.strategy,
            "metadata": self.metadata,
        }
        if self.wallet_type is not None:
            data["walletType"] = self.wallet_type
        return data

    @classmethod
    def parse(cls, raw: Any) -> JobData:
        """Validate job data as it arrives from Redis; ``BadJobDataError`` says what is wrong."""
        if not isinstance(raw, dict):
            raise BadJobDataError(f"job data must be an object, got {type(raw).__name__}")
        unknown = set(raw) - {"intentId", "intentHash", "strategy", "walletType", "metadata"}
        if unknown:
            raise BadJobDataError(f"job data has unknown keys: {shown(sorted(unknown))}")
        intent_id, intent_hash = raw.get("intentId"), raw.get("intentHash")
        if (
            not isinstance(intent_id, int)
            or isinstance(intent_id, bool)
            or not 1 <= intent_id <= MAX_INTENT_ID
        ):
            raise BadJobDataError(f"intentId must be a positive integer, got {shown(intent_id)}")
        if not isinstance(intent_hash, str) or not _HASH.match(intent_hash):
            raise BadJobDataError("intentHash must be 0x + 64 lower-case hex digits")
        strategy, wallet = raw.get("strategy"), raw.get("walletType")
        if not isinstance(strategy, str) or not 0 < len(strategy) <= 64:
            raise BadJobDataError(f"strategy must be a non-empty name, got {shown(strategy)}")
        if wallet is not None and (not isinstance(wallet, str) or len(wallet) > 64):
            raise BadJobDataError(f"walletType must be a short string, got {shown(wallet)}")
        metadata = raw.get("metadata", {})
        if not isinstance(metadata, dict) or set(metadata) - _METADATA_KEYS:
            raise BadJobDataError(f"metadata must be an object with keys {sorted(_METADATA_KEYS)}")
        return cls(intent_id, intent_hash, strategy, wallet, metadata)


@dataclass(frozen=True)
class JobContext:
    """Where a run comes from, written on every timeline row it causes."""

    queue: str = ""
    job_id: str = ""
    attempt: int = 1
    trace_id: str = ""

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the intent's transition methods."""
        return {
            "queue": self.queue, "job_id": self.job_id, "attempt": self.attempt,
            "trace_id": self.trace_id,
        }  # fmt: skip


def attempt_of(job: Job) -> int:
    """The run number of ``job`` (1-based); stalls do not count."""
    max_attempts = int(job.meta.get("max_attempts") or 1)
    return max(1, max_attempts - (job.retries_left or 0))


def context_of(job: Job | None) -> JobContext:
    """The ``JobContext`` of a running RQ job (empty outside a worker)."""
    if job is None:
        return JobContext()
    return JobContext(
        queue=job.origin, job_id=job.id, attempt=attempt_of(job),
        trace_id=str(job.meta.get("trace_id", ""))[:32],
    )  # fmt: skip


class Processor(ABC):
    """Processes one stage's jobs. Subclasses implement ``handle``."""

    #: The settings key of the stage this processor serves.
    stage_key: str

    def __init__(self, job: Job | None = None) -> None:
        self.job = job
        self.context = context_of(job)

    def process(self, raw: Any) -> dict[str, Any]:
        """Parse the job data, load the intent and handle it; returns a small JSON result."""
        data = JobData.parse(raw)
        intent = Intent.objects.for_job(data.intent_id, data.intent_hash)
        if intent is None:
            raise BadJobDataError(f"no intent {data.intent_hash} with id {data.intent_id}")
        bind(intent_hash=intent.hash, correlation_id=intent.correlation_id)
        logger.debug(
            "%s job for intent %s (attempt %s, correlation id %s)",
            self.stage_key, intent.hash, self.context.attempt, intent.correlation_id,
        )  # fmt: skip
        return self.handle(intent, data)

    @abstractmethod
    def handle(self, intent: Intent, data: JobData) -> dict[str, Any]:
        """Do the stage's work on ``intent``; raise an ``IntentQueueError`` to fail."""


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return text[:MAX_ERROR_LENGTH]


def _error_type(error: BaseException) -> str:
    if isinstance(error, IntentQueueError):
        return error.error_type
    return type(error).__name__


def _insert_retry_delay(job: Job, seconds: int = 0) -> None:
    """Make the retry about to happen wait ``seconds`` without shifting later backoff
    delays. RQ picks interval ``len(intervals) - retries_left``; inserting at that index
    keeps every later retry at its own delay."""
    intervals = list(job.retry_intervals or [])
    index = max(len(intervals) + 1 - (job.retries_left or 0), 0)
    intervals.insert(index, seconds)
    job.retry_intervals = intervals


#: A job waiting on the outside world may be re-run this often (its processor bounds the
#: wait: a transaction's ``pending_timeout``, a breaker's cool-down).
RECHECK_LIMIT = 10**9


def recheck_later(job: Job | None, wait: RecheckLater) -> Retry:
    """What a job function returns to run again in ``wait.delay_seconds`` without using
    an attempt: RQ's own "returned a Retry" path, so nothing failed (no traceback, no
    failure handling, no error on the intent; the run counts as a recheck)."""
    if job is not None:
        job.meta["rechecks"] = int(job.meta.get("rechecks", 0)) + 1  # saved with the retry
        job.outcome = "recheck"  # type: ignore[attr-defined]  # read by the worker's metrics
        logger.debug("job %s: %s; checking again in %ss", job.id, wait, wait.delay_seconds)
    return Retry(max=RECHECK_LIMIT, interval=wait.delay_seconds)


def handle_job_failure(job: Job, error: BaseException) -> None:
    """Decide what happens after a failed attempt, and record it. Runs in the worker.

    - a stall (the worker died: RQ's ``AbandonedJobError``) re-runs the job at once
      without using an attempt, until ``worker.max_stalled_count`` is exceeded;
    - a permanent error goes straight to the dead-letter queue;
    - a network error is retried at once, other errors with the stage's backoff;
    - on the last attempt the intent becomes FAILED with the error.
    """
    context = context_of(job)  # before the retry bookkeeping below changes the attempt
    stalled = isinstance(error, AbandonedJobError)
    if stalled:
        stalls = int(job.meta.get("stalled_count", 0)) + 1
        job.meta["stalled_count"] = stalls
        limit = intentqueue_settings.worker.max_stalled_count
        if stalls > limit:
            error = StalledJobError(f"job stalled {stalls} times (limit {limit})")
            job.retries_left = 0
        else:
            job.retries_left = (job.retries_left or 0) + 1
            _insert_retry_delay(job)
    policy = retry_policy_for(error)
    if policy is RetryPolicy.NEVER:
        job.retries_left = 0
    final = not job.retries_left
    if policy is RetryPolicy.IMMEDIATE and not final:
        _insert_retry_delay(job)
    message, error_type = _short(error), _error_type(error)
    if stalled and not isinstance(error, StalledJobError):
        message, error_type = "worker died while running the job; re-queued", "stalled"
    job.meta.setdefault("errors", []).append(
        {"attempt": context.attempt, "type": error_type, "message": message,
         "at": timezone.now().isoformat(), "final": final}
    )  # fmt: skip
    job.meta["errors"] = job.meta["errors"][-20:]
    if final:
        job.meta["failure_reason"] = error_type
    job.save_meta()
    # Read by the worker's metrics once RQ is done with the job (same object, in-process).
    job.outcome = "failed" if final else ("stalled" if stalled else "retried")  # type: ignore[attr-defined]
    job.failure_fingerprint = fingerprint(error_type, message) if final else None  # type: ignore[attr-defined]
    _record_on_intent(job, context, message, error_type, final=final)


def _record_on_intent(
    job: Job, job_context: JobContext, message: str, error_type: str, *, final: bool
) -> None:
    try:
        data = JobData.parse(job.args[0] if job.args else None)
    except BadJobDataError:
        return
    intent = Intent.objects.for_job(data.intent_id, data.intent_hash)
    if intent is None:
        return
    context = job_context.as_kwargs()
    if not final:
        intent.record_attempt_error(message, error_type, **context)
        return
    try:
        intent.mark_failed(message, error_type, **context)
    except IllegalTransitionError:
        # Already terminal (e.g. fulfilled by an earlier run): record, change nothing.
        intent.record_attempt_error(message, error_type, **context)


def stage_of(job: Job) -> Stage:
    """The stage a job was queued in."""
    return stage(job.origin)
