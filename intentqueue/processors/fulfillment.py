"""The fulfillment stage: validate an intent with its strategy, queue it for execution."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from intentqueue.exceptions import PermanentError, ValidationFailed
from intentqueue.models import Intent
from intentqueue.processors.base import JobData, Processor
from intentqueue.status import IntentStatus
from intentqueue.strategies import get_strategy

logger = logging.getLogger(__name__)

#: Statuses in which a fulfillment job has nothing left to do.
_PAST_VALIDATION = {
    IntentStatus.VALIDATED, IntentStatus.EXECUTING, IntentStatus.FULFILLED,
    IntentStatus.INVALID, IntentStatus.FAILED,
}  # fmt: skip


class FulfillmentProcessor(Processor):
    """Runs the strategy's validation pipeline and moves the intent on.

    PENDING -> VALIDATING -> VALIDATED (then an execution job is queued) or INVALID.
    A duplicate or late job for an intent already past validation does nothing.
    """

    stage_key = "fulfillment"

    def handle(self, intent: Intent, data: JobData) -> dict[str, Any]:
        if intent.status in _PAST_VALIDATION:
            logger.info("intent %s is %s already: nothing to do", intent.hash, intent.status)
            return {"status": intent.status, "skipped": True}
        try:
            strategy = get_strategy(data.strategy)
        except ImproperlyConfigured as error:
            raise PermanentError(f"strategy {data.strategy!r} is misconfigured: {error}") from error
        context = self.context.as_kwargs()
        intent.start_validation(attempts=self.context.attempt, **context)
        try:
            strategy.validate(intent)
        except ValidationFailed as failure:
            intent.mark_invalid("; ".join(failure.reasons), **context)
            return {"status": IntentStatus.INVALID, "reasons": failure.reasons}
        intent.mark_validated(**context)
        from intentqueue.services import QueueService

        QueueService().add_intent_to_execution_queue(
            intent,
            data.strategy,
            metadata={"correlationId": intent.correlation_id},
        )
        return {"status": IntentStatus.VALIDATED}
