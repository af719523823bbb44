"""``manage.py devchain``: embedded source and destination chains over JSON-RPC HTTP.

Starts one py-evm chain per chain id (chain i on port ``--port-base + i``), deploys the
Portal and TestToken on each, funds the solver's address, writes the state file and serves
until SIGINT/SIGTERM. The chains live in memory: a restart starts them fresh (the contract
addresses come out the same). The state file is removed on exit unless
``--keep-state-file`` is given, so its presence means the chains are running.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from intentqueue.chain.devchain import DEFAULT_CHAIN_IDS, DEFAULT_HOST, run_devchains

SOLVER_KEY_ENV = "SOLVER_PRIVATE_KEY"


def _chain_ids(value: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        message = f"expected comma-separated integers, got {value!r}"
        raise argparse.ArgumentTypeError(message) from None
    if len(ids) < 2 or len(set(ids)) != len(ids) or min(ids) < 1:
        raise argparse.ArgumentTypeError("need at least two distinct positive chain ids")
    return ids


def _block_time(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("block time must be positive")
    return seconds


def solver_address_from_env() -> str | None:
    """The address of ``SOLVER_PRIVATE_KEY``, if that is set (the key itself is not kept)."""
    key = os.environ.get(SOLVER_KEY_ENV, "").strip()
    if not key:
        return None
    from eth_account import Account

    try:
        return str(Account.from_key(key).address)
    except (ValueError, TypeError) as exc:
        raise CommandError(f"{SOLVER_KEY_ENV} is not a valid private key: {exc}") from None


class Command(BaseCommand):
    help = (
        "Run embedded dev chains (source and destination) over JSON-RPC HTTP with the Portal "
        "and TestToken deployed and the solver funded, until interrupted."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--chain-ids",
            type=_chain_ids,
            default=DEFAULT_CHAIN_IDS,
            help="comma-separated chain ids; the first is the source chain (default: "
            + ",".join(map(str, DEFAULT_CHAIN_IDS))
            + ")",
        )
        parser.add_argument(
            "--port-base",
            type=int,
            default=8545,
            help="chain i listens on port-base + i; 0 picks free ports (default: 8545)",
        )
        parser.add_argument("--host", default=DEFAULT_HOST, help="interface (default: %(default)s)")
        parser.add_argument(
            "--block-time",
            type=_block_time,
            default=None,
            metavar="SECONDS",
            help="mine a block every SECONDS; default: one block per transaction",
        )
        parser.add_argument(
            "--solver-address",
            default=None,
            help=f"address to fund (default: the address of ${SOLVER_KEY_ENV})",
        )
        parser.add_argument(
            "--state-file",
            type=Path,
            default=None,
            help="where to write the chains' JSON description (default: VAR_DIR/devchain.json)",
        )
        parser.add_argument(
            "--keep-state-file",
            action="store_true",
            help="leave the state file in place on exit",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        solver = options["solver_address"] or solver_address_from_env()
        if not solver:
            raise CommandError(
                f"no solver address: pass --solver-address 0x... or set {SOLVER_KEY_ENV}"
            )
        state_file: Path = options["state_file"] or Path(settings.VAR_DIR) / "devchain.json"
        chain_ids: tuple[int, ...] = options["chain_ids"]
        port_base: int = options["port_base"]
        if port_base < 0 or port_base + len(chain_ids) > 65536:
            raise CommandError(f"--port-base {port_base}: ports out of range")
        ports = None if port_base == 0 else [port_base + i for i in range(len(chain_ids))]

        stop = threading.Event()
        previous = {
            signum: signal.signal(signum, lambda *_: stop.set())
            for signum in (signal.SIGINT, signal.SIGTERM)
        }
        chains = None
        try:
            try:
                chains = run_devchains(
                    chain_ids,
                    ports,
                    options["block_time"],
                    solver_address=solver,
                    state_file=state_file,
                    host=options["host"],
                )
            except (OSError, ValueError, RuntimeError) as exc:
                raise CommandError(f"could not start the dev chains: {exc}") from exc
            state = chains.state
            assert state is not None
            for info in state.chains.values():
                self.stdout.write(
                    f"chain {info.chain_id} ({info.role}): {info.rpc_url} "
                    f"portal={info.portal} token={info.token}"
                )
            self.stdout.write(
                f"solver {state.solver} funded; funder {state.funder.address}; "
                f"state file {state_file}. Ctrl-C to stop."
            )
            self.stdout.flush()
            while not stop.wait(0.5):
                pass
            self.stdout.write("stopping dev chains")
        finally:
            if chains is not None:
                chains.stop()
                if not options["keep_state_file"]:
                    state_file.unlink(missing_ok=True)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
