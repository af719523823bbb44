"""The deployment's settings and the embedded Valkey, run as separate processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent


def manage(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATABASE_URL"}}
    env.pop("INTENTQUEUE_EMBEDDED_REDIS", None)
    env.update(INTENTQUEUE_VAR_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="project.settings")
    env.update(extra)
    return env


def test_secret_key_required_without_debug(tmp_path: Path) -> None:
    env = clean_env(tmp_path, DEBUG="0", REDIS_URL="redis://127.0.0.1:1/0")
    env.pop("SECRET_KEY", None)
    result = manage("check", env=env)
    assert result.returncode != 0
    assert "SECRET_KEY is not set" in result.stderr


def test_bad_redis_url_is_a_clear_error(tmp_path: Path) -> None:
    env = clean_env(tmp_path, DEBUG="1", REDIS_URL="localhost:6379")
    result = manage("check", env=env)
    assert result.returncode != 0 and "REDIS_URL='localhost:6379'" in result.stderr


def test_embedded_valkey_started_shared_and_stopped(tmp_path: Path) -> None:
    env = clean_env(tmp_path, DEBUG="1")
    script = (
        "import os, redis; from django.conf import settings; "
        "r = redis.Redis.from_url(settings.REDIS_URL); r.set('k', 'v'); print(settings.REDIS_URL)"
    )
    first = manage("shell", "-c", script, env=env)
    assert first.returncode == 0, first.stderr
    url = first.stdout.strip().splitlines()[-1]
    assert url.startswith("redis://127.0.0.1:")
    # Stopped with the process that started it, data kept on disk under the var dir.
    assert not (tmp_path / "valkey" / "server.json").exists()
    assert (tmp_path / "valkey" / "appendonlydir").is_dir()

    # A long-running owner: a second process shares its server instead of starting one.
    owner = subprocess.Popen(
        [sys.executable, "manage.py", "shell", "-c", "import time; time.sleep(60)"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        state = tmp_path / "valkey" / "server.json"
        deadline = time.monotonic() + 30
        while not state.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert state.exists()
        second = manage("shell", "-c", script.replace("r.set('k', 'v'); ", ""), env=env)
        shared_url = second.stdout.strip().splitlines()[-1]
        assert redis.Redis.from_url(shared_url).get("k") == b"v"  # the data survived restart
        assert state.exists()  # the second process did not stop the owner's server
    finally:
        owner.send_signal(signal.SIGTERM)
        owner.wait(timeout=30)
    assert not state.exists()
    assert (
        subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, check=False).returncode
        == 1
    )
