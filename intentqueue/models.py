"""The intent domain: intents and their timeline of status changes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db import connections, models, router, transaction
from django.utils import timezone

from intentqueue.exceptions import IllegalTransitionError
from intentqueue.fields import Uint256Field
from intentqueue.querysets import IntentQuerySet
from intentqueue.status import ALLOWED_SOURCES, IntentStatus

UINT64_MAX = 2**64 - 1


def default_strategy() -> str:
    """The strategy of intents that name none (``INTENTQUEUE.default_strategy``)."""
    from intentqueue.conf import intentqueue_settings

    return intentqueue_settings.default_strategy


class Intent(models.Model):
    """A cross-chain order: deliver the route on the destination chain, earn the reward.

    Create intents with ``intentqueue.services.submit_intent(payload)`` (which validates
    and hashes) or the ORM; either way, saving a new intent queues its fulfillment job
    once the transaction commits. Status changes only through the verb methods below.
    """

    hash = models.CharField("intent hash", max_length=66, unique=True)
    source_chain_id = models.PositiveBigIntegerField(db_index=True)
    destination_chain_id = models.PositiveBigIntegerField(db_index=True)

    route_salt = models.CharField(max_length=66)
    route_deadline = models.PositiveBigIntegerField(help_text="Unix seconds")
    route_portal = models.CharField(max_length=42)
    route_native_amount = Uint256Field()
    route_tokens = models.JSONField(default=list, blank=True)
    route_calls = models.JSONField(default=list, blank=True)

    reward_deadline = models.PositiveBigIntegerField(help_text="Unix seconds")
    reward_creator = models.CharField(max_length=42, db_index=True)
    reward_prover = models.CharField(max_length=42)
    reward_native_amount = Uint256Field()
    reward_tokens = models.JSONField(default=list, blank=True)

    status = models.CharField(
        max_length=16, choices=IntentStatus.choices, default=IntentStatus.PENDING
    )
    strategy = models.CharField(max_length=64, default=default_strategy)
    priority = models.PositiveSmallIntegerField(
        default=10, help_text="Lower runs sooner (1 = high, 10 = normal)."
    )
    correlation_id = models.CharField(max_length=128, blank=True, db_index=True)
    source = models.CharField(
        max_length=64, blank=True, help_text="Who submitted it (an app, an API client)."
    )
    attempts = models.PositiveIntegerField(default=0, help_text="Runs of the current stage.")
    last_error = models.TextField(blank=True)
    last_error_type = models.CharField(max_length=64, blank=True)

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    last_processed_at = models.DateTimeField(null=True, blank=True)

    objects = IntentQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status", "updated_at"], name="intent_status_updated")]
        permissions = [
            ("retry_intent", "Can retry or re-enqueue intents"),
        ]

    def __str__(self) -> str:
        return f"{self.hash[:10]}… ({self.status})"

    # --- views of the stored fields in the hashing shape ---------------------------

    @property
    def route(self) -> dict[str, Any]:
        """The route as ``intentqueue.hashing`` takes it."""
        return {
            "salt": self.route_salt,
            "deadline": self.route_deadline,
            "portal": self.route_portal,
            "native_amount": int(self.route_native_amount),
            "tokens": self.route_tokens,
            "calls": self.route_calls,
        }

    @property
    def reward(self) -> dict[str, Any]:
        """The reward as ``intentqueue.hashing`` takes it."""
        return {
            "deadline": self.reward_deadline,
            "creator": self.reward_creator,
            "prover": self.reward_prover,
            "native_amount": int(self.reward_native_amount),
            "tokens": self.reward_tokens,
        }

    # --- status transitions -----------------------------------------------------------

    def transition(
        self,
        target: IntentStatus,
        *,
        queue: str = "",
        job_id: str = "",
        attempt: int | None = None,
        error: str = "",
        error_type: str = "",
        trace_id: str = "",
        actor: str = "",
        extra: dict[str, Any] | None = None,
        **fields: Any,
    ) -> IntentTransition:
        """Move to ``target`` by compare-and-set and append a timeline row.

        Raises ``IllegalTransitionError`` (and changes nothing) when ``target`` is not
        reachable from the stored status or another process changed it first.
        ``fields`` are further columns written in the same UPDATE.
        """
        target = IntentStatus(target)
        sources = ALLOWED_SOURCES[target]
        now = timezone.now()
        updates: dict[str, Any] = {"status": target, "updated_at": now, **fields}
        if error or error_type:
            updates.update(last_error=error, last_error_type=error_type)
        expected: str | None = self.status
        for _ in range(3):  # a stale in-memory status gets re-read
            if expected is not None and IntentStatus(expected) in sources:
                entry = IntentTransition(
                    intent=self, from_status=expected, to_status=target, at=now, queue=queue,
                    job_id=job_id, attempt=attempt, error=error, error_type=error_type,
                    trace_id=trace_id, actor=actor, extra=extra or {},
                )  # fmt: skip
                if _compare_and_set(self.pk, expected, updates, entry):
                    break
            current = Intent.objects.filter(pk=self.pk).values_list("status", flat=True).first()
            if current is None or IntentStatus(current) not in sources:
                allowed = ", ".join(sorted(sources))
                raise IllegalTransitionError(
                    self.hash, current or "deleted", target, f"allowed from: {allowed}"
                )
            expected = current
        else:
            raise IllegalTransitionError(self.hash, str(expected), target, "lost a race")
        for name, value in updates.items():
            setattr(self, name, value)
        return entry

    def start_validation(self, **context: Any) -> IntentTransition:
        """A fulfillment job claims the intent (PENDING or a re-run of VALIDATING)."""
        return self.transition(IntentStatus.VALIDATING, last_processed_at=timezone.now(), **context)

    def mark_validated(self, **context: Any) -> IntentTransition:
        """Validation passed; the intent waits for execution."""
        return self.transition(IntentStatus.VALIDATED, attempts=0, **context)

    def mark_invalid(self, reasons: str, **context: Any) -> IntentTransition:
        """Validation rejected the intent."""
        return self.transition(
            IntentStatus.INVALID, error=reasons, error_type="validation_failed", **context
        )

    def start_execution(self, **context: Any) -> IntentTransition:
        """An execution job claims the intent (VALIDATED or a re-run of EXECUTING)."""
        return self.transition(IntentStatus.EXECUTING, last_processed_at=timezone.now(), **context)

    def mark_fulfilled(self, tx_hash: str, **context: Any) -> IntentTransition:
        """The fulfillment transaction is confirmed on the destination chain."""
        extra = {**context.pop("extra", {}), "tx_hash": tx_hash}
        return self.transition(IntentStatus.FULFILLED, extra=extra, **context)

    def mark_failed(self, error: str, error_type: str = "", **context: Any) -> IntentTransition:
        """A job gave up on the intent."""
        return self.transition(
            IntentStatus.FAILED, error=error, error_type=error_type or "failed", **context
        )

    def reset_for_retry(self, target: IntentStatus, **context: Any) -> IntentTransition:
        """Operator retry: back to the start of a stage, attempts reset."""
        return self.transition(target, attempts=0, **context)

    def record_attempt_error(
        self, error: str, error_type: str, *, attempt: int, **context: Any
    ) -> IntentTransition:
        """Record a failed attempt that will be retried; the status stays."""
        now = timezone.now()
        Intent.objects.filter(pk=self.pk).update(
            last_error=error, last_error_type=error_type, updated_at=now
        )
        self.last_error, self.last_error_type = error, error_type
        return IntentTransition.objects.create(
            intent=self,
            from_status=self.status,
            to_status=self.status,
            at=now,
            attempt=attempt,
            error=error,
            error_type=error_type,
            **context,
        )


def _compare_and_set(
    pk: int, expected: str, updates: dict[str, Any], entry: IntentTransition
) -> bool:
    """Apply ``updates`` to intent ``pk`` only if its status is still ``expected``, and
    save the timeline row ``entry`` with it, atomically; returns whether it happened.

    On PostgreSQL this is one statement (an UPDATE ... RETURNING feeding the INSERT of the
    timeline row), so one round trip and no explicit transaction; elsewhere an UPDATE and
    an INSERT in a transaction. Every job's claim and result go through here.
    """
    db = router.db_for_write(Intent)
    connection = connections[db]
    if connection.vendor != "postgresql":
        with transaction.atomic(using=db):
            if not Intent.objects.using(db).filter(pk=pk, status=expected).update(**updates):
                return False
            entry.save(using=db, force_insert=True)
        return True
    quote = connection.ops.quote_name
    set_columns, set_params = _prepared(Intent, updates, connection)
    sets = ", ".join(f"{column} = %s" for column in set_columns)
    row_values = {
        f.attname: getattr(entry, f.attname)
        for f in IntentTransition._meta.concrete_fields
        if not f.primary_key and f.attname != "intent_id"
    }
    columns, params = _prepared(IntentTransition, row_values, connection)
    # Written out, not compiled by the ORM: compiling cost as much as running it.
    sql = (
        f"WITH moved AS (UPDATE {quote(Intent._meta.db_table)} SET {sets} "
        f"WHERE id = %s AND status = %s RETURNING id) "
        f"INSERT INTO {quote(IntentTransition._meta.db_table)} "
        f"({quote('intent_id')}, {', '.join(columns)}) "
        f"SELECT moved.id, {', '.join(['%s'] * len(params))} FROM moved RETURNING id"
    )
    update_params = [*set_params, pk, expected]
    with connection.cursor() as cursor:
        cursor.execute(sql, [*update_params, *params])
        row = cursor.fetchone()
    if row is None:
        return False
    entry.pk = row[0]
    entry._state.adding, entry._state.db = False, db
    return True


def _prepared(
    model: type[models.Model], values: dict[str, Any], connection: Any
) -> tuple[list[str], list[Any]]:
    """Quoted columns and database values of ``values`` (field name -> Python value)."""
    columns, params = [], []
    for name, value in values.items():
        field = model._meta.get_field(name)
        assert isinstance(field, models.Field)
        columns.append(connection.ops.quote_name(field.column))
        params.append(field.get_db_prep_save(value, connection))
    return columns, params


class IntentTransition(models.Model):
    """One row of an intent's timeline: a status change, or a failed attempt."""

    intent = models.ForeignKey(Intent, on_delete=models.CASCADE, related_name="timeline")
    from_status = models.CharField(max_length=16, choices=IntentStatus.choices)
    to_status = models.CharField(max_length=16, choices=IntentStatus.choices)
    at = models.DateTimeField(default=timezone.now)
    queue = models.CharField(max_length=64, blank=True)
    job_id = models.CharField(max_length=128, blank=True)
    attempt = models.PositiveIntegerField(null=True, blank=True)
    error = models.TextField(blank=True)
    error_type = models.CharField(max_length=64, blank=True)
    trace_id = models.CharField(max_length=32, blank=True)
    actor = models.CharField(max_length=150, blank=True, help_text="Operator, if any.")
    extra = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["at", "id"]
        indexes = [models.Index(fields=["intent", "at"], name="transition_intent_at")]

    def __str__(self) -> str:
        return f"{self.from_status} → {self.to_status} at {self.at:%Y-%m-%d %H:%M:%S}"

    @property
    def is_attempt_error(self) -> bool:
        """A failed attempt recorded without a status change."""
        return self.from_status == self.to_status and bool(self.error)


