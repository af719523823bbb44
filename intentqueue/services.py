"""The public API: submitting intents and operating the queues."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from django.db import IntegrityError, transaction
from redis import Redis
from redis.exceptions import RedisError, WatchError
from rq import Callback, Queue
from rq.defaults import DEFAULT_FAILURE_TTL
from rq.exceptions import DeserializationError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import (
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.serializers import JSONSerializer

from intentqueue import jobs
from intentqueue.breakers import CircuitBreaker, breaker_states
from intentqueue.conf import intentqueue_settings
from intentqueue.exceptions import (
    BadJobDataError,
    EnqueueRateLimitedError,
    IllegalTransitionError,
    IntentQueueError,
    InvalidPayloadError,
)
from intentqueue.health import check_health
from intentqueue.metrics import QueueMetrics
from intentqueue.models import Intent, OperatorAction, timestamp_ms
from intentqueue.payloads import parse_intent_payload
from intentqueue.processors.base import JobData
from intentqueue.queues import (
    KEY_PREFIX,
    NORMAL_PRIORITY,
    PAUSED_KEY,
    PRIORITIES,
    Stage,
    band_name,
    get_connection,
    job_id_for,
    rq_queue,
    stage,
)
from intentqueue.status import IntentStatus
from intentqueue.tracing import META_KEY, current_carrier, producer_span

logger = logging.getLogger(__name__)

#: Job statuses that count as "this intent has a job in this stage".
LIVE_STATUSES = frozenset(
    {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.STARTED, JobStatus.DEFERRED}
)
#: How long a finished job's hash lives at most; the count limit usually removes it sooner.
FINISHED_TTL = 7 * 24 * 3600
#: How long a failed job stays in the dead-letter queue at most: RQ's default, which is
#: therefore not written into every job hash.
FAILED_TTL = DEFAULT_FAILURE_TTL
#: Seconds a job may run before RQ stops it.
JOB_TIMEOUT = 300


def submit_intent(payload: Any) -> Intent:
    """Create an intent from a payload in the original solver's JSON shape.

    ``payload`` is a dict or JSON text. Bad input raises ``InvalidPayloadError`` naming
    each bad field and creates nothing; a client over its enqueue limit gets
    ``EnqueueRateLimitedError``. Submitting an intent that exists already (same hash)
    returns the stored one unchanged. The fulfillment job is queued when the
    transaction that saved the intent commits.
    """
    parsed = parse_intent_payload(payload)
    existing = Intent.objects.filter(hash=parsed.hash).get_or_none()
    if existing is not None:
        return existing
    QueueService().check_enqueue_limit(parsed.source)
    try:
        with transaction.atomic():
            return Intent.objects.create(**parsed.model_fields())
    except IntegrityError:
        # Another process stored the same intent between our read and our insert.
        return Intent.objects.get(hash=parsed.hash)


def submit_intents(payloads: list[Any]) -> list[Intent]:
    """Create many intents at once (one INSERT per 500, one Redis round trip per batch).

    All payloads are validated first; any bad one raises ``InvalidPayloadError`` with
    paths prefixed by its index (``[3].route.salt``) and nothing is created. Intents that
    exist already are returned as stored. Jobs are queued when the transaction commits.
    """
    parsed, errors = [], {}
    for index, payload in enumerate(payloads):
        try:
            parsed.append(parse_intent_payload(payload))
        except InvalidPayloadError as error:
            errors.update({f"[{index}].{path}": message for path, message in error.errors.items()})
    if errors:
        raise InvalidPayloadError(errors)
    hashes = [p.hash for p in parsed]
    existing = {i.hash: i for i in Intent.objects.filter(hash__in=hashes)}
    fresh = list({p.hash: p for p in parsed if p.hash not in existing}.values())
    service = QueueService()
    for source, count in Counter(p.source for p in fresh).items():
        service.check_enqueue_limit(source, count)
    carrier = current_carrier()
    with transaction.atomic():
        created = Intent.objects.bulk_create(
            [Intent(**p.model_fields()) for p in fresh], batch_size=500
        )
        transaction.on_commit(lambda: _enqueue_created(created, carrier))
    by_hash = {**existing, **{i.hash: i for i in created}}
    return [by_hash[h] for h in hashes]


def _enqueue_created(intents: list[Intent], carrier: dict[str, str]) -> None:
    try:
        QueueService().add_new_intents_to_fulfillment_queue(intents, trace_context=carrier)
    except RedisError as error:
        logger.warning("could not queue %s intents (%s): the reconciler will", len(intents), error)


@dataclass
class _AuditRecord:
    """Jobs an audited operation touched."""

    job_ids: list[str] = field(default_factory=list)
    count: int = 0

    def add(self, job_id: str) -> None:
        self.count += 1
        if len(self.job_ids) < 100:
            self.job_ids.append(job_id)


@dataclass(frozen=True)
class EnqueueResult:
    """What adding an intent to a queue did."""

    job_id: str
    queue: str
    created: bool


@dataclass(frozen=True)
class FailedJobsOutcome:
    """What a dead-letter operation did."""

    count: int
    skipped: int = 0


class QueueService:
    """All queue operations: enqueue, metrics, health, pause/resume, dead-letter queue."""

    def __init__(self, connection: Redis | None = None) -> None:
        self.connection = connection or get_connection()

    # --- enqueue ------------------------------------------------------------------------

    def add_intent_to_fulfillment_queue(
        self,
        intent: Intent,
        strategy: str | None = None,
        *,
        priority: int | None = None,
        metadata: dict[str, Any] | None = None,
        attempts: int | None = None,
        backoff_ms: list[int] | None = None,
        enforce_limit: bool = True,
        trace_context: dict[str, str] | None = None,
    ) -> EnqueueResult:
        """Queue ``intent`` for validation (a FulfillmentJob).

        At most one live job per intent: if one is waiting, delayed or running, its id is
        returned and nothing is added. ``attempts``/``backoff_ms`` override the queue's
        retry defaults for this job; ``trace_context`` (W3C headers) parents the producer
        span when the caller's context was captured earlier (before an on-commit hook).
        """
        meta = {**_fulfillment_metadata(intent), **(metadata or {})}
        if enforce_limit:
            self.check_enqueue_limit(str(meta.get("source") or ""))
        data = JobData(intent.pk, intent.hash, strategy or intent.strategy, None, meta)
        return self._enqueue(
            stage("fulfillment"), intent, data,
            priority=priority or intent.priority, attempts=attempts, backoff_ms=backoff_ms,
            trace_context=trace_context,
        )  # fmt: skip

    def add_intent_to_execution_queue(
        self,
        intent: Intent,
        strategy: str | None = None,
        *,
        wallet_type: str | None = None,
        metadata: dict[str, Any] | None = None,
        attempts: int | None = None,
        backoff_ms: list[int] | None = None,
    ) -> EnqueueResult:
        """Queue a validated ``intent`` for execution (an ExecutionJob)."""
        meta = {
            "validatedAt": timestamp_ms(),
            "correlationId": intent.correlation_id,
            **(metadata or {}),
        }
        data = JobData(intent.pk, intent.hash, strategy or intent.strategy, wallet_type, meta)
        return self._enqueue(
            stage("execution"), intent, data,
            priority=intent.priority, attempts=attempts, backoff_ms=backoff_ms,
        )  # fmt: skip

    def _enqueue(
        self,
        target: Stage,
        intent: Intent,
        data: JobData,
        *,
        priority: int,
        attempts: int | None,
        backoff_ms: list[int] | None,
        trace_context: dict[str, str] | None = None,
    ) -> EnqueueResult:
        job_id = job_id_for(target.key, intent.hash)
        with producer_span(
            target.name, job_id, parent=trace_context,
            intent_hash=intent.hash, strategy=data.strategy,
        ) as carrier:  # fmt: skip
            return self._enqueue_once(
                target, intent, data, priority=priority, attempts=attempts,
                backoff_ms=backoff_ms, carrier=carrier,
            )  # fmt: skip

    def _enqueue_once(
        self,
        target: Stage,
        intent: Intent,
        data: JobData,
        *,
        priority: int,
        attempts: int | None,
        backoff_ms: list[int] | None,
        carrier: dict[str, str],
    ) -> EnqueueResult:
        """Create the job unless a live one exists (WATCH/MULTI on the job's key)."""
        queue, job = self._build_job(
            target, intent, data, priority=priority, attempts=attempts,
            backoff_ms=backoff_ms, carrier=carrier,
        )  # fmt: skip
        job_key = Job.key_for(job.id)
        with self.connection.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(job_key)
                    status, origin = (_text(v) for v in pipe.hmget(job_key, ["status", "origin"]))
                    if status in LIVE_STATUSES:
                        pipe.reset()
                        return EnqueueResult(job.id, origin or "", created=False)
                    pipe.multi()
                    if origin is not None:
                        _forget_old_run(pipe, job.id, origin)
                    queue.enqueue_job(job, pipeline=pipe)
                    pipe.execute()
                    return EnqueueResult(job.id, queue.name, created=True)
                except WatchError:
                    continue

    def _build_job(
        self,
        target: Stage,
        intent: Intent,
        data: JobData,
        *,
        priority: int,
        attempts: int | None = None,
        backoff_ms: list[int] | None = None,
        carrier: dict[str, str] | None = None,
    ) -> tuple[Queue, Job]:
        """The RQ job (not yet saved) of ``intent`` in ``target``, and its queue."""
        if priority not in PRIORITIES:
            raise IntentQueueError(f"priority must be 1 (highest) to 10 (normal), got {priority}")
        queue = rq_queue(band_name(target.name, priority), self.connection)
        keep = target.options
        meta: dict[str, Any] = {
            "max_attempts": attempts or target.options.attempts,
            "priority": priority,
        }
        if carrier:
            meta[META_KEY] = carrier
        func = jobs.FULFILLMENT_FUNC if target.key == "fulfillment" else jobs.EXECUTION_FUNC
        job = queue.create_job(
            func,
            args=(data.to_json(),),
            # RQ's default repeats the data (112 bytes); the id already names the intent.
            description=f"{func.rsplit('.', 1)[-1]}(intent {intent.pk})",
            job_id=job_id_for(target.key, intent.hash),
            retry=target.retry(attempts, backoff_ms),
            on_failure=Callback(jobs.on_job_failure),
            timeout=JOB_TIMEOUT,
            result_ttl=0 if keep.keep_count(keep.remove_on_complete) == 0 else FINISHED_TTL,
            meta=meta,
        )
        return queue, job

    def add_new_intents_to_fulfillment_queue(
        self, intents: list[Intent], *, trace_context: dict[str, str] | None = None
    ) -> int:
        """Queue many just-created intents for validation in one pipelined round trip.

        Only for intents that cannot have a job yet (created in the transaction that
        just committed): it skips the per-intent duplicate check of
        ``add_intent_to_fulfillment_queue``.
        """
        target = stage("fulfillment")
        with (
            producer_span(target.name, f"batch of {len(intents)}", parent=trace_context) as carrier,
            self.connection.pipeline(transaction=False) as pipe,
        ):
            for intent in intents:
                meta = _fulfillment_metadata(intent)
                data = JobData(intent.pk, intent.hash, intent.strategy, None, meta)
                queue, job = self._build_job(
                    target, intent, data, priority=intent.priority, carrier=carrier
                )
                queue.enqueue_job(job, pipeline=pipe)
            pipe.execute()
        return len(intents)

    def check_enqueue_limit(self, source: str, count: int = 1) -> None:
        """Count ``count`` enqueues for ``source``; ``EnqueueRateLimitedError`` over the
        limit."""
        limit = intentqueue_settings.enqueue_limit
        if not limit.max:
            return
        window = int(time.time() * 1000) // limit.duration
        key = f"{KEY_PREFIX}:enqueue-limit:{source or '-'}:{window}"
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.incrby(key, count)
            pipe.pexpire(key, limit.duration * 2)
            count, _ = pipe.execute()
        if int(count) > limit.max:
            raise EnqueueRateLimitedError(source or "-", limit.max, limit.duration / 1000)

    # --- metrics and health -------------------------------------------------------------

    def get_queue_metrics(self, queue_name: str) -> dict[str, Any]:
        """One queue (all its priorities): the spec's counts (waiting, active, completed,
        failed, delayed), plus stalled, paused, workers, jobs per minute, success rate,
        average duration, oldest waiting job's age, top failure reasons and the last hour
        per minute. See ``intentqueue.metrics``."""
        return QueueMetrics(self.connection).snapshot(stage(queue_name)).as_dict()

    def get_queue_health(self) -> dict[str, Any]:
        """The spec's QueueHealth (``is_healthy``, ``metrics``, ``redis_status``,
        ``last_processed_at``) with each queue's metrics and the ``problems`` found; the
        rules are in ``intentqueue.health``."""
        return check_health(self.connection)

    # --- control ------------------------------------------------------------------------

    def pause_queue(self, queue_name: str, *, actor: str = "system", reason: str = "") -> None:
        """Stop starting jobs of the queue (all priorities); its jobs stay where they are.
        Workers already waiting see it within a second; it survives worker restarts."""
        name = stage(queue_name).name
        with self._audited(OperatorAction.Action.PAUSE, name, actor, reason):
            self.connection.sadd(PAUSED_KEY, name)

    def resume_queue(self, queue_name: str, *, actor: str = "system", reason: str = "") -> None:
        """Start jobs of the queue again, in priority order."""
        name = stage(queue_name).name
        with self._audited(OperatorAction.Action.RESUME, name, actor, reason):
            self.connection.srem(PAUSED_KEY, name)

    def is_paused(self, queue_name: str) -> bool:
        """Whether the queue is paused."""
        return bool(self.connection.sismember(PAUSED_KEY, stage(queue_name).name))

    # --- circuit breakers ----------------------------------------------------------------

    def breakers(self) -> dict[str, dict[str, Any]]:
        """Every chain's circuit breaker: state, failures, opened_at, manual."""
        return breaker_states(self.connection)

    def open_breaker(self, chain_id: int | str, *, actor: str = "system", reason: str = "") -> None:
        """Hold every execution job of the chain (no attempt used) until ``close_breaker``."""
        chain = _chain_label(chain_id)
        with self._audited(OperatorAction.Action.BREAKER_OPEN, f"chain {chain}", actor, reason):
            CircuitBreaker(chain, self.connection).force_open()

    def close_breaker(
        self, chain_id: int | str, *, actor: str = "system", reason: str = ""
    ) -> None:
        """Let the chain's execution jobs run again and forget its failure count."""
        chain = _chain_label(chain_id)
        with self._audited(OperatorAction.Action.BREAKER_CLOSE, f"chain {chain}", actor, reason):
            CircuitBreaker(chain, self.connection).force_close()

    # --- dead-letter queue --------------------------------------------------------------

    def failed_job_ids(self, queue_name: str) -> Iterator[tuple[str, str]]:
        """(RQ queue name, job id) of every job in the queue's dead-letter queue."""
        for name in stage(queue_name).rq_names:
            registry = FailedJobRegistry(name, connection=self.connection)
            for job_id in registry.get_job_ids(cleanup=False):
                yield name, job_id

    def clear_failed_jobs(
        self,
        queue_name: str,
        *,
        reason: str,
        actor: str = "system",
        job_ids: list[str] | None = None,
    ) -> FailedJobsOutcome:
        """Delete the jobs of the queue's dead-letter queue (all, or ``job_ids``); their
        intents stay (or become) FAILED. ``reason`` is required and audited."""
        name = stage(queue_name).name
        with self._audited(
            OperatorAction.Action.CLEAR_FAILED, name, actor, reason, required=True
        ) as record:
            count = 0
            for rq_name, job_id in self._selected_failed(queue_name, job_ids):
                count += self._delete_failed(stage(queue_name), job_id, rq_name, actor)
                record.add(job_id)
            return FailedJobsOutcome(count)

    def retry_failed_jobs(
        self,
        queue_name: str,
        *,
        reason: str,
        actor: str = "system",
        job_ids: list[str] | None = None,
    ) -> FailedJobsOutcome:
        """Re-run the jobs of the queue's dead-letter queue (all, or ``job_ids``) with
        their attempts reset. ``reason`` is required and audited."""
        name = stage(queue_name).name
        with self._audited(
            OperatorAction.Action.RETRY_FAILED, name, actor, reason, required=True
        ) as record:
            retried = skipped = 0
            for rq_name, job_id in self._selected_failed(queue_name, job_ids):
                if self._retry_failed(stage(queue_name), job_id, rq_name, actor):
                    retried += 1
                    record.add(job_id)
                else:
                    skipped += 1
            return FailedJobsOutcome(retried, skipped)

    def retry_failed_job(
        self, queue_name: str, job_id: str, *, actor: str = "system", reason: str = ""
    ) -> bool:
        """Re-run one failed job (audited); False if it is not in the queue's DLQ."""
        target = stage(queue_name)
        with self._audited(OperatorAction.Action.RETRY_JOB, target.name, actor, reason) as record:
            done = self._retry_failed(target, job_id, None, actor)
            if done:
                record.add(job_id)
            return done

    def delete_failed_job(
        self, queue_name: str, job_id: str, *, actor: str = "system", reason: str = ""
    ) -> bool:
        """Remove one job from the DLQ (audited); its intent stays (or becomes) FAILED."""
        target = stage(queue_name)
        with self._audited(OperatorAction.Action.DELETE_JOB, target.name, actor, reason) as record:
            done = bool(self._delete_failed(target, job_id, None, actor))
            if done:
                record.add(job_id)
            return done

    def _selected_failed(self, queue_name: str, job_ids: list[str] | None) -> list[tuple[str, str]]:
        everything = list(self.failed_job_ids(queue_name))
        if job_ids is None:
            return everything
        wanted = set(job_ids)
        return [(rq_name, job_id) for rq_name, job_id in everything if job_id in wanted]

    @contextlib.contextmanager
    def _audited(
        self, action: str, queue: str, actor: str, reason: str, *, required: bool = False
    ) -> Iterator[_AuditRecord]:
        """Write an ``OperatorAction`` row for what the block does, failed or not."""
        if required and not reason.strip():
            raise IntentQueueError(f"a reason is required to {action.replace('_', ' ')}")
        record = _AuditRecord()
        try:
            yield record
        except Exception as error:
            OperatorAction.objects.create(
                actor=actor, action=action, queue=queue, job_ids=record.job_ids[:100],
                count=record.count, reason=reason, outcome=OperatorAction.Outcome.ERROR,
                detail=f"{type(error).__name__}: {error}"[:2000],
            )  # fmt: skip
            raise
        OperatorAction.objects.create(
            actor=actor, action=action, queue=queue, job_ids=record.job_ids[:100],
            count=record.count, reason=reason,
        )  # fmt: skip

    def _retry_failed(
        self, target: Stage, job_id: str, rq_name: str | None, actor: str = "system"
    ) -> bool:
        """Re-run one failed job: its intent goes back to the stage's start (recorded on
        the timeline) and gets a fresh job. False if the job is not in the queue's DLQ."""
        registry, job, intent = self._failed_job(target, job_id, rq_name)
        if job is None:  # not in the DLQ, or its job cannot be read any more
            if registry is not None:
                logger.warning("not retrying %s: its job data is gone or unreadable", job_id)
            return False
        if intent is None:  # not an intent job (or its intent is gone): plain RQ requeue
            FailedJobRegistry(job.origin, connection=self.connection).requeue(job)
            return True
        start = IntentStatus.PENDING if target.key == "fulfillment" else IntentStatus.VALIDATED
        if intent.status != start:
            try:
                intent.reset_for_retry(start, queue=job.origin, job_id=job.id, actor=actor)
            except IllegalTransitionError:
                logger.warning(
                    "not retrying %s: intent %s is %s", job.id, intent.hash, intent.status
                )
                return False
        if target.key == "fulfillment":
            self.add_intent_to_fulfillment_queue(intent, enforce_limit=False)
        else:
            self.add_intent_to_execution_queue(intent)
        return True

    def _delete_failed(
        self, target: Stage, job_id: str, rq_name: str | None, actor: str = "system"
    ) -> int:
        registry, job, intent = self._failed_job(target, job_id, rq_name)
        if registry is None:
            return 0
        if job is None:  # expired or unreadable job data: drop the dangling entry
            with self.connection.pipeline() as pipe:
                _forget_old_run(pipe, job_id, registry)
                pipe.execute()
            return 1
        if intent is not None and intent.status not in (
            IntentStatus.FAILED,
            IntentStatus.FULFILLED,
        ):
            with contextlib.suppress(IllegalTransitionError):
                intent.mark_failed("removed from the DLQ", "cleared", actor=actor)
        with self.connection.pipeline() as pipe:
            _forget_old_run(pipe, job.id, job.origin)
            pipe.execute()
        return 1

    def _failed_job(
        self, target: Stage, job_id: str, rq_name: str | None
    ) -> tuple[str | None, Job | None, Intent | None]:
        """(RQ queue whose DLQ holds ``job_id``, the job if it can be read, its intent)."""
        names = [rq_name] if rq_name else target.rq_names
        for name in names:
            if self.connection.zscore(f"rq:failed:{name}", job_id) is None:
                continue
            # IntentJob: a hash written by hand (or by pickle) loads with its unreadable
            # meta dropped, so it can be saved back (requeued) as JSON.
            try:
                job = jobs.IntentJob.fetch(
                    job_id, connection=self.connection, serializer=JSONSerializer
                )
                data = JobData.parse(job.args[0] if job.args else None)
            except NoSuchJobError:
                return name, None, None
            except (BadJobDataError, DeserializationError, ValueError, TypeError, KeyError):
                try:
                    job = jobs.IntentJob.fetch(job_id, self.connection, JSONSerializer)
                    return name, job, None
                except Exception:  # set aside because RQ cannot load it at all
                    return name, None, None
            intent = Intent.objects.for_job(data.intent_id, data.intent_hash)
            return name, job, intent
        return None, None, None


def _fulfillment_metadata(intent: Intent) -> dict[str, Any]:
    """A FulfillmentJob's metadata: who submitted the intent, when, its correlation id."""
    return {
        "source": intent.source,
        "timestamp": timestamp_ms(),
        "correlationId": intent.correlation_id,
    }


def _forget_old_run(pipe: Any, job_id: str, origin: str) -> None:
    """Remove every trace of a finished or failed run of ``job_id`` (inside MULTI)."""
    for registry in (FailedJobRegistry, FinishedJobRegistry, ScheduledJobRegistry):
        pipe.zrem(registry.key_template.format(origin), job_id)
    pipe.zrem(StartedJobRegistry.key_template.format(origin), job_id)
    pipe.delete(Job.key_for(job_id), f"rq:results:{job_id}")


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


__all__ = ["NORMAL_PRIORITY", "EnqueueResult", "QueueService", "submit_intent"]


def _chain_label(chain_id: int | str) -> str:
    """A chain id as breakers key it; anything but digits is refused."""
    label = str(chain_id).strip()
    if not label.isdigit() or len(label) > 20:
        raise IntentQueueError(f"not a chain id: {str(chain_id)[:40]!r}")
    return label
