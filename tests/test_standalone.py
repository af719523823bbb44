"""``manage.py standalone --demo N`` on a machine with nothing configured: embedded Valkey,
SQLite, dev chains and workers come up, the demo intents end FULFILLED on the dev chain,
SIGTERM stops everything, and a second start reuses what the first set up."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(var: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATABASE_URL"}}
    env.pop("INTENTQUEUE_EMBEDDED_REDIS", None)
    env.update(DEBUG="1", INTENTQUEUE_VAR_DIR=str(var), DJANGO_SETTINGS_MODULE="project.settings")
    return subprocess.Popen(
        [sys.executable, "manage.py", "standalone", "--addrport", f"127.0.0.1:{port}",
         "--fulfillment-workers", "1", "--execution-workers", "2", *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def read_until(proc: subprocess.Popen[str], marker: str, timeout: float = 120) -> str:
    assert proc.stdout is not None
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"{marker!r} not printed:\n{''.join(seen)}")


def statuses(var: Path) -> dict[str, int]:
    with sqlite3.connect(var / "intentqueue.sqlite3", timeout=30) as db:
        return dict(db.execute("select status, count(*) from intentqueue_intent group by status"))


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=90)


def test_standalone_demo_end_to_end(tmp_path: Path) -> None:
    port = free_port()
    proc = start(tmp_path, port, "--demo", "4")
    try:
        banner = read_until(proc, "stop      Ctrl-C")
        assert "4 demo intents submitted (4 funded on the source chain)" in banner
        assert "embedded Valkey" in banner and "31338 (destination)" in banner
        assert f"http://127.0.0.1:{port}/admin/" in banner
        deadline = time.monotonic() + 120
        while statuses(tmp_path).get("FULFILLED") != 4 and time.monotonic() < deadline:
            time.sleep(1)
        assert statuses(tmp_path) == {"FULFILLED": 4}
    finally:
        stop(proc)
    assert proc.returncode == 0
    assert not (tmp_path / "valkey" / "server.json").exists()  # the embedded Valkey stopped
    leftovers = subprocess.run(
        ["pgrep", "-f", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout == ""  # no worker, chain or Valkey left behind

    again = start(tmp_path, port)
    try:
        banner = read_until(again, "stop      Ctrl-C")
        assert "unchanged" in banner or "admin-password" in banner  # the admin is reused
    finally:
        stop(again)
    assert statuses(tmp_path) == {"FULFILLED": 4}  # the database survived the restart
