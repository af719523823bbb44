"""``manage.py intentqueue_bench [scenario ...]``: measure what intentqueue promises.

Runs in a scratch copy of the configured database (created and dropped here) and its own
Redis database index; see ``intentqueue.bench`` for the scenarios. With no scenario
named, runs them all (``execution`` only where anvil is installed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from intentqueue.anvil import anvil_available
from intentqueue.bench import SCENARIOS, Bench, results_dir, scratch_database, write_result


class Command(BaseCommand):
    help = "Run benchmark scenarios; print a table each and write var/bench/<scenario>.json."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "scenarios", nargs="*", default=[],
            help=f"Scenarios to run, of: {', '.join(SCENARIOS)} (default: all).",
        )  # fmt: skip
        parser.add_argument(
            "--intents", type=int, default=None,
            help="Intents per scenario (defaults: pipeline 2,000, execution 1,000, admin "
            "1,000,000, ...).",
        )  # fmt: skip
        parser.add_argument(
            "--failed-jobs", type=int, default=None,
            help="admin: failed jobs in the dead-letter queue (default 100,000).",
        )  # fmt: skip
        parser.add_argument(
            "--workers", type=int, default=None,
            help="execution: execution worker processes (default 5).",
        )  # fmt: skip
        parser.add_argument(
            "--profile", action="store_true",
            help="execution: run the first worker under cProfile and sum up its time.",
        )  # fmt: skip
        parser.add_argument("--redis-db", type=int, default=13, help="Scratch Redis db index.")
        parser.add_argument(
            "--output", default=None, help="Directory for the JSON files (var/bench)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        names = list(options["scenarios"]) or list(SCENARIOS)
        unknown = set(names) - set(SCENARIOS)
        if unknown:
            raise CommandError(f"unknown scenarios {sorted(unknown)}; known: {list(SCENARIOS)}")
        if "execution" in names and not anvil_available():
            if options["scenarios"]:
                raise CommandError("execution needs anvil in node_modules/.bin (run `npm ci`)")
            self.stderr.write("skipping execution: anvil is not installed (run `npm ci`)")
            names.remove("execution")
        output = results_dir(options["output"])
        with scratch_database("bench"):
            bench = Bench(redis_db=options["redis_db"], out=self.stderr)
            try:
                for name in names:
                    kwargs = _scenario_options(name, options, output)
                    result = getattr(bench, SCENARIOS[name])(**kwargs)
                    self.stdout.write(result.table())
                    write_result(result, output)
            finally:
                bench.reset()
        self.stdout.write(f"results in {output}")


def _scenario_options(name: str, options: dict[str, Any], output: Path) -> dict[str, Any]:
    """The keyword arguments of scenario ``name`` from the command's options."""
    kwargs: dict[str, Any] = {}
    if options["intents"]:
        kwargs["count"] = options["intents"]
    if name == "admin" and options["failed_jobs"] is not None:
        kwargs["failed_jobs"] = options["failed_jobs"]
    if name == "execution":
        if options["workers"]:
            kwargs["workers"] = options["workers"]
        if options["profile"]:
            kwargs["profile"] = output
    return kwargs
