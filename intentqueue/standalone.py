"""Everything on one machine with one command (``manage.py standalone``, ``make run``).

Starts what is not configured otherwise: the embedded Valkey (already running when the
settings were loaded without ``REDIS_URL``), migrations, an admin user, and the web server.
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command


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
    secret_file.write_text(password + "\n")
    secret_file.chmod(0o600)
    return AdminLogin(username, f"{password}  (also in {secret_file})")


class Standalone:
    """Bring the deployment up on one machine and serve until interrupted."""

    def __init__(self, addrport: str = "127.0.0.1:8000", out: Writer = sys.stdout) -> None:
        self.addrport = addrport
        self.out = out

    def progress(self, message: str) -> None:
        """One progress line while starting."""
        self.out.write(f"… {message}\n")
        self.out.flush()

    def prepare(self) -> AdminLogin:
        """Migrate and make sure an admin can log in."""
        self.progress("migrating the database")
        call_command("migrate", interactive=False, verbosity=0)
        self.progress("checking the admin user")
        return ensure_admin_user(
            Path(settings.VAR_DIR), password=os.environ.get("ADMIN_PASSWORD") or None
        )

    def status_block(self, login: AdminLogin) -> str:
        """What is running and how to reach it."""
        embedded = (
            " (embedded Valkey, data in var/valkey)"
            if os.environ.get("INTENTQUEUE_EMBEDDED_REDIS")
            else ""
        )
        database = settings.DATABASES["default"]
        return "\n".join(
            [
                "intentqueue is up",
                f"  admin     http://{self.addrport}/admin/",
                f"  login     {login.username} / {login.password_note}",
                f"  redis     {_safe_url(settings.REDIS_URL)}{embedded}",
                f"  database  {database['ENGINE'].rsplit('.', 1)[-1]} {database['NAME']}",
                "  stop      Ctrl-C",
                "",
            ]
        )

    def run(self) -> None:
        """Prepare, print the status block, serve until Ctrl-C or SIGTERM."""
        login = self.prepare()
        self.out.write(self.status_block(login))
        self.out.flush()
        call_command("runserver", self.addrport, use_reloader=False, skip_checks=True)


def _safe_url(url: str) -> str:
    """``url`` without its password."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.password:
        netloc = f"{parsed.username or ''}:***@{parsed.hostname}:{parsed.port}"
        return parsed._replace(netloc=netloc).geturl()
    return url
