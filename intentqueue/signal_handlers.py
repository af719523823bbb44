"""Signal receivers, connected when the app is ready."""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_migrate
from django.dispatch import receiver


@receiver(post_migrate)
def enable_sqlite_wal(sender: Any, using: str = "default", **kwargs: Any) -> None:
    """Switch a SQLite database to WAL once, after migrating.

    WAL lets readers and a writer work at once (web server and workers). It is a
    property of the file, so it is set here and not on every connection: two processes
    switching at the same moment fail with "database is locked".
    """
    from django.db import connections

    conn = connections[using]
    if conn.vendor == "sqlite" and not conn.is_in_memory_db():  # type: ignore[attr-defined]
        with conn.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode=WAL")
