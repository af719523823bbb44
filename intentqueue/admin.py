"""The operators' admin: intents with their timeline, the audit ledger, and the queues.

- ``IntentAdmin``: status badges, filters and exact searches that stay fast with millions
  of rows (no full counts, no DISTINCT scans, indexed lookups only), the timeline of each
  intent (status changes, attempt errors, transactions, trace ids), and the retry and
  re-enqueue actions (``intentqueue.operations``), each behind a confirmation page.
- ``OperatorActionAdmin``: the read-only audit ledger. Its model carries the queue
  permissions, so the queue pages (``intentqueue.admin_views``) hang off its URLs:
  ``/admin/intentqueue/operatoraction/queues/``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from django.apps import apps
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import connection, models
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy, ngettext
from redis.exceptions import RedisError

from intentqueue.admin_views import (
    QueueConsoleMixin,
    ReasonForm,
    fmt_age,
    fmt_time,
)
from intentqueue.conf import intentqueue_settings
from intentqueue.exceptions import IntentQueueError
from intentqueue.models import Intent, IntentTransition, OperatorAction
from intentqueue.operations import (
    MAX_INTENTS,
    IntentOperations,
    IntentsOutcome,
    can_reenqueue,
    can_retry,
)
from intentqueue.queues import get_connection, job_id_for, stages

_HASH32 = re.compile(r"^0x[0-9a-fA-F]{64}$")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
#: Most timeline rows shown on an intent's page (the newest are kept).
TIMELINE_LIMIT = 500


# --- the execution stage's transactions (optional) -------------------------------------------

_tables_seen: set[str] = set()


def chain_transaction_model() -> type[models.Model] | None:
    """Hook for the execution stage's ``ChainTransaction`` (``tx_hash``, ``intent``):
    the model when it is installed and its table exists, else None. Searches by
    transaction hash and the transactions on an intent's timeline use it."""
    try:
        model = apps.get_model("intentqueue", "ChainTransaction")
    except LookupError:
        return None
    table = model._meta.db_table
    if table not in _tables_seen:
        if table not in connection.introspection.table_names():
            return None
        _tables_seen.add(table)
    return model


# --- list filters that never scan the table ---------------------------------------------------


class StrategyFilter(admin.SimpleListFilter):
    """Strategies from the configuration (a DISTINCT over millions of rows is slow)."""

    title = gettext_lazy("strategy")
    parameter_name = "strategy"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        names = sorted(intentqueue_settings.strategies)
        current = self.value()
        if current and current not in names:
            names.append(current)
        return [(name, name) for name in names]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(strategy=value) if value else queryset


class _ChainFilter(admin.SimpleListFilter):
    """Chains named in the configuration (``chains`` and the strategies' supported
    chains); without any, the chains stored, looked up at most every few minutes (a
    DISTINCT over an index, cached). Any chain id still filters when given in the URL."""

    field_name = ""
    CACHE_SECONDS = 300

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        ids: set[int] = set()
        conf = intentqueue_settings
        for key in conf.chains:
            if str(key).isdigit():
                ids.add(int(key))
        for spec in conf.strategies.values():
            for chain_id in (spec.get("options") or {}).get("supported_chains") or []:
                if str(chain_id).isdigit():
                    ids.add(int(chain_id))
        if not ids:
            ids.update(self._stored_chains())
        current = self.value()
        if current and current.isdigit():
            ids.add(int(current))
        return [(str(chain_id), str(chain_id)) for chain_id in sorted(ids)]

    def _stored_chains(self) -> list[int]:
        key = f"intentqueue:admin:chains:{self.field_name}"
        found = cache.get(key)
        if found is None:
            found = list(
                Intent.objects.order_by(self.field_name)
                .values_list(self.field_name, flat=True)
                .distinct()[:100]
            )
            cache.set(key, found, self.CACHE_SECONDS)
        return list(found)

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value and value.isdigit():
            return queryset.filter(**{self.field_name: int(value)})
        return queryset


