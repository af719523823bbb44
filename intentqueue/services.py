"""The public API: submitting intents and operating the queues."""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction

from intentqueue.models import Intent
from intentqueue.payloads import parse_intent_payload


def submit_intent(payload: Any) -> Intent:
    """Create an intent from a payload in the original solver's JSON shape.

    ``payload`` is a dict or JSON text. Bad input raises ``InvalidPayloadError`` naming
    each bad field and creates nothing. Submitting an intent that exists already (same
    hash) returns the stored one unchanged.
    """
    parsed = parse_intent_payload(payload)
    existing = Intent.objects.filter(hash=parsed.hash).first()
    if existing is not None:
        return existing
    try:
        with transaction.atomic():
            return Intent.objects.create(**parsed.model_fields())
    except IntegrityError:
        # Another process stored the same intent between our read and our insert.
        return Intent.objects.get(hash=parsed.hash)
