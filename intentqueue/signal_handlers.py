"""Signal receivers, connected when the app is ready."""

from __future__ import annotations

import logging
from typing import Any

from django.db import connections, transaction
from django.db.models.signals import post_migrate, post_save
from django.dispatch import receiver
from redis.exceptions import RedisError

from intentqueue.models import Intent
from intentqueue.status import IntentStatus
from intentqueue.tracing import current_carrier

logger = logging.getLogger(__name__)


@receiver(post_save, sender=Intent, dispatch_uid="intentqueue.enqueue_new_intent")
def enqueue_new_intent(
    sender: type[Intent], instance: Intent, created: bool, **kwargs: Any
) -> None:
    """Queue a newly saved PENDING intent for validation once its transaction commits.

    A rolled-back intent never gets a job. If Redis is down at commit time the intent
    stays PENDING and the reconciler queues it later: nothing is lost.
    """
    if not created or instance.status != IntentStatus.PENDING or kwargs.get("raw"):
        return
    intent_id, using = instance.pk, kwargs.get("using") or "default"
    carrier = current_carrier()  # the saver's trace, captured before the deferral
    transaction.on_commit(lambda: _enqueue_committed(intent_id, carrier), using=using)


def _enqueue_committed(intent_id: int, carrier: dict[str, str] | None = None) -> None:
    from intentqueue.services import QueueService

    intent = Intent.objects.filter(pk=intent_id, status=IntentStatus.PENDING).get_or_none()
    if intent is None:
        return
    try:
        QueueService().add_intent_to_fulfillment_queue(
            intent, enforce_limit=False, trace_context=carrier
        )
    except RedisError as error:
        from intentqueue.queues import describe_redis_error

        logger.warning(
            "could not queue intent %s (%s); it stays PENDING for the reconciler",
            intent.hash, describe_redis_error(error),
        )  # fmt: skip


@receiver(post_migrate)
def enable_sqlite_wal(sender: Any, using: str = "default", **kwargs: Any) -> None:
    """Switch a SQLite database to WAL once, after migrating.

    WAL lets readers and a writer work at once (web server and workers). It is a
    property of the file, so it is set here and not on every connection: two processes
    switching at the same moment fail with "database is locked".
    """
    conn = connections[using]
    if conn.vendor == "sqlite" and not conn.is_in_memory_db():  # type: ignore[attr-defined]
        with conn.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode=WAL")
            # Statistics for the planner: without them filtered lists over many intents
            # pick poor indexes (the workers refresh them in their maintenance step).
            cursor.execute("PRAGMA optimize")
