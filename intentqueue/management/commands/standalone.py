"""``manage.py standalone``: the whole deployment on one machine (what ``make run`` runs)."""

from __future__ import annotations

import os
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from intentqueue.conf import intentqueue_settings
from intentqueue.standalone import Standalone


class Command(BaseCommand):
    help = (
        "Start what this machine needs (Redis, database, dev chains, workers, web server) "
        "and serve the admin until Ctrl-C."
    )
    requires_system_checks = "__all__"

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--addrport",
            default=os.environ.get("LISTEN", "127.0.0.1:8000"),
            help="Where the web server listens (default 127.0.0.1:8000, or $LISTEN).",
        )
        parser.add_argument(
            "--demo", type=int, default=0, metavar="N",
            help="Publish and fund N intents on the source dev chain and submit them.",
        )  # fmt: skip
        parser.add_argument(
            "--fulfillment-workers", type=int, default=None, metavar="N",
            help="Fulfillment worker processes (default: queues.fulfillment.concurrency).",
        )  # fmt: skip
        parser.add_argument(
            "--execution-workers", type=int, default=None, metavar="N",
            help="Execution worker processes (default: queues.execution.concurrency).",
        )  # fmt: skip
        parser.add_argument(
            "--block-time", type=float, default=1.0,
            help="Seconds between dev chain blocks (default 1).",
        )  # fmt: skip

    def handle(self, *args: Any, **options: Any) -> None:
        fulfillment = intentqueue_settings.queue("fulfillment")
        execution = intentqueue_settings.queue("execution")
        workers = {
            fulfillment.name: options["fulfillment_workers"] or fulfillment.concurrency,
            execution.name: options["execution_workers"] or execution.concurrency,
        }
        Standalone(
            addrport=options["addrport"],
            out=self.stdout,
            workers=workers,
            block_time=options["block_time"],
            demo=options["demo"],
        ).run()
