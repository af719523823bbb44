"""Everything on one machine with one command (``manage.py standalone``, ``make run``).

Starts, each only if it is not configured otherwise: the embedded Valkey (already running
when the settings were loaded without ``REDIS_URL``), the migrations, an admin user, the
dev chains with our contracts deployed and the solver funded, worker processes for both
queues at their configured concurrency (delayed retries included), and the web server.
Ctrl-C or SIGTERM stops all of it: workers finish their current job first.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command

from intentqueue.conf import intentqueue_settings
from intentqueue.supervisor import WorkerSupervisor

#: The dev chains: a source chain and a destination chain.
DEV_CHAIN_IDS = (31337, 31338)
#: Environment variable naming the dev chain state file (read by ``intentqueue.chain``).
DEVCHAIN_STATE_ENV = "INTENTQUEUE_DEVCHAIN_STATE"


class Writer(Protocol):
    """Where progress and status go (a stream, or a command's stdout)."""

    def write(self, text: str, /) -> Any: ...
    def flush(self) -> Any: ...


@dataclass
class AdminLogin:
    """The admin user's name and where its password can be found."""

    username: str
    password_note: str


def ensure_admin_user(
    var_dir: Path, username: str = "admin", password: str | None = None
) -> AdminLogin:
    """Create the superuser ``username`` unless it exists.

    The password is ``password`` (from ``ADMIN_PASSWORD``) or a generated one, which is
    written once to ``var/admin-password`` (readable by the owner only).
    """
    users = get_user_model()
    secret_file = var_dir / "admin-password"
    if users.objects.filter(username=username).exists():
        if password is None and secret_file.exists():
            return AdminLogin(username, f"in {secret_file}")
        return AdminLogin(username, "unchanged (manage.py changepassword to reset)")
    generated = password is None
    password = password or secrets.token_urlsafe(12)
    users.objects.create_superuser(username=username, email="", password=password)
    if not generated:
        return AdminLogin(username, "from ADMIN_PASSWORD")
    _write_secret(secret_file, password)
    return AdminLogin(username, f"{password}  (also in {secret_file})")


def ensure_dev_solver_key(var_dir: Path) -> str:
    """The solver's key file for the dev chains: ``var/solver-key``, made once.

    Sets ``SOLVER_PRIVATE_KEY_FILE`` for this process and the workers it starts; returns
    the solver's address (the key itself stays in the file).
    """
    from eth_account import Account

    key_file = var_dir / "solver-key"
    if not key_file.exists():
        _write_secret(key_file, "0x" + secrets.token_hex(32))
    os.environ["SOLVER_PRIVATE_KEY_FILE"] = str(key_file)
    return str(Account.from_key(key_file.read_text().strip()).address)


def _write_secret(path: Path, value: str) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(value + "\n")


def chains_configured() -> bool:
    """Whether real chains are configured (settings or ``CHAIN_<id>_RPC_URL``)."""
    if intentqueue_settings.chains:
        return True
    return any(k.startswith("CHAIN_") and k.endswith("_RPC_URL") for k in os.environ)


class Standalone:
    """Bring the deployment up on one machine and serve until interrupted."""

    def __init__(
        self,
        addrport: str = "127.0.0.1:8000",
        out: Writer = sys.stdout,
        *,
        workers: dict[str, int] | None = None,
        block_time: float = 1.0,
        demo: int = 0,
    ) -> None:
        self.addrport = addrport
        self.out = out
        self.var_dir = Path(settings.VAR_DIR)
        self.worker_counts = workers
        self.block_time = block_time
        self.demo = demo
        self.devchains: Any = None
        self.supervisor: WorkerSupervisor | None = None
        self.chain_lines: list[str] = []

    def progress(self, message: str) -> None:
        """One progress line while starting."""
        self.out.write(f"… {message}\n")
        self.out.flush()

    def prepare(self) -> AdminLogin:
        """Migrate and make sure an admin can log in."""
        self.progress("migrating the database")
        call_command("migrate", interactive=False, verbosity=0)
        self.progress("checking the admin user")
        return ensure_admin_user(self.var_dir, password=os.environ.get("ADMIN_PASSWORD") or None)

    def start_chains(self) -> None:
        """Serve the dev chains unless chains are configured."""
        if chains_configured():
            self.chain_lines = ["configured (INTENTQUEUE['chains'] / CHAIN_<id>_RPC_URL)"]
            return
        from intentqueue.chain.devchain import DevChainSet

        if not (os.environ.get("SOLVER_PRIVATE_KEY") or os.environ.get("SOLVER_PRIVATE_KEY_FILE")):
            solver = ensure_dev_solver_key(self.var_dir)
        else:
            from intentqueue.chain.wallets import solver_address

            solver = solver_address()
        self.progress("starting the dev chains, deploying the contracts, funding the solver")
        self.devchains = DevChainSet(
            solver_address=solver, chain_ids=DEV_CHAIN_IDS, block_time=self.block_time
        )
        state = self.devchains.start()
        state_file = self.var_dir / "devchain.json"
        state.write(state_file)
        os.environ[DEVCHAIN_STATE_ENV] = str(state_file)
        for info in state.chains.values():
            self.chain_lines.append(
                f"{info.chain_id} ({info.role}) {info.rpc_url} portal {info.portal}"
            )
        self.chain_lines.append(f"solver {solver} (key in {self.var_dir / 'solver-key'})")

    def start_workers(self) -> None:
        """Worker processes for both queues, at the configured concurrency."""
        counts = self.worker_counts or {
            intentqueue_settings.queue(key).name: intentqueue_settings.queue(key).concurrency
            for key in ("fulfillment", "execution")
        }
        self.progress(f"starting {sum(counts.values())} worker processes")
        self.supervisor = WorkerSupervisor(
            counts,
            manage_py=Path(settings.BASE_DIR) / "manage.py",
            log_dir=self.var_dir / "logs",
        )
        self.supervisor.start()

    def status_block(self, login: AdminLogin) -> str:
        """What is running and how to reach it."""
        embedded = (
            " (embedded Valkey, data in var/valkey)"
            if os.environ.get("INTENTQUEUE_EMBEDDED_REDIS")
            else ""
        )
        database = settings.DATABASES["default"]
        workers = ", ".join(f"{n} x {q}" for q, n in (self._counts() or {}).items())
        lines = [
            "intentqueue is up",
            f"  admin     http://{self.addrport}/admin/",
            f"  login     {login.username} / {login.password_note}",
            f"  redis     {_safe_url(settings.REDIS_URL)}{embedded}",
            f"  database  {database['ENGINE'].rsplit('.', 1)[-1]} {database['NAME']}",
        ]
        lines += [f"  chain     {line}" for line in self.chain_lines]
        lines += [
            f"  workers   {workers} (logs in {self.var_dir / 'logs'})",
            "  stop      Ctrl-C",
            "",
        ]
        return "\n".join(lines)

    def _counts(self) -> dict[str, int]:
        if self.supervisor is None:
            return {}
        counts: dict[str, int] = {}
        for worker in self.supervisor.workers:
            counts[worker.queue] = counts.get(worker.queue, 0) + 1
        return counts

    def run(self) -> None:
        """Start everything, print the status block, serve until Ctrl-C or SIGTERM."""
        previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            login = self.prepare()
            self.start_chains()
            self.start_workers()
            if self.demo:
                from intentqueue.demo import publish_demo_intents

                self.progress(f"publishing and funding {self.demo} demo intents")
                publish_demo_intents(self.var_dir / "devchain.json", self.demo, out=self.out)
            self.out.write(self.status_block(login))
            self.out.flush()
            call_command("runserver", self.addrport, use_reloader=False, skip_checks=True)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
            signal.signal(signal.SIGTERM, previous)

    def stop(self) -> None:
        """Stop the workers (each finishes its job), then the chains."""
        if self.supervisor is not None:
            self.progress("stopping the workers (each finishes its current job)")
            self.supervisor.stop()
        if self.devchains is not None:
            self.progress("stopping the dev chains")
            with contextlib.suppress(Exception):
                self.devchains.stop()
            (self.var_dir / "devchain.json").unlink(missing_ok=True)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM stops gracefully, like Ctrl-C


def _safe_url(url: str) -> str:
    """``url`` without its password."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.password:
        netloc = f"{parsed.username or ''}:***@{parsed.hostname}:{parsed.port}"
        return parsed._replace(netloc=netloc).geturl()
    return url
