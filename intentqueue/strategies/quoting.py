"""Quotes: "would the solver fulfil this intent, and at what fee?", before it exists.

``quote_payload(payload)`` parses an intent payload (the shape ``submit_intent`` takes),
builds the intent in memory (nothing is saved, nothing is queued) and asks its strategy
for a ``Quote``: the fee breakdown plus the issues of the quote-mode validations. With
``on_chain=True`` (the default) those include the on-chain reads (the solver's balance,
the destination's portal); the funding check is skipped, as a quote comes before
funding. Quotes only read chains: no transaction is ever signed or sent.
"""

from __future__ import annotations

from typing import Any

from intentqueue.conf import intentqueue_settings
from intentqueue.models import Intent
from intentqueue.payloads import parse_intent_payload
from intentqueue.strategies.base import Quote
from intentqueue.strategies.registry import get_strategy


def quote_payload(payload: Any, strategy: str | None = None, *, on_chain: bool = True) -> Quote:
    """The quote of an intent payload by ``strategy`` (the payload's, else the default).

    Raises ``InvalidPayloadError`` for a bad payload, ``UnknownStrategyError`` for a
    strategy that is not enabled, and ``NetworkError`` when a chain cannot be reached.
    """
    parsed = parse_intent_payload(payload)
    intent = Intent(**parsed.model_fields())
    name = strategy or parsed.strategy or intentqueue_settings.default_strategy
    return get_strategy(name).quote(intent, on_chain=on_chain)
