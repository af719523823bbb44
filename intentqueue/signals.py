"""Signals sent by intentqueue (receivers live in ``signal_handlers``)."""

from django.dispatch import Signal

#: Sent after an intent changed status; ``sender`` is ``Intent``, with ``intent`` and
#: ``transition`` (the ``IntentTransition`` row) as arguments.
intent_status_changed = Signal()