class SourceChainFilter(_ChainFilter):
    title = gettext_lazy("source chain")
    parameter_name = "source_chain"
    field_name = "source_chain_id"


class DestinationChainFilter(_ChainFilter):
    title = gettext_lazy("destination chain")
    parameter_name = "destination_chain"
    field_name = "destination_chain_id"


class CappedPaginator(Paginator):
    """Counts at most ``CAP`` + 1 rows: with millions of intents an exact count costs a
    full scan, and nobody pages that deep (filter or search instead). Pages beyond the
    cap are not offered, so no request runs a huge OFFSET either."""

    CAP = 10_000

    @property
    def cap_label(self) -> str:
        return f"{self.CAP:,}"

    @cached_property
    def count(self) -> int:
        rows: Any = self.object_list
        # The order does not change a count, and without it the database can stop after
        # CAP + 1 rows of whichever index the filter uses instead of sorting them all.
        return int(rows.order_by()[: self.CAP + 1].count())


# --- intents ------------------------------------------------------------------------------------


@admin.register(Intent)
class IntentAdmin(admin.ModelAdmin):
    """Intents: the route and reward as submitted, the bookkeeping as the workers wrote it."""

    list_display = (
        "short_hash", "status_badge", "strategy", "chains", "priority", "attempts", "age",
    )  # fmt: skip
    list_display_links = ("short_hash",)
    list_filter = (
        "status", StrategyFilter, SourceChainFilter, DestinationChainFilter,
        ("created_at", admin.DateFieldListFilter),
    )  # fmt: skip
    # Exact, indexed lookups only (see get_search_results).
    search_fields = ("=hash", "=correlation_id", "=reward_creator")
    search_help_text = gettext_lazy(
        "Exact intent hash, correlation id, creator address or transaction hash."
    )
    sortable_by = ("short_hash", "age")
    ordering = ("-created_at", "-id")
    list_per_page = 100
    list_select_related = False
    show_full_result_count = False
    paginator = CappedPaginator
    # Facet counts would count every filter choice over the whole table.
    show_facets = admin.ShowFacets.NEVER
    actions = ["retry_selected", "reenqueue_selected"]
    change_form_template = "admin/intentqueue/intent/change_form.html"
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "hash",
                    "status_badge",
                    ("strategy", "priority"),
                    ("source_chain_id", "destination_chain_id"),
                    ("correlation_id", "source"),
                )
            },
        ),
        (
            "Processing",
            {
                "fields": (
                    "attempts",
                    "last_error_type",
                    "last_error",
                    "created_at",
                    "updated_at",
                    "last_processed_at",
                ),
            },
        ),
        (
            "Route",
            {
                "classes": ["collapse"],
                "fields": (
                    "route_salt",
                    "route_deadline",
                    "route_portal",
                    "route_native_amount",
                    "route_tokens",
                    "route_calls",
                ),
            },
        ),
        (
            "Reward",
            {
                "classes": ["collapse"],
                "fields": (
                    "reward_deadline",
                    "reward_creator",
                    "reward_prover",
                    "reward_native_amount",
                    "reward_tokens",
                ),
            },
        ),
    )
    #: Written by the workers and the hash function, never by hand.
    machine_fields = (
        "hash", "status", "attempts", "last_error", "last_error_type", "created_at",
        "updated_at", "last_processed_at",
    )  # fmt: skip
    #: The signed content of the intent: changing any of it would break its hash.
    content_fields = (
        "source_chain_id", "destination_chain_id", "route_salt", "route_deadline",
        "route_portal", "route_native_amount", "route_tokens", "route_calls",
        "reward_deadline", "reward_creator", "reward_prover", "reward_native_amount",
        "reward_tokens",
    )  # fmt: skip

    class Media:
        css = {"all": ["intentqueue/console.css"]}

    # --- list columns -------------------------------------------------------------------

    @admin.display(description=gettext_lazy("hash"), ordering="hash")
    def short_hash(self, obj: Intent) -> str:
        return format_html(
            '<span class="iq-mono" title="{}">{}…{}</span>', obj.hash, obj.hash[:10], obj.hash[-6:]
        )

    @admin.display(description=gettext_lazy("status"))
    def status_badge(self, obj: Intent) -> str:
        return format_html(
            '<span class="iq-badge iq-status-{}">{}</span>',
            obj.status.lower(),
            obj.get_status_display(),
        )

    @admin.display(description=gettext_lazy("chains"))
    def chains(self, obj: Intent) -> str:
        return f"{obj.source_chain_id} → {obj.destination_chain_id}"

    @admin.display(description=gettext_lazy("age"), ordering="created_at")
    def age(self, obj: Intent) -> str:
        return format_html(
            '<span title="{}">{}</span>',
            fmt_time(obj.created_at),
            fmt_age((timezone.now() - obj.created_at).total_seconds()),
        )

    # --- search -------------------------------------------------------------------------

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Intent], search_term: str
    ) -> tuple[QuerySet[Intent], bool]:
        """One exact identifier, told apart by its shape so that each search is a single
        indexed equality (an OR over several columns lets planners fall back to a scan):
        a 32-byte hex is an intent or transaction hash, a 20-byte hex a creator address,
        anything else a correlation id. Hex matches however the operator pasted its case."""
        term = search_term.strip()
        if not term:
            return queryset, False
        if _HASH32.match(term):
            pks = set(Intent.objects.filter(hash=term.lower()).values_list("pk", flat=True))
            tx_model = chain_transaction_model()
            if tx_model is not None:
                pks.update(
                    tx_model._default_manager.filter(tx_hash__in={term, term.lower()})
                    .exclude(intent_id=None)
                    .values_list("intent_id", flat=True)[:1000]
                )
            return queryset.filter(pk__in=sorted(pks)), False
        if _ADDRESS.match(term):
            return queryset.filter(reward_creator__in=_address_spellings(term)), False
        return queryset.filter(correlation_id=term), False

    # --- permissions --------------------------------------------------------------------

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        return ("status_badge", *self.machine_fields, *self.content_fields)

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Intents enter through submit_intent(), which validates and hashes them.
        return False

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("intentqueue.retry_intent")

    # --- actions ------------------------------------------------------------------------

    @admin.action(
        description=gettext_lazy("Retry selected failed or invalid intents"),
        permissions=["retry"],
    )
    def retry_selected(self, request: HttpRequest, queryset: QuerySet[Intent]) -> Any:
        return self._intent_operation(request, queryset, "retry", bulk=True)

    @admin.action(
        description=gettext_lazy("Re-enqueue selected intents that lost their job"),
        permissions=["retry"],
    )
    def reenqueue_selected(self, request: HttpRequest, queryset: QuerySet[Intent]) -> Any:
        return self._intent_operation(request, queryset, "reenqueue", bulk=True)

    def _intent_operation(
        self, request: HttpRequest, queryset: QuerySet[Intent], op: str, *, bulk: bool
    ) -> HttpResponse | None:
        """Confirmation page, then the operation through ``IntentOperations``."""
        if not self.has_retry_permission(request):
            raise PermissionDenied
        selected = list(queryset.order_by("pk")[: MAX_INTENTS + 1])
        if len(selected) > MAX_INTENTS:
            self.message_user(
                request,
                _("Select at most %(max)d intents at a time (filter the list first).")
                % {"max": MAX_INTENTS},
                messages.WARNING,
            )
            return None
        allowed: Callable[[Intent], bool] = can_retry if op == "retry" else can_reenqueue
        eligible = [i for i in selected if allowed(i)]
        confirmed = request.method == "POST" and request.POST.get("post") == "yes"
        form = ReasonForm(
            request.POST if confirmed else None,
            required=op == "retry" and len(selected) > 1,
        )
        if confirmed and form.is_valid():
            actor = request.user.get_username()
            reason = form.cleaned_data["reason"].strip()
            operations = IntentOperations()
            try:
                if op == "retry":
                    outcome = operations.retry_intents(selected, actor=actor, reason=reason)
                else:
                    outcome = operations.reenqueue_intents(selected, actor=actor, reason=reason)
            except (IntentQueueError, RedisError) as error:
                self.message_user(request, str(error), messages.ERROR)
            else:
                self._report(request, op, outcome)
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": (_("Retry intents") if op == "retry" else _("Re-enqueue intents"))
            if bulk
            else (_("Retry intent") if op == "retry" else _("Re-enqueue intent")),
            "opts": self.opts,
            "op": op,
            "selected": selected[:100],
            "selected_count": len(selected),
            "eligible_count": len(eligible),
            "skipped_count": len(selected) - len(eligible),
            "form": form,
            "bulk": bulk,
            "action_name": "retry_selected" if op == "retry" else "reenqueue_selected",
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
            "select_across": request.POST.get("select_across", "0"),
            "all_pks": [i.pk for i in selected],
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/intentqueue/intent/confirm_operation.html", context)

    def _report(self, request: HttpRequest, op: str, outcome: IntentsOutcome) -> None:
        done = len(outcome.done)
        if op == "retry":
            text = ngettext(
                "Retried %(count)d intent: it is queued again from the start of its stage.",
                "Retried %(count)d intents: they are queued again from the start of their stage.",
                done,
            ) % {"count": done}
        else:
            text = ngettext(
                "Re-enqueued %(count)d intent.", "Re-enqueued %(count)d intents.", done
            ) % {"count": done}
        if outcome.unchanged:
            text += " " + ngettext(
                "%(count)d already had a live job.",
                "%(count)d already had a live job.",
                len(outcome.unchanged),
            ) % {"count": len(outcome.unchanged)}
        if outcome.skipped:
            text += " " + ngettext(
                "%(count)d was skipped: its status does not allow it.",
                "%(count)d were skipped: their status does not allow it.",
                len(outcome.skipped),
            ) % {"count": len(outcome.skipped)}
        level = messages.SUCCESS if done else messages.WARNING
        self.message_user(request, text, level)

    # --- extra views ----------------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        def wrap(op: str) -> Callable[..., HttpResponse]:
            def view(request: HttpRequest, object_id: str) -> HttpResponse:
                return self.single_operation_view(request, object_id, op)

            return self.admin_site.admin_view(view)

        prefix = f"{self.opts.app_label}_{self.opts.model_name}"
        return [
            path("<path:object_id>/retry/", wrap("retry"), name=f"{prefix}_retry"),
            path("<path:object_id>/reenqueue/", wrap("reenqueue"), name=f"{prefix}_reenqueue"),
            *super().get_urls(),
        ]

    def single_operation_view(self, request: HttpRequest, object_id: str, op: str) -> HttpResponse:
        """Retry or re-enqueue one intent from its page (confirmation first)."""
        if not self.has_retry_permission(request):
            raise PermissionDenied
        intent = get_object_or_404(Intent, pk=object_id)
        change_url = reverse("admin:intentqueue_intent_change", args=[intent.pk])
        response = self._intent_operation(
            request, Intent.objects.filter(pk=intent.pk), op, bulk=False
        )
        return response or HttpResponseRedirect(change_url)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        intent = self.get_object(request, object_id)
        extra = dict(extra_context or {})
        if intent is not None:
            extra.update(
                timeline=intent_timeline(intent),
                jobs=intent_jobs(intent),
                can_retry_intent=self.has_retry_permission(request) and can_retry(intent),
                can_reenqueue_intent=self.has_retry_permission(request) and can_reenqueue(intent),
                can_view_queues=request.user.has_perm("intentqueue.view_queues"),
            )
        return super().change_view(request, object_id, form_url, extra)


