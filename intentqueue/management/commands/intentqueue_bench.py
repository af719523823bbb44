"""``manage.py intentqueue_bench [scenario ...]``: measure what intentqueue promises.

Runs in a scratch copy of the configured database (created and dropped here) and its own
Redis database index; see ``intentqueue.bench`` for the scenarios.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection

from intentqueue.bench import SCENARIOS, Bench


class Command(BaseCommand):
    help = "Run benchmark scenarios; print a table each and write var/bench/<scenario>.json."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "scenarios", nargs="*", default=["latency", "ingest", "memory", "pipeline"],
            help=f"Scenarios to run, of: {', '.join(SCENARIOS)}.",
        )  # fmt: skip
        parser.add_argument("--intents", type=int, default=None, help="Intents per scenario.")
        parser.add_argument("--redis-db", type=int, default=13, help="Scratch Redis db index.")
        parser.add_argument(
            "--output", default=None, help="Directory for the JSON files (var/bench)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        unknown = set(options["scenarios"]) - set(SCENARIOS)
        if unknown:
            raise CommandError(f"unknown scenarios {sorted(unknown)}; known: {list(SCENARIOS)}")
        output = Path(options["output"] or Path(settings.VAR_DIR) / "bench")
        output.mkdir(parents=True, exist_ok=True)
        if connection.vendor == "sqlite":  # a file, so worker processes share it
            test = settings.DATABASES["default"].setdefault("TEST", {})
            test["NAME"] = str(Path(settings.VAR_DIR) / "bench.sqlite3")
        old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True)
        bench = Bench(redis_db=options["redis_db"], out=self.stderr)
        try:
            for name in options["scenarios"]:
                kwargs = {"count": options["intents"]} if options["intents"] else {}
                result = getattr(bench, SCENARIOS[name])(**kwargs)
                self.stdout.write(result.table())
                (output / f"{name}.json").write_text(json.dumps(result.data, indent=2, default=str))
        finally:
            bench.reset()
            connection.creation.destroy_test_db(old_name, verbosity=0)
        self.stdout.write(f"results in {output}")
