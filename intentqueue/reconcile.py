"""The reconciler: every intent whose status says it should have a job gets one.

The database is the truth and Redis the transport: a job can be lost (Redis restarted
without persistence, flushed, an enqueue that failed after the commit). The reconciler
compares the two and re-enqueues what is missing. Enqueueing is idempotent (one live job
per intent and stage), so running it concurrently or repeatedly is safe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

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

    def run_if_due(self, every_seconds: int) -> ReconcileReport | None:
        """Run unless another process ran within ``every_seconds`` (a Redis lock)."""
        if not self.connection.set(LOCK_KEY, 1, nx=True, ex=max(1, every_seconds)):
            return None
        return self.run()

    def run(self) -> ReconcileReport:
        """One pass over every intent that should have a job."""
        service = QueueService(self.connection)
        report = ReconcileReport()
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
        """The status of each intent's job in the stage its status belongs to."""
        with self.connection.pipeline(transaction=False) as pipe:
            for intent in intents:
                stage_key = QUEUED_STAGE[IntentStatus(intent.status)]
                pipe.hget(Job.key_for(job_id_for(stage_key, intent.hash)), "status")
            return [status.decode() if status else None for status in pipe.execute()]

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
        if stage_key == "fulfillment":
            result = service.add_intent_to_fulfillment_queue(intent, enforce_limit=False)
        else:
            result = service.add_intent_to_execution_queue(intent)
        if result.created:
            report.enqueued += 1
            logger.info("reconciler: queued %s for %s (job was %s)", intent.hash, stage_key, status)
