"""RQ entry points. A job's only argument is its JSON data (ids and metadata, see
``processors.base.JobData``); everything else is read from the database.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from redis import Redis
from rq import get_current_job
from rq.job import Job

from intentqueue.exceptions import BadJobDataError
from intentqueue.processors.base import handle_job_failure

FULFILLMENT_FUNC = "intentqueue.jobs.run_fulfillment"
EXECUTION_FUNC = "intentqueue.jobs.run_execution"
FAILURE_CALLBACK = "intentqueue.jobs.on_job_failure"
#: The only functions an intentqueue worker runs; any other job goes to the dead-letter queue.
ALLOWED_FUNCTIONS = frozenset({FULFILLMENT_FUNC, EXECUTION_FUNC})


def run_fulfillment(data: Any) -> dict[str, Any]:
    """Validate an intent (FulfillmentJob)."""
    from intentqueue.processors.fulfillment import FulfillmentProcessor

    return FulfillmentProcessor(get_current_job()).process(data)


def run_execution(data: Any) -> dict[str, Any]:
    """Execute a validated intent on its destination chain (ExecutionJob)."""
    from intentqueue.processors.execution import BlockchainProcessor

    return BlockchainProcessor(get_current_job()).process(data)


def on_job_failure(
    job: Job,
    connection: Redis,
    exc_type: type[BaseException],
    exc_value: BaseException,
    traceback: TracebackType | Any,
) -> None:
    """RQ's ``on_failure`` callback: classify the error, record it, decide the retry."""
    handle_job_failure(job, exc_value)


class IntentJob(Job):
    """An RQ job that refuses to run functions other than intentqueue's entry points.

    RQ imports ``job.func`` by dotted path, so anyone who can write to Redis could make a
    worker call any importable function; this allow-list closes that.
    """

    def _execute(self) -> Any:
        if self.func_name not in ALLOWED_FUNCTIONS:
            raise BadJobDataError(f"refusing to run {self.func_name!r}: not an intentqueue job")
        return super()._execute()
