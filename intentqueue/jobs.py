"""RQ entry points. A job's only argument is its JSON data (ids and metadata, see
``processors.base.JobData``); everything else is read from the database.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any

from redis import Redis
from rq import get_current_job
from rq.exceptions import DeserializationError
from rq.job import Job, Retry

from intentqueue.exceptions import BadJobDataError, PermanentError, RecheckLater
from intentqueue.processors.base import handle_job_failure, recheck_later, shown
from intentqueue.tracing import META_KEY

if TYPE_CHECKING:
    from intentqueue.processors.base import Processor

FULFILLMENT_FUNC = "intentqueue.jobs.run_fulfillment"
EXECUTION_FUNC = "intentqueue.jobs.run_execution"
FAILURE_CALLBACK = "intentqueue.jobs.on_job_failure"
#: The only functions an intentqueue worker runs; any other job goes to the dead-letter queue.
ALLOWED_FUNCTIONS = frozenset({FULFILLMENT_FUNC, EXECUTION_FUNC})
#: Job meta keys intentqueue reads, and the type each must have.
_META_TYPES: dict[str, type] = {
    "max_attempts": int, "priority": int, "stalled_count": int, "rechecks": int,
    "errors": list, META_KEY: dict,
}  # fmt: skip
#: Largest count kept from job meta (attempts and stalls are small numbers).
_MAX_META_COUNT = 10_000


class UnreadableJobError(BadJobDataError, DeserializationError):
    """A job whose stored ``data`` is not an intentqueue call: RQ treats it as its own
    ``DeserializationError``, our failure handling as bad job data (no retry)."""


def _processor(stage_key: str) -> type[Processor]:
    """The configured processor class of a stage (``INTENTQUEUE.processors``)."""
    from django.utils.module_loading import import_string

    from intentqueue.conf import intentqueue_settings
    from intentqueue.processors.base import Processor

    path = getattr(intentqueue_settings.processors, stage_key)
    try:
        cls = import_string(path)
    except ImportError as error:
        raise PermanentError(f"INTENTQUEUE.processors.{stage_key}: {error}") from error
    if not (isinstance(cls, type) and issubclass(cls, Processor)):
        raise PermanentError(f"INTENTQUEUE.processors.{stage_key}: {path} is not a Processor")
    return cls


def run_fulfillment(data: Any) -> dict[str, Any] | Retry:
    """Validate an intent (FulfillmentJob)."""
    return _run("fulfillment", data)


def run_execution(data: Any) -> dict[str, Any] | Retry:
    """Execute a validated intent on its destination chain (ExecutionJob)."""
    return _run("execution", data)


def _run(stage_key: str, data: Any) -> dict[str, Any] | Retry:
    job = get_current_job()
    try:
        return _processor(stage_key)(job).process(data)
    except RecheckLater as wait:
        return recheck_later(job, wait)


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
    """An RQ job that runs only intentqueue's entry points and failure callback.

    RQ imports ``job.func`` and the callbacks by dotted path and posts to the webhooks a job
    hash names, so anyone who can write to Redis could make a worker call any importable
    function or any URL; the checks below close that.
    """

    _foreign_webhooks = False

    def save(
        self, pipeline: Any = None, include_meta: bool = True, include_result: bool = True
    ) -> None:
        """RQ's save, without RQ's empty fields: RQ writes up to nine ``''`` values (no
        callback, not started, no worker...) into every job hash, each a hash entry of its
        own (~70 bytes with Redis's default encoding, a third of a waiting job's memory).
        They are deleted instead of written, which reads back the same (absent is empty)."""
        mapping = self.to_dict(include_meta=include_meta, include_result=include_result)
        # Read back as None by ``restore`` below (RQ's default applies): not worth an entry.
        mapping.pop("failure_callback_timeout", None)
        empty = [name for name, value in mapping.items() if value == ""]
        filled = {name: value for name, value in mapping.items() if value != ""}
        if pipeline is not None:
            pipeline.hset(self.key, mapping=filled)
            if empty:
                pipeline.hdel(self.key, *empty)
            return
        with self.connection.pipeline() as pipe:
            pipe.hset(self.key, mapping=filled)
            if empty:
                pipe.hdel(self.key, *empty)
            pipe.execute()

    def restore(self, raw_data: Any) -> Any:
        result = super().restore(raw_data)
        # A job hash written by hand can hold JSON meta that is not an object (or no JSON at
        # all: RQ keeps the raw bytes); every reader of ``job.meta`` expects a dict.
        if not isinstance(self.meta, dict) or isinstance(self.meta.get("unserialized"), bytes):
            self.meta = {}
        self.meta = {k: v for k, v in self.meta.items() if _meta_value_ok(k, v)}
        # None of our jobs has webhooks: never post job data to a URL read from Redis.
        self._foreign_webhooks = bool(self.webhooks)
        self.webhooks = []
        if self.failure_ttl == 0:  # RQ would delete it on failure: keep it for the DLQ
            self.failure_ttl = None
        # Our callbacks run with RQ's default time limit, whatever the hash says (a limit
        # the timer cannot take would stop the failure handler from recording the failure).
        self._success_callback_timeout = self._failure_callback_timeout = None
        self._stopped_callback_timeout = None
        return result

    def _deserialize_data(self) -> None:
        """Read ``data`` as ``[func, null, [args], {kwargs}]``, saying what is wrong if not."""
        try:
            loaded = self.serializer.loads(self.data)
        except Exception as error:  # any serializer, any garbage
            detail = shown(str(error) or type(error).__name__, quote=False)
            raise UnreadableJobError(f"job data is not valid JSON: {detail}") from error
        if not isinstance(loaded, list | tuple) or len(loaded) != 4:
            raise UnreadableJobError(
                f"job data must be [function, null, args, kwargs], got {shown(loaded)}"
            )
        func_name, instance, args, kwargs = loaded
        if not isinstance(func_name, str) or instance is not None:
            raise UnreadableJobError(f"job data names no function: {shown(loaded[:2])}")
        if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
            raise UnreadableJobError("job data must hold a list of args and an object of kwargs")
        self._func_name, self._instance, self._args, self._kwargs = loaded

    @property
    def success_callback(self) -> None:
        return None  # ours have none; a name stored in Redis is never imported

    @property
    def stopped_callback(self) -> None:
        return None  # ours have none; a name stored in Redis is never imported

    @property
    def failure_callback(self) -> Any:
        # Whatever the hash names: every job a worker runs gets our failure handling.
        return on_job_failure

    def _refusal(self) -> str | None:
        if self.func_name not in ALLOWED_FUNCTIONS:
            return f"refusing to run {shown(self.func_name)}: not an intentqueue job"
        callbacks = (
            ("success", self._success_callback_name, None),
            ("failure", self._failure_callback_name, FAILURE_CALLBACK),
            ("stopped", self._stopped_callback_name, None),
        )
        for kind, name, ours in callbacks:
            if name and name != ours:
                return f"refusing to run {kind} callback {shown(name)}: not an intentqueue callback"
        if self._foreign_webhooks:
            return "refusing to run a job with webhooks: intentqueue jobs have none"
        if len(self.args) != 1 or self.kwargs:
            return "intentqueue jobs take exactly one argument, the job data"
        return None

    def _execute(self) -> Any:
        refusal = self._refusal()
        if refusal:
            raise BadJobDataError(refusal)
        return super()._execute()


def _meta_value_ok(key: str, value: Any) -> bool:
    """Whether a meta value has the type intentqueue's readers expect (or is not ours)."""
    expected = _META_TYPES.get(key)
    if expected is None:
        return True
    if expected is int:
        return type(value) is int and 0 <= value <= _MAX_META_COUNT
    if key == META_KEY:  # W3C trace headers: text to text, or the tracer raises
        return isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        )
    return isinstance(value, expected)
