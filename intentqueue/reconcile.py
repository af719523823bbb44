"""The reconciler: every intent whose status says it should have a job gets one.

The database is the truth and Redis the transport: a job can be lost (Redis restarted
without persistence, flushed, an enqueue that failed after the commit). The reconciler
compares the two and re-enqueues what is missing. Enqueueing is idempotent (one live job
per intent and stage), so running it concurrently or repeatedly is safe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.utils import timezone
from redis import Redis
from rq.job import Job, JobStatus

from intentqueue.models import Intent
from intentqueue.queues import KEY_PREFIX, get_connection, job_id_for
from intentqueue.services import QueueService
from intentqueue.status import QUEUED_STAGE, IntentStatus

logger = logging.getLogger(__name__)

#: Intents changed more recently than this are left alone (their enqueue may be on its way).
GRACE = timedelta(seconds=5)
BATCH = 500
LOCK_KEY = f"{KEY_PREFIX}:reconcile-lock"
LIVE = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.STARTED, JobStatus.DEFERRED}
#: A "queued" job found in no queue list (its worker died right after popping it).
ORPHANED = "orphaned"
#: How long a job must have been queued before missing from its list counts as orphaned.
ORPHAN_AGE = timedelta(seconds=30)


def _older_than(enqueued_at: bytes | None, age: timedelta) -> bool:
    if not enqueued_at:
        return True
    try:
        moment = datetime.strptime(enqueued_at.decode(), "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        return True
    return timezone.now() - moment.replace(tzinfo=UTC) > age


@dataclass
class ReconcileReport:
    """What one reconciler pass found and did."""

    checked: int = 0
    enqueued: int = 0
    marked_failed: int = 0


class Reconciler:
    """Compares intents in the database with their jobs in Redis."""

    def __init__(self, connection: Redis | None = None) -> None:
        self.connection = connection or get_connection()
        self._lists: dict[str, set[str]] = {}

    def run_if_due(self, every_seconds: int) -> ReconcileReport | None:
        """Run unless another process ran within ``every_seconds`` (a Redis lock)."""
        if not self.connection.set(LOCK_KEY, 1, nx=True, ex=max(1, every_seconds)):
            return None
        return self.run()

    def run(self) -> ReconcileReport:
        """One pass over every intent that should have a job."""
        service = QueueService(self.connection)
        report = ReconcileReport()
        self._lists.clear()
        cutoff = timezone.now() - GRACE
        candidates = Intent.objects.filter(
            status__in=list(QUEUED_STAGE), updated_at__lt=cutoff
        ).order_by("pk")
        last_pk = 0
        while True:
            batch = list(candidates.filter(pk__gt=last_pk)[:BATCH])
            if not batch:
                return report
            last_pk = batch[-1].pk
            statuses = self._job_statuses(batch)
            for intent, status in zip(batch, statuses, strict=True):
                report.checked += 1
                self._reconcile_one(service, intent, status, report)

    def _job_statuses(self, intents: list[Intent]) -> list[str | None]:
        """The status of each intent's job in the stage its status belongs to.

        A job that says "queued" but stands in no queue list was popped by a worker that
        died before it could mark the job started (nothing else would ever run it): it is
        reported as ``ORPHANED`` once it has been queued for longer than ``ORPHAN_AGE``.
        """
        job_ids = [
            job_id_for(QUEUED_STAGE[IntentStatus(intent.status)], intent.hash) for intent in intents
        ]
        with self.connection.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(Job.key_for(job_id), ["status", "origin", "enqueued_at"])
            rows = pipe.execute()
        statuses = [row[0].decode() if row[0] else None for row in rows]
        queued = [
            (index, row[1].decode())
            for index, row in enumerate(rows)
            if statuses[index] == JobStatus.QUEUED and row[1] and _older_than(row[2], ORPHAN_AGE)
        ]
        for index, origin in queued:
            if job_ids[index] not in self._listed(origin):
                statuses[index] = ORPHANED
        return statuses

    def _listed(self, origin: str) -> set[str]:
        """Job ids standing in one RQ queue list, read once per pass (one LRANGE)."""
        if origin not in self._lists:
            ids = self.connection.lrange(f"rq:queue:{origin}", 0, -1)
            self._lists[origin] = {i.decode() if isinstance(i, bytes) else i for i in ids}
        return self._lists[origin]

    def _reconcile_one(
        self, service: QueueService, intent: Intent, status: str | None, report: ReconcileReport
    ) -> None:
        if status in LIVE:
            return
        if status == JobStatus.FAILED:
            if intent.status != IntentStatus.FAILED:
                intent.mark_failed("its job is in the dead-letter queue", "dead_letter")
                report.marked_failed += 1
            return
        stage_key = QUEUED_STAGE[IntentStatus(intent.status)]
        if status == ORPHANED:  # let the enqueue below create a fresh job
            self.connection.delete(Job.key_for(job_id_for(stage_key, intent.hash)))
        if stage_key == "fulfillment":
            result = service.add_intent_to_fulfillment_queue(intent, enforce_limit=False)
        else:
            result = service.add_intent_to_execution_queue(intent)
        if result.created:
            report.enqueued += 1
            logger.info("reconciler: queued %s for %s (job was %s)", intent.hash, stage_key, status)