def _address_spellings(address: str) -> list[str]:
    """An address as stored (EIP-55 checksummed) and as pasted."""
    spellings = [address, address.lower()]
    try:
        from eth_utils import to_checksum_address

        spellings.append(str(to_checksum_address(address)))
    except (ImportError, ValueError):
        pass
    return list(dict.fromkeys(spellings))


def intent_timeline(intent: Intent) -> dict[str, Any]:
    """The intent's history in time order: status changes, failed attempts and (when the
    execution stage is installed) its chain transactions."""
    rows = list(
        IntentTransition.objects.filter(intent=intent).order_by("-at", "-id")[:TIMELINE_LIMIT]
    )
    truncated = len(rows) == TIMELINE_LIMIT
    entries: list[dict[str, Any]] = []
    stage_keys = {s.name: s for s in stages()}
    for row in reversed(rows):
        queue_name = row.queue
        job_stage = next((s for s in stage_keys.values() if queue_name in s.rq_names), None)
        entries.append(
            {
                "kind": "error" if row.is_attempt_error else "status",
                "at": row.at,
                "row": row,
                "tx_hash": (row.extra or {}).get("tx_hash", ""),
                "job_stage": job_stage.name if job_stage else "",
            }
        )
    tx_model = chain_transaction_model()
    if tx_model is not None:
        for tx in tx_model._default_manager.filter(intent_id=intent.pk).order_by("created_at")[
            :TIMELINE_LIMIT
        ]:
            moment = getattr(tx, "sent_at", None) or getattr(tx, "created_at", None)
            entries.append({"kind": "tx", "at": moment, "tx": tx})
    entries.sort(key=lambda e: (e["at"] or datetime.min.replace(tzinfo=UTC), 0))
    return {"entries": entries, "truncated": truncated}


