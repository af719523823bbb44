"""``manage.py standalone``: the whole deployment on one machine (what ``make run`` runs)."""

from __future__ import annotations

import os
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from intentqueue.standalone import Standalone


class Command(BaseCommand):
    help = "Start everything needed on this machine and serve the admin until Ctrl-C."
    requires_system_checks = "__all__"

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--addrport",
            default=os.environ.get("LISTEN", "127.0.0.1:8000"),
            help="Where the web server listens (default 127.0.0.1:8000, or $LISTEN).",
        )

    def handle(self, *args: Any, addrport: str, **options: Any) -> None:
        Standalone(addrport=addrport, out=self.stdout).run()
