"""Operator operations on intents: retry a failed one, re-enqueue one that lost its job.

Like ``QueueService``'s queue operations, every call writes one ``OperatorAction`` row
(who, what, how many, why, and whether it worked), whether it came from the admin, a
command or code.

- **Retry** (FAILED or INVALID intents): back to the start of the stage that gave up
  (PENDING for validation, VALIDATED for execution), attempts reset, a fresh job queued.
  A failed job of the intent still in the dead-letter queue is replaced by the new one.
- **Re-enqueue** (PENDING, VALIDATING, VALIDATED, EXECUTING): queue the job the status
  calls for, unless a live one exists already; the status does not change. This is what
  the reconciler does on its own for intents it finds without a job.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from django.db.models import QuerySet

from intentqueue.exceptions import IllegalTransitionError, IntentQueueError
from intentqueue.models import Intent, OperatorAction
from intentqueue.queues import stage
from intentqueue.services import QueueService
from intentqueue.status import QUEUED_STAGE, IntentStatus

#: Statuses an operator can retry from, and those a job can be re-enqueued for.
RETRYABLE = frozenset({IntentStatus.FAILED, IntentStatus.INVALID})
REENQUEUEABLE = frozenset(QUEUED_STAGE)
#: Most intents one call may touch: operators act on a page, not on a million rows.
MAX_INTENTS = 1000

_STAGE_START = {"fulfillment": IntentStatus.PENDING, "execution": IntentStatus.VALIDATED}


@dataclass
class IntentsOutcome:
    """What a bulk operation did: intents changed, already queued, and skipped (why)."""

    done: list[Intent] = field(default_factory=list)
    unchanged: list[Intent] = field(default_factory=list)
    skipped: list[tuple[Intent, str]] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)


def retry_stage(intent: Intent) -> str:
    """The stage key (``fulfillment``/``execution``) a retry of ``intent`` restarts."""
    if intent.status == IntentStatus.INVALID:
        return "fulfillment"
    last_failure = intent.timeline.filter(to_status=IntentStatus.FAILED).order_by("-at", "-id")
    row = last_failure.values("from_status", "queue").first()
    if row is not None:
        if row["queue"]:
            with contextlib.suppress(IntentQueueError):
                return stage(row["queue"]).key
        if row["from_status"] in (IntentStatus.VALIDATED, IntentStatus.EXECUTING):
            return "execution"
        if row["from_status"] in (IntentStatus.PENDING, IntentStatus.VALIDATING):
            return "fulfillment"
    validated = intent.timeline.filter(to_status=IntentStatus.VALIDATED).exists()
    return "execution" if validated else "fulfillment"


def can_retry(intent: Intent) -> bool:
    return intent.status in RETRYABLE


def can_reenqueue(intent: Intent) -> bool:
    return intent.status in REENQUEUEABLE


class IntentOperations:
    """Retry and re-enqueue intents, audited (see the module docstring)."""

    def __init__(self, service: QueueService | None = None) -> None:
        self.service = service or QueueService()

    def retry_intents(
        self, intents: Iterable[Intent], *, actor: str = "system", reason: str = ""
    ) -> IntentsOutcome:
        """Retry every FAILED/INVALID intent of ``intents``; others are skipped."""
        selected = self._limited(intents)
        outcome = IntentsOutcome()
        with self._audited(outcome, actor, reason, "retry"):
            for intent in selected:
                if not can_retry(intent):
                    outcome.skipped.append((intent, f"is {intent.get_status_display()}"))
                    continue
                key = retry_stage(intent)
                queue = stage(key).name
                try:
                    intent.reset_for_retry(_STAGE_START[key], queue=queue, actor=actor)
                except IllegalTransitionError:
                    intent.refresh_from_db(fields=["status"])
                    outcome.skipped.append((intent, f"is {intent.get_status_display()}"))
                    continue
                outcome.job_ids.append(self._enqueue(intent, key))
                outcome.done.append(intent)
        return outcome

    def reenqueue_intents(
        self, intents: Iterable[Intent], *, actor: str = "system", reason: str = ""
    ) -> IntentsOutcome:
        """Queue the job each non-final intent's status calls for, if it has none."""
        selected = self._limited(intents)
        outcome = IntentsOutcome()
        with self._audited(outcome, actor, reason, "re-enqueue"):
            for intent in selected:
                if not can_reenqueue(intent):
                    outcome.skipped.append((intent, f"is {intent.get_status_display()}"))
                    continue
                key = QUEUED_STAGE[IntentStatus(intent.status)]
                if key == "fulfillment":
                    result = self.service.add_intent_to_fulfillment_queue(
                        intent, enforce_limit=False
                    )
                else:
                    result = self.service.add_intent_to_execution_queue(intent)
                (outcome.done if result.created else outcome.unchanged).append(intent)
                outcome.job_ids.append(result.job_id)
        return outcome

    def _enqueue(self, intent: Intent, key: str) -> str:
        if key == "fulfillment":
            return self.service.add_intent_to_fulfillment_queue(intent, enforce_limit=False).job_id
        return self.service.add_intent_to_execution_queue(intent).job_id

    @staticmethod
    def _limited(intents: Iterable[Intent]) -> list[Intent]:
        if isinstance(intents, QuerySet):
            intents = intents[: MAX_INTENTS + 1]  # never load a whole table
        selected = list(intents)
        if len(selected) > MAX_INTENTS:
            raise IntentQueueError(f"at most {MAX_INTENTS} intents at a time; narrow the selection")
        return selected

    @contextlib.contextmanager
    def _audited(
        self, outcome: IntentsOutcome, actor: str, reason: str, what: str
    ) -> Iterator[None]:
        """One ``OperatorAction`` row for the whole call, failed or not."""
        try:
            yield
        except Exception as error:
            self._record(outcome, actor, reason, what, f"{type(error).__name__}: {error}")
            raise
        self._record(outcome, actor, reason, what, "")

    @staticmethod
    def _record(outcome: IntentsOutcome, actor: str, reason: str, what: str, error: str) -> None:
        queues = {job_id.split("-", 1)[0] for job_id in outcome.job_ids}
        queue = stage(queues.pop()).name if len(queues) == 1 else ""
        parts = [f"{what}: {len(outcome.done)} done"]
        if outcome.unchanged:
            parts.append(f"{len(outcome.unchanged)} already queued")
        if outcome.skipped:
            skipped = ", ".join(f"{i.hash[:10]}… {why}" for i, why in outcome.skipped[:20])
            parts.append(f"{len(outcome.skipped)} skipped ({skipped})")
        if error:
            parts.append(error)
        OperatorAction.objects.create(
            actor=actor,
            action=OperatorAction.Action.RETRY_INTENT,
            queue=queue,
            job_ids=outcome.job_ids[:100],
            count=len(outcome.done),
            reason=reason,
            outcome=OperatorAction.Outcome.ERROR if error else OperatorAction.Outcome.OK,
            detail="; ".join(parts)[:2000],
        )