def intent_jobs(intent: Intent) -> list[dict[str, Any]]:
    """The intent's job in each stage as Redis has it now (one round trip)."""
    try:
        redis = get_connection()
        with redis.pipeline(transaction=False) as pipe:
            for target in stages():
                pipe.hmget(f"rq:job:{job_id_for(target.key, intent.hash)}", ["status", "origin"])
            replies = pipe.execute()
    except RedisError:
        return []
    jobs = []
    for target, (status, origin) in zip(stages(), replies, strict=True):
        if status is None:
            continue
        jobs.append(
            {
                "stage": target.name,
                "job_id": job_id_for(target.key, intent.hash),
                "status": status.decode(),
                "origin": (origin or b"").decode(),
            }
        )
    return jobs


# --- the audit ledger and the queue pages -------------------------------------------------------


@admin.register(OperatorAction)
class OperatorActionAdmin(QueueConsoleMixin, admin.ModelAdmin):
    """Who paused, resumed, retried or cleared what, when and why. Read-only."""

    list_display = ("at", "actor", "action", "queue", "count", "outcome_badge", "short_reason")
    list_filter = ("action", "outcome", ("at", admin.DateFieldListFilter))
    search_fields = ("actor", "queue", "reason")
    search_help_text = gettext_lazy("Actor, queue or words of the reason.")
    show_full_result_count = False
    list_per_page = 100
    fields = (
        "at", "actor", "action", "queue", "count", "outcome", "reason", "detail", "job_ids",
    )  # fmt: skip
    readonly_fields = fields

    class Media:
        css = {"all": ["intentqueue/console.css"]}

    @admin.display(description=gettext_lazy("outcome"), ordering="outcome")
    def outcome_badge(self, obj: OperatorAction) -> str:
        return format_html(
            '<span class="iq-badge iq-outcome-{}">{}</span>', obj.outcome, obj.get_outcome_display()
        )

    @admin.display(description=gettext_lazy("reason"))
    def short_reason(self, obj: OperatorAction) -> str:
        return obj.reason if len(obj.reason) <= 80 else obj.reason[:79] + "…"

    def get_urls(self) -> list[URLPattern]:
        return [*self.get_console_urls(), *super().get_urls()]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
