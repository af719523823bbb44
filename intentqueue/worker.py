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
- retention of completed and failed jobs, and the reconciler, in the maintenance step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from django.db import close_old_connections
from rq import Queue
from rq.exceptions import DequeueTimeout
from rq.job import Job, JobStatus
from rq.registry import clean_registries
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from intentqueue.conf import intentqueue_settings
from intentqueue.exceptions import UnknownQueueError
from intentqueue.jobs import IntentJob
from intentqueue.logcontext import log_context
from intentqueue.metrics import record_job_end
from intentqueue.queues import KEY_PREFIX, PAUSED_KEY, Stage, stage
from intentqueue.retention import over_limit, registry_keys, trim_registries
from intentqueue.tracing import consumer_span, record_outcome

logger = logging.getLogger(__name__)

#: One dequeue in this many looks at the lowest priority first (anti-starvation).
FAIRNESS_EVERY = 10
#: Longest a worker blocks waiting for a job before it re-checks pauses and limits.
DEQUEUE_WAIT_SECONDS = 1


def _queue_names(queues: Iterable[Any]) -> list[str]:
    return [q if isinstance(q, str) else q.name for q in queues]


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
        trip unless something must be trimmed."""
        stage_name = self._stage_of.get(queue.name)
        if stage_name is None:
            return
        target = self.stages[stage_name]
        finished, failed = registry_keys(target)
        outcome = getattr(job, "outcome", None) or (
            "completed" if job.get_status(refresh=False) == JobStatus.FINISHED else "failed"
        )
        duration = None
        if job.started_at and job.ended_at:
            duration = (job.ended_at - job.started_at).total_seconds() * 1000
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                for key in (*finished, *failed):
                    pipe.zcard(key)
                record_job_end(
                    pipe, stage_name, outcome=outcome, duration_ms=duration, now=time.time(),
                    reason=getattr(job, "failure_fingerprint", None),
                )  # fmt: skip
                counts = pipe.execute()[: len(finished) + len(failed)]
            if over_limit(target, sum(counts[: len(finished)]), sum(counts[len(finished) :])):
                trim_registries(self.connection, target)
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
            queues = self._dequeue_order(paused)
            wait = self._limiter_wait(queues)
            if not queues or wait:
                if timeout is None:  # burst mode: nothing can run now
                    return None
                time.sleep(min(wait or DEQUEUE_WAIT_SECONDS, DEQUEUE_WAIT_SECONDS))
                continue
            try:
                result = self.queue_class.dequeue_any(
                    queues, timeout, connection=self.connection, job_class=self.job_class,
                    serializer=self.serializer, death_penalty_class=self.death_penalty_class,
                )  # fmt: skip
            except DequeueTimeout:
                if max_idle_time is not None and time.monotonic() - idle_since > max_idle_time:
                    return None
                continue
            if result is None:
                return None
            if self._put_back_if_held(*result):
                continue
            self._dequeues += 1
            self.log.info("Worker %s: %s: %s", self.name, result[1].name, result[0].id)
            return result

    def _heartbeat_and_paused(self) -> set[str]:
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
        """RQ's maintenance, then retention and the reconciler."""
        super().run_maintenance_tasks()
        self._trim()
        self._reconcile()

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
