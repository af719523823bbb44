"""Context for log lines written while a job runs: intent hash, correlation id, job id,
trace id. ``JobLogFilter`` adds them to every record (as attributes, so a JSON formatter
writes them as fields and a plain one can name them in its format)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from intentqueue.tracing import current_trace_id

FIELDS = ("intent_hash", "correlation_id", "job_id", "queue")
_context: ContextVar[dict[str, str] | None] = ContextVar("intentqueue_log_context", default=None)


@contextmanager
def log_context(**values: str | None) -> Iterator[None]:
    """Add ``values`` to the log context for the duration of the block."""
    merged = {**(_context.get() or {}), **{k: v for k, v in values.items() if v}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


def bind(**values: str | None) -> None:
    """Add ``values`` to the current log context (inside a ``log_context`` block)."""
    current = _context.get()
    if current is not None:
        current.update({k: v for k, v in values.items() if v})


class JobLogFilter(logging.Filter):
    """Puts the job context and the current trace id on every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        values = _context.get() or {}
        for name in FIELDS:
            setattr(record, name, values.get(name, ""))
        record.trace_id = current_trace_id()
        return True