def timestamp_ms(moment: datetime | None = None) -> int:
    """Milliseconds since the epoch, as the job metadata carries them."""
    return int((moment or timezone.now()).timestamp() * 1000)


class OperatorAction(models.Model):
    """The audit ledger: one row for every pause, resume, retry and clear, by anyone.

    Written by ``QueueService`` whether the call came from the admin, a command or code;
    read-only in the admin.
    """

    class Action(models.TextChoices):
        """What the operator did."""

        PAUSE = "pause", "Pause queue"
        RESUME = "resume", "Resume queue"
        RETRY_FAILED = "retry_failed", "Retry failed jobs"
        CLEAR_FAILED = "clear_failed", "Clear failed jobs"
        RETRY_JOB = "retry_job", "Retry one job"
        DELETE_JOB = "delete_job", "Delete one job"
        RETRY_INTENT = "retry_intent", "Retry intent"
        BREAKER_OPEN = "breaker_open", "Open circuit breaker"
        BREAKER_CLOSE = "breaker_close", "Close circuit breaker"

    class Outcome(models.TextChoices):
        """Whether it worked."""

        OK = "ok", "OK"
        ERROR = "error", "Error"

    at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.CharField(max_length=150, help_text="User name, or 'system'/'cli'.")
    action = models.CharField(max_length=32, choices=Action.choices)
    queue = models.CharField(max_length=64, blank=True)
    job_ids = models.JSONField(default=list, blank=True, help_text="At most the first 100.")
    count = models.PositiveIntegerField(default=0, help_text="Jobs or intents touched.")
    reason = models.TextField(blank=True)
    outcome = models.CharField(max_length=8, choices=Outcome.choices, default=Outcome.OK)
    detail = models.TextField(blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        permissions = [
            ("view_queues", "Can view queues and the dead-letter queue"),
            ("pause_queue", "Can pause and resume queues"),
            ("retry_jobs", "Can retry failed jobs"),
            ("clear_jobs", "Can clear failed jobs"),
        ]

    def __str__(self) -> str:
        return f"{self.actor} {self.action} {self.queue} ({self.count})"


# The execution stage's models live with the chain code; importing them here registers
# them with the app.
from intentqueue.chain.models import ChainTransaction, SignerNonce  # noqa: E402, F401
