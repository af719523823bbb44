"""A function no worker may ever run: if it does, it leaves a marker file behind.

Adversarial tests name it as a job's function or callback and assert the marker does not
exist afterwards. The marker's location comes from ``INTENTQUEUE_EVIL_MARKER``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MARKER_ENV = "INTENTQUEUE_EVIL_MARKER"


def marker_path() -> Path | None:
    """Where ``touch_marker`` writes, or None when no test asked for a marker."""
    value = os.environ.get(MARKER_ENV)
    return Path(value) if value else None


def touch_marker(*args: Any, **kwargs: Any) -> str:
    """Record that this ran (the test fails if the marker exists)."""
    path = marker_path() or Path("/tmp/intentqueue-evil-marker")
    with path.open("a") as f:
        f.write(f"ran with {len(args)} args\n")
    return "ran"
