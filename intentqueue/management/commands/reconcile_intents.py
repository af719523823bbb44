"""``manage.py reconcile_intents``: give every intent that should have a job a job."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from intentqueue.reconcile import Reconciler


class Command(BaseCommand):
    help = "Queue every intent whose status says it should have a job but has none."

    def handle(self, *args: Any, **options: Any) -> None:
        report = Reconciler().run()
        self.stdout.write(
            f"checked {report.checked} intents: queued {report.enqueued}, "
            f"marked failed {report.marked_failed}"
        )
