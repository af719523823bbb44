"""The RQ worker of intentqueue: ``manage.py rqworker intent-fulfillment`` with no flags.

Execution model: jobs run in the worker process (RQ's ``SimpleWorker``), not in a forked
work horse. A fork costs about 15 ms a job here (66 jobs/s against 324 in-process), and
our jobs are short database and RPC calls whose failures are Python exceptions. Crash
detection is kept: while a job runs, a heartbeat thread renews the job's entry in RQ's
started registry every ``lock_duration / 3``; if the worker process dies, the entry
expires after ``lock_duration`` and the next stall check (every ``stalled_interval``, by
any worker) re-queues the job without using an attempt, up to ``max_stalled_count``.
Concurrency is the number of worker processes (``rqworker-pool``, or ``standalone``).

On top of RQ it adds, through RQ's extension points only:
- the JSON serializer, the job allow-list and the scheduler (delayed retries), always on;
- priorities: a worker on a stage's queue serves all its priority queues, highest first,
  with every ``FAIRNESS_EVERY``-th dequeue taken lowest first so none starves;
- per-queue pause, checked before and after each dequeue (short blocking waits);
- a per-queue limit on job starts shared by all workers;
- retention of completed and failed jobs, and the reconciler, in the maintenance step;
- a job that cannot be read or finished goes to the dead-letter queue with the reason (a
  queued id without a job hash is dropped with a warning); the worker carries on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from django.db import DatabaseError, close_old_connections, connection
from rq import Queue
from rq.defaults import DEFAULT_FAILURE_TTL, DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
from rq.exceptions import DequeueTimeout, DeserializationError, NoSuchJobError, StopRequested
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job, JobStatus
from rq.registry import clean_registries
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer
from rq.suspension import WORKERS_SUSPENDED
from rq.utils import get_version, utcformat
from rq.worker import SimpleWorker

from intentqueue.conf import intentqueue_settings
from intentqueue.exceptions import BadJobDataError, UnknownQueueError
from intentqueue.jobs import IntentJob
from intentqueue.logcontext import log_context
from intentqueue.metrics import fingerprint, record_job_end
from intentqueue.processors.base import handle_job_failure, shown
from intentqueue.queues import KEY_PREFIX, PAUSED_KEY, Stage, stage
from intentqueue.retention import queue_trim, trim_registries
from intentqueue.tracing import consumer_span, record_outcome

logger = logging.getLogger(__name__)

#: One dequeue in this many looks at the lowest priority first (anti-starvation).
FAIRNESS_EVERY = 10
#: Longest a worker blocks waiting for a job before it re-checks pauses and limits.
DEQUEUE_WAIT_SECONDS = 1


def _queue_names(queues: Iterable[Any]) -> list[str]:
    return [q if isinstance(q, str) else q.name for q in queues]


class IntentScheduler(RQScheduler):
    """RQ's scheduler process, made to stop when its worker dies, with short locks.

    RQ forks the scheduler from the worker; if the worker is killed (SIGKILL, OOM) RQ's
    scheduler keeps running as an orphan holding the queues' scheduler locks. And RQ's
    locks live a minute past the last heartbeat, so when a worker's whole process group
    dies, delayed retries and confirmation re-checks wait that long for another worker's
    scheduler; ours live ``LOCK_SECONDS`` (refreshed every second by the heartbeat).
    """

    LOCK_SECONDS = 10

    def start(self) -> Any:
        self._worker_pid = os.getpid()
        return super().start()

    def acquire_locks(self, auto_start: bool = False) -> set[str]:
        locks: set[str] = super().acquire_locks(auto_start=auto_start)
        self._shorten_locks()
        return locks

    def heartbeat(self) -> None:
        if os.getppid() != getattr(self, "_worker_pid", os.getppid()):
            self.log.warning("scheduler: its worker is gone, stopping")
            self.request_stop()
            return
        super().heartbeat()
        self._shorten_locks()

    def _shorten_locks(self) -> None:
        if not self._acquired_locks:
            return
        with self.connection.pipeline(transaction=False) as pipe:
            for name in self._acquired_locks:
                pipe.expire(self.get_locking_key(name), self.LOCK_SECONDS)
            pipe.execute()


class IntentWorker(SimpleWorker):
    """An RQ worker serving intentqueue's stages (see the module docstring)."""

    def __init__(self, queues: Sequence[Any] | Any, *args: Any, **kwargs: Any) -> None:
        names = _queue_names(queues if isinstance(queues, list | tuple) else [queues])
        self.stages: dict[str, Stage] = {}
        expanded: list[str] = []
        for name in names:
            try:
                target = stage(name)
            except UnknownQueueError:
                expanded.append(name)  # not ours: served as a plain RQ queue
                continue
            self.stages[target.name] = target
            expanded.extend(n for n in target.rq_names if n not in expanded)
        conf = intentqueue_settings.worker
        kwargs.update(
            serializer=JSONSerializer,
            job_class=IntentJob,
            queue_class=Queue,
            maintenance_interval=max(1, conf.stalled_interval // 1000),
        )
        connection = kwargs.get("connection")
        rq_queues = [
            Queue(n, connection=connection, serializer=JSONSerializer, job_class=IntentJob)
            for n in expanded
        ]
        super().__init__(rq_queues, *args, **kwargs)
        self.lock_seconds = max(1, conf.lock_duration // 1000)
        self._stage_of = {q.name: self._stage_name(q.name) for q in self.queues}
        self._dequeues = 0
        self._paused_hint: set[str] | None = None
        self._scheduler_tried = time.monotonic()

    def _stage_name(self, rq_name: str) -> str | None:
        for name, target in self.stages.items():
            if rq_name in target.rq_names:
                return name
        return None

    # --- RQ hooks -----------------------------------------------------------------------

    @property
    def dequeue_timeout(self) -> int:
        return DEQUEUE_WAIT_SECONDS

    def get_heartbeat_ttl(self, job: Job) -> int:
        """A running job's hold lasts ``lock_duration``; the heartbeat thread renews it."""
        return self.lock_seconds

    def handle_warm_shutdown_request(self) -> None:
        """Remember the request even if RQ's ``StopRequested`` lands inside a guarded block
        (maintenance swallows errors so a worker keeps running), so the loop still ends."""
        super().handle_warm_shutdown_request()
        self._stop_requested = True

    def _start_scheduler(
        self,
        burst: bool = False,
        logging_level: str | None = "INFO",
        date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
        log_format: str = DEFAULT_LOGGING_FORMAT,
    ) -> None:
        """RQ's scheduler start-up, with the scheduler that stops with its worker."""
        self.scheduler = IntentScheduler(
            self.queues,
            connection=self.connection,
            logging_level=logging_level if logging_level is not None else self.log.level,
            date_format=date_format,
            log_format=log_format,
            serializer=self.serializer,
        )
        self.scheduler.acquire_locks()
        if not self.scheduler.acquired_locks:
            return
        if not burst:
            self.scheduler.start()
            return
        try:
            self.scheduler.register_birth()
            self.scheduler.enqueue_scheduled_jobs()
        finally:
            self.scheduler.release_locks()
            self.scheduler.register_death()

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's heartbeat, in one round trip when no pipeline is given (RQ sends its two
        commands one by one after every job)."""
        if pipeline is not None:
            super().heartbeat(timeout, pipeline=pipeline)
            return
        with self.connection.pipeline(transaction=False) as pipe:
            super().heartbeat(timeout, pipeline=pipe)
            pipe.execute()

    def check_for_suspension(self, burst: bool) -> None:
        """RQ's check for ``rq suspend`` before each dequeue, in the same round trip as the
        heartbeat and the read of the paused queues (which the dequeue then uses)."""
        with self.connection.pipeline() as pipe:
            super().heartbeat(pipeline=pipe)
            pipe.exists(WORKERS_SUSPENDED)
            pipe.smembers(PAUSED_KEY)
            *_, suspended, paused = pipe.execute()
        if suspended:
            super().check_for_suspension(burst)
            return
        self._paused_hint = {p.decode() for p in paused}

    def work(self, *args: Any, **kwargs: Any) -> bool:
        """RQ's work loop with the scheduler always on (delayed retries must run)."""
        kwargs["with_scheduler"] = True
        return super().work(*args, **kwargs)

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run the job in this process, inside its consumer span and log context, with a
        heartbeat and fresh database connections."""
        close_old_connections()
        stop = threading.Event()
        beat = threading.Thread(target=self._keep_alive, args=(job, stop), daemon=True)
        beat.start()
        with log_context(job_id=job.id, queue=queue.name), consumer_span(job, queue.name) as span:
            try:
                super().execute_job(job, queue)
            except (redis.ConnectionError, redis.TimeoutError, StopRequested):
                raise  # RQ's own handling: the server or a shutdown, not this job
            except Exception as error:
                # RQ could not record the job's end (its failure handling writes the hash
                # back, and a hand-written field can break that): never lose the worker.
                self._abandon(job, queue, error)
            finally:
                stop.set()
                beat.join()
                close_old_connections()
                record_outcome(span, getattr(job, "outcome", None))
                self._after_job(job, queue)

    def _keep_alive(self, job: Job, stop: threading.Event) -> None:
        interval = max(0.5, self.lock_seconds / 3)
        while not stop.wait(interval):
            try:
                if self.execution is not None:
                    self.maintain_heartbeats(job)
            except Exception:  # a missed beat is retried; the job must go on
                logger.warning("heartbeat for job %s failed", job.id, exc_info=True)

    def _after_job(self, job: Job, queue: Queue) -> None:
        """Count the run in the queue's metrics and apply its retention, in one round
        trip of two scripts."""
        stage_name = self._stage_of.get(queue.name)
        if stage_name is None:
            return
        outcome = getattr(job, "outcome", None) or (
            "completed" if job.get_status(refresh=False) == JobStatus.FINISHED else "failed"
        )
        duration = None
        if job.started_at and job.ended_at:
            duration = (job.ended_at - job.started_at).total_seconds() * 1000
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                record_job_end(
                    pipe, stage_name, outcome=outcome, duration_ms=duration, now=time.time(),
                    reason=getattr(job, "failure_fingerprint", None),
                )  # fmt: skip
                queue_trim(pipe, self.stages[stage_name])
                pipe.execute()
        except Exception:
            logger.warning("recording the end of job %s failed", job.id, exc_info=True)

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """Dequeue the next job of a non-paused queue, highest priority first."""
        idle_since = time.monotonic()
        while True:
            if self._stop_requested:
                return None
            paused = self._heartbeat_and_paused()
            if self.should_run_maintenance_tasks:
                self.run_maintenance_tasks()
            self._take_over_scheduler()
            queues = self._dequeue_order(paused)
            wait = self._limiter_wait(queues)
            if not queues or wait:
                if timeout is None:  # burst mode: nothing can run now
                    return None
                time.sleep(min(wait or DEQUEUE_WAIT_SECONDS, DEQUEUE_WAIT_SECONDS))
                continue
            try:
                result = self._dequeue_any(queues, timeout)
            except DequeueTimeout:
                if max_idle_time is not None and time.monotonic() - idle_since > max_idle_time:
                    return None
                continue
            if result is None:
                return None
            if self._put_back_if_held(*result) or not self._readable(*result):
                continue
            self._dequeues += 1
            self.log.info("Worker %s: %s: %s", self.name, result[1].name, result[0].id)
            return result

    def _take_over_scheduler(self) -> None:
        """Start this worker's scheduler if the one holding the locks died: tried every few
        seconds (RQ tries only in the maintenance step, every ``stalled_interval``)."""
        scheduler = self.scheduler
        if scheduler is None or self.last_cleaned_at is None:
            return  # no scheduler in this worker, or the start-up run just happened
        if scheduler._process is not None and scheduler._process.is_alive():
            return
        now = time.monotonic()
        if now - self._scheduler_tried < IntentScheduler.LOCK_SECONDS / 2:
            return
        self._scheduler_tried = now
        scheduler.acquire_locks(auto_start=True)

    # --- jobs that cannot be read ---------------------------------------------------------
    # Anyone who can write to Redis can queue garbage. RQ ends the worker on a job hash it
    # cannot read (the job id already popped: lost), silently skips a hash without data, and
    # our span and log context read a job's data before RQ's own guards. A job that cannot
    # be read goes to its queue's dead-letter queue with the reason instead (or, when there
    # is no hash to keep, is dropped with a warning), and the worker carries on.

    def _dequeue_any(self, queues: list[Queue], timeout: int | None) -> tuple[Job, Queue] | None:
        """RQ's ``Queue.dequeue_any`` (same Redis commands), except for unreadable jobs."""
        by_key = {q.key: q for q in queues}
        keys = list(by_key)
        while True:
            if len(keys) == 1 and get_version(self.connection) >= (6, 2, 0):
                popped = self.queue_class.lmove(self.connection, keys[0], timeout)
            else:
                popped = self.queue_class.lpop(keys, timeout, connection=self.connection)
            if popped is None:
                return None
            raw_key, raw_id = popped
            queue = by_key[raw_key.decode() if isinstance(raw_key, bytes) else raw_key]
            try:
                job_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            except UnicodeDecodeError:
                logger.warning("dropped a job id from %s that is not UTF-8: %r", queue.name, raw_id)
                self.connection.lrem(IntermediateQueue(queue.key, self.connection).key, 1, raw_id)
                continue
            try:
                job = self.job_class.fetch(
                    job_id, connection=self.connection, serializer=self.serializer
                )
            except (redis.ConnectionError, redis.TimeoutError):
                raise  # the server, not the job: RQ's own handling applies
            except NoSuchJobError as error:
                self._set_aside(job_id, queue, f"job hash cannot be read: {error}")
                continue
            except Exception as error:
                reason = f"job hash cannot be read: {type(error).__name__}: {error}"
                self._set_aside(job_id, queue, reason)
                continue
            # The job runs, fails and is retried as a job of the queue it was taken from,
            # whatever its hash says (an empty origin would put it in no dead-letter queue).
            job.origin = queue.name
            return job, queue

    def _set_aside(
        self,
        job_id: str,
        queue: Queue,
        reason: str,
        errors: list[Any] | None = None,
        *,
        count: bool = True,
    ) -> None:
        """Put a job RQ cannot load (or finish) in the dead-letter queue, written field by
        field (RQ may still fail to load it, but the dead-letter view and the reconciler read
        only these fields), or drop the id with a warning when there is no hash to keep."""
        reason = shown(reason, quote=False)
        key = Job.key_for(job_id)
        IntermediateQueue(queue.key, self.connection).remove(job_id)
        if self.connection.type(key) not in (b"hash", "hash"):
            logger.warning("dropped job %s from %s: %s", job_id, queue.name, reason)
            return
        at = _utcnow()
        final = {"attempt": len(errors or []) + 1, "type": BadJobDataError.error_type,
                 "message": reason, "at": at.isoformat(), "final": True}  # fmt: skip
        meta = {
            "errors": [*(errors or []), final],
            "failure_reason": BadJobDataError.error_type,
        }  # fmt: skip
        with self.connection.pipeline() as pipe:
            pipe.hset(key, mapping={
                "status": JobStatus.FAILED.value, "origin": queue.name, "ended_at": utcformat(at),
                "exc_info": reason, "meta": json.dumps(meta),
            })  # fmt: skip
            pipe.expire(key, DEFAULT_FAILURE_TTL)
            pipe.zadd(queue.failed_job_registry.key, {job_id: time.time() + DEFAULT_FAILURE_TTL})
            stage_name = self._stage_of.get(queue.name)
            if count and stage_name is not None:
                record_job_end(
                    pipe, stage_name, outcome="failed", duration_ms=None, now=time.time(),
                    reason=fingerprint(BadJobDataError.error_type, reason),
                )  # fmt: skip
            pipe.execute()
        logger.warning(
            "job %s of %s moved to the dead-letter queue: %s", job_id, queue.name, reason
        )

    def _abandon(self, job: Job, queue: Queue, error: Exception) -> None:
        """Set aside a job whose run RQ could not finish, keeping the errors recorded."""
        logger.warning("job %s of %s could not be finished", job.id, queue.name, exc_info=True)
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(job, pipeline=pipe)  # out of the started registry
            pipe.execute()
        reason = f"job could not be finished: {type(error).__name__}: {error}"
        meta = job.meta if isinstance(job.meta, dict) else {}
        errors = list(meta.get("errors") or [])[-19:]
        self._set_aside(job.id, queue, reason, errors, count=False)  # _after_job counts it
        job.outcome = "failed"  # type: ignore[attr-defined]

    def _readable(self, job: Job, queue: Queue) -> bool:
        """Whether ``job``'s data can be read; if not, it fails at once (never starts)."""
        try:
            job.func_name  # noqa: B018  # reading it deserialises the data
        except DeserializationError as error:
            logger.warning("job %s of %s cannot be read: %s", job.id, queue.name, error)
            try:
                self._fail_unread(job, queue, error)
            except (redis.ConnectionError, redis.TimeoutError):
                raise
            except Exception as failure:  # RQ could not write the hash back either
                self._abandon(job, queue, failure)
            return False
        return True

    def _fail_unread(self, job: Job, queue: Queue, error: DeserializationError) -> None:
        job.ended_at = _utcnow()
        handle_job_failure(job, error)  # our failure record, and no retry (bad job data)
        job.retries_left = 0
        exc_string = "".join(traceback.format_exception(error))
        IntermediateQueue(queue.key, self.connection).remove(job.id)
        self.handle_job_failure(job, queue, exc_string=exc_string)
        self._after_job(job, queue)

    def _heartbeat_and_paused(self) -> set[str]:
        paused, self._paused_hint = self._paused_hint, None
        if paused is not None:  # read with the suspension check just before
            return paused
        with self.connection.pipeline() as pipe:
            self.heartbeat(pipeline=pipe)
            pipe.smembers(PAUSED_KEY)
            *_, paused = pipe.execute()
        return {p.decode() for p in paused}

    def _dequeue_order(self, paused: set[str]) -> list[Queue]:
        queues = [q for q in self.queues if self._stage_of.get(q.name) not in paused]
        if self._dequeues % FAIRNESS_EVERY == FAIRNESS_EVERY - 1:
            queues.reverse()
        return queues

    # --- pause and rate limit -----------------------------------------------------------

    def _limiter_key(self, stage_name: str) -> tuple[str, int, float] | None:
        """(key, max, seconds until the window ends) of a stage's limiter, or None if off."""
        limiter = intentqueue_settings.queue(self.stages[stage_name].key).limiter
        if not limiter.max:
            return None
        now_ms = time.time() * 1000
        window = int(now_ms // limiter.duration)
        left = ((window + 1) * limiter.duration - now_ms) / 1000
        return f"{KEY_PREFIX}:limiter:{stage_name}:{window}", limiter.max, left

    def _limiter_wait(self, queues: list[Queue]) -> float:
        """Seconds to wait because every stage with waiting work is at its limit."""
        names = {self._stage_of.get(q.name) for q in queues} - {None}
        waits = []
        for name in names:
            limit = self._limiter_key(str(name))
            if limit is None:
                return 0
            key, maximum, left = limit
            if int(self.connection.get(key) or 0) < maximum:
                return 0
            waits.append(left)
        return min(waits) if waits else 0

    def _put_back_if_held(self, job: Job, queue: Queue) -> bool:
        """Return a job to the front of its queue if its stage was paused or hit its limit
        while this worker waited (so nothing starts in a paused queue)."""
        stage_name = self._stage_of.get(queue.name)
        if stage_name is None:
            return False
        held = bool(self.connection.sismember(PAUSED_KEY, stage_name))
        limit = None if held else self._limiter_key(stage_name)
        if limit is not None:
            key, maximum, left = limit
            with self.connection.pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.expire(key, int(left) + 2)
                count, _ = pipe.execute()
            held = int(count) > maximum
        if held:
            self.connection.lpush(queue.key, job.id)
        return held

    # --- maintenance --------------------------------------------------------------------

    def clean_registries(self) -> None:
        """RQ's registry cleanup (which finds stalled jobs), one worker per queue at a time.

        Runs every ``stalled_interval``; RQ's own lock would hold 15 minutes if a worker
        died while cleaning, so a shorter one of ours is used.
        """
        for queue in self.queues:
            key = f"{KEY_PREFIX}:maintenance:{queue.name}"
            if self.connection.set(key, self.name, nx=True, ex=self.maintenance_interval):
                clean_registries(queue, self._exc_handlers)
        self.last_cleaned_at = _utcnow()

    def run_maintenance_tasks(self) -> None:
        """RQ's maintenance, then retention, the reconciler and SQLite's statistics."""
        super().run_maintenance_tasks()
        self._trim()
        self._reconcile()
        if connection.vendor == "sqlite":
            with contextlib.suppress(DatabaseError), connection.cursor() as cursor:
                cursor.execute("PRAGMA optimize")

    def _trim(self) -> None:
        try:
            for target in self.stages.values():
                trim_registries(self.connection, target)
        except Exception:
            logger.warning("trimming job registries failed", exc_info=True)

    def _reconcile(self) -> None:
        from intentqueue.reconcile import Reconciler

        try:
            close_old_connections()
            Reconciler(self.connection).run_if_due(self.maintenance_interval)
        except Exception:
            logger.warning("reconciling intents failed", exc_info=True)
        finally:
            close_old_connections()


def _utcnow() -> Any:
    from rq.utils import now

    return now()
