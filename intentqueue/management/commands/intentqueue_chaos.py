"""``manage.py intentqueue_chaos``: intents on two anvil chains while workers are killed
and Redis loses every job; see ``intentqueue.chaos``.

Runs in a scratch copy of the configured database (created and dropped here), with its
own Redis server and chains. Exits non-zero when an intent is lost or fulfilled twice.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from intentqueue.bench import results_dir, scratch_database, write_result
from intentqueue.chaos import ChaosRun, anvil_available


class Command(BaseCommand):
    help = (
        "Chaos run: N intents on anvil while workers are SIGKILLed and Redis restarts "
        "empty; prints the figures and writes var/bench/chaos.json."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--intents", type=int, default=1000)
        parser.add_argument(
            "--kill-every", type=float, default=2.0,
            help="Seconds between two SIGKILLs of a random worker (0: none).",
        )  # fmt: skip
        parser.add_argument("--fulfillment-workers", type=int, default=2)
        parser.add_argument("--execution-workers", type=int, default=3)
        parser.add_argument(
            "--timeout", type=float, default=900, help="Seconds to wait for the drain."
        )
        parser.add_argument(
            "--no-redis-restart", action="store_true", help="Keep Redis up during the run."
        )
        parser.add_argument(
            "--kill-process-only", action="store_true",
            help="SIGKILL only the worker process, not its whole process group.",
        )  # fmt: skip
        parser.add_argument(
            "--confirmations", type=int, default=None,
            help="Confirmations awaited on the destination chain (the chain's default: 2).",
        )  # fmt: skip
        parser.add_argument("--seed", type=int, default=None)
        parser.add_argument("--output", default=None, help="Directory for chaos.json (var/bench).")

    def handle(self, *args: Any, **options: Any) -> None:
        if not anvil_available():
            raise CommandError("anvil is not installed in node_modules/.bin (run `npm ci`)")
        output = results_dir(options["output"])
        with scratch_database("chaos"):
            run = ChaosRun(
                intents=options["intents"],
                kill_every=options["kill_every"],
                fulfillment_workers=options["fulfillment_workers"],
                execution_workers=options["execution_workers"],
                timeout=options["timeout"],
                restart_redis_at=None if options["no_redis_restart"] else 1 / 3,
                log_dir=output / "chaos-logs",
                out=self.stderr,
                seed=options["seed"],
                kill_group=not options["kill_process_only"],
                confirmations=options["confirmations"],
            )
            report = run.run()
        result = report.result()
        self.stdout.write(result.table())
        self.stdout.write(f"results in {write_result(result, output)}")
        if not report.ok:
            raise CommandError(
                f"{report.lost} intents lost, {len(report.duplicates)} fulfilled twice"
            )
