"""Admin registrations: intents with their timeline."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from intentqueue.models import Intent, IntentTransition


class IntentTransitionInline(admin.TabularInline):
    """The intent's timeline, oldest first, read-only."""

    model = IntentTransition
    extra = 0
    can_delete = False
    ordering = ("at", "id")
    fields = (
        "at", "from_status", "to_status", "queue", "job_id", "attempt", "error_type", "error",
        "trace_id", "actor",
    )  # fmt: skip
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Intent)
class IntentAdmin(admin.ModelAdmin):
    """Intents: the route and reward as submitted, the bookkeeping as the workers wrote it."""

    list_display = (
        "hash", "status", "strategy", "source_chain_id", "destination_chain_id", "priority",
        "attempts", "created_at",
    )  # fmt: skip
    list_filter = ("status", "strategy", "source_chain_id", "destination_chain_id", "created_at")
    search_fields = ("=hash", "=correlation_id", "=reward_creator")
    date_hierarchy = "created_at"
    list_select_related = False
    show_full_result_count = False
    inlines = [IntentTransitionInline]
    fieldsets = (
        (None, {"fields": ("hash", "status", "strategy", "priority", "correlation_id", "source")}),
        ("Chains", {"fields": ("source_chain_id", "destination_chain_id")}),
        (
            "Route",
            {
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
                "fields": (
                    "reward_deadline",
                    "reward_creator",
                    "reward_prover",
                    "reward_native_amount",
                    "reward_tokens",
                ),
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

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        return self.machine_fields + self.content_fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Intents enter through submit_intent(), which validates and hashes them.
        return False
