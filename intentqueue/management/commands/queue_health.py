"""``manage.py queue_health``: the queues' health as JSON; exit status 1 when unhealthy."""

from __future__ import annotations

import json
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from intentqueue.health import check_health


class Command(BaseCommand):
    help = "Print queue health as JSON (exit 0 healthy, 1 unhealthy): for scripts and cron."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--full", action="store_true", help="Include the per-minute history.")

    def handle(self, *args: Any, full: bool = False, **options: Any) -> None:
        health = check_health()
        if not full:
            for metrics in health["queues"].values():
                metrics.pop("per_minute", None)
        self.stdout.write(json.dumps(health, indent=2, default=str))
        if not health["is_healthy"]:
            sys.exit(1)
