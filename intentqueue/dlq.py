"""The dead-letter queue grouped by failure fingerprint, kept fast with 100,000s of jobs.

A stage's dead-letter queue is the union of RQ's failed registries of its priority queues
(``rq:failed:<band>``). Operators want it grouped: one row per kind of failure, with a
count and when it was first and last seen. A fingerprint is the exception class plus its
message with the variable parts (numbers, hex strings, addresses, uuids, times) replaced,
so "timeout after 3012 ms on 0xab12…" and "timeout after 187 ms on 0x9f00…" are one group.

Reading every failed job on every page view does not scale, so the grouping is an index
in Redis, next to RQ's keys, brought up to date lazily by ``DeadLetterIndex.sync()``:

- ``intentqueue:dlq:<stage>:idx:<band>``  zset job id -> its score in the failed registry
  (what was indexed; compared with the registry to find new, changed and removed jobs);
- ``intentqueue:dlq:<stage>:fp``          hash job id -> fingerprint;
- ``intentqueue:dlq:<stage>:g:<fp>``      zset job id -> failed-at (unix seconds);
- ``intentqueue:dlq:<stage>:all``         zset job id -> failed-at, every indexed job;
- ``intentqueue:dlq:<stage>:counts``      zset fingerprint -> number of jobs;
- ``intentqueue:dlq:<stage>:info``        hash fingerprint -> JSON (class, message, example).

A sync first compares a cheap signature of each registry (size, lowest and highest
score: one round trip); only registries that changed are diffed, on the server
(``ZDIFF``), and only new or re-failed jobs are read and fingerprinted, oldest first, for
at most ``budget`` seconds. Whatever is left is picked up by the next sync, so a first
look at a huge dead-letter queue fills the index over a few calls instead of one slow
one. Every few minutes a full check also catches re-failures the signature cannot see.
The index never changes RQ's keys and never triggers RQ's registry cleanup.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
import zlib
from base64 import b64decode
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from redis.exceptions import LockError

from intentqueue.queues import KEY_PREFIX, Stage, stage

#: Seconds between full checks (score changes the signature cannot reveal).
FULL_CHECK_INTERVAL = 300
#: Jobs read from Redis per round trip while indexing.
BATCH = 1000
#: New jobs a budgeted sync reads from Redis per second of budget (about what it can
#: fingerprint in that time), so it never fetches far more than it will index.
READ_PER_SECOND = 20_000
#: Newest registry entries compared by score on every sync (re-failed jobs land there).
RECENT_WINDOW = 500
#: Longest message kept as a group's example.
EXAMPLE_LENGTH = 500
#: Failure TTL assumed when a job's hash is gone (RQ's default, and ours).
DEFAULT_FAILURE_TTL = 365 * 24 * 3600

MISSING_CLASS = "(job data missing)"
UNKNOWN_CLASS = "(unknown)"

# Order matters: the specific shapes first, bare numbers last.
_NORMALISERS: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(
            r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.IGNORECASE
        ),
        "<uuid>",
    ),
    (
        re.compile(
            r"\b\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?",
        ),
        "<time>",
    ),
    (re.compile(r"\b0x[0-9a-f]{40}\b", re.IGNORECASE), "<address>"),
    (re.compile(r"\b0x[0-9a-f]+\b", re.IGNORECASE), "<hex>"),
    (re.compile(r"\b(?=[0-9a-f]*\d)[0-9a-f]{16,}\b", re.IGNORECASE), "<hex>"),
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b"), "<ip>"),
    (re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?\b", re.IGNORECASE), "<n>"),
]
_CLASS_PREFIX = re.compile(r"^([A-Za-z_][\w.]*)(?::\s*(.*))?$", re.DOTALL)


def normalise_message(message: str) -> str:
    """``message`` with its variable parts replaced by placeholders, whitespace squeezed."""
    text = " ".join(message.split())[:EXAMPLE_LENGTH]
    for pattern, placeholder in _NORMALISERS:
        text = pattern.sub(placeholder, text)
    return text


def split_error(text: str, default_class: str = UNKNOWN_CLASS) -> tuple[str, str]:
    """(exception class, message) of an ``"ErrorClass: message"`` line; the class is
    reduced to its last dotted part so tracebacks and job meta agree."""
    text = text.strip()
    match = _CLASS_PREFIX.match(text)
    if match and (match.group(2) is not None or "." in match.group(1) or text[:1].isupper()):
        return match.group(1).rsplit(".", 1)[-1], (match.group(2) or "").strip()
    return default_class, text


def last_traceback_line(exc_string: str) -> str:
    """The ``ErrorClass: message`` line that ends a formatted traceback."""
    lines = [line for line in exc_string.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    # A multi-line message continues below the "Class: message" line; take the first
    # line after the last frame instead.
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].startswith((" ", "\t")):
            return "\n".join(lines[index + 1 :]) or lines[-1]
    return lines[-1]


@dataclass(frozen=True)
class Failure:
    """Why a job is in the dead-letter queue."""

    exc_class: str
    message: str
    error_type: str = ""

    @property
    def normalised(self) -> str:
        return normalise_message(self.message)

    @property
    def fingerprint(self) -> str:
        """16 hex digits identifying (class, normalised message)."""
        raw = f"{self.exc_class}\n{self.normalised}".encode()
        return hashlib.sha1(raw, usedforsecurity=False).hexdigest()[:16]


def failure_of(meta: dict[str, Any] | None, exc_string: str | None = None) -> Failure:
    """The final failure of a job from its meta (``errors``, written by our failure
    handler) or, when that is missing or not final, RQ's traceback."""
    errors = (meta or {}).get("errors") or []
    last = errors[-1] if errors and isinstance(errors[-1], dict) else None
    if last is not None and (last.get("final") or not exc_string):
        error_type = str(last.get("type") or "")
        exc_class, message = split_error(str(last.get("message") or ""), error_type or "Error")
        return Failure(exc_class, message, error_type)
    if exc_string:
        exc_class, message = split_error(last_traceback_line(exc_string))
        return Failure(exc_class, message, (meta or {}).get("failure_reason", "") or "")
    return Failure(UNKNOWN_CLASS, "no error was recorded")


def decode_exc_string(raw: bytes | str | None) -> str:
    """The traceback text of a result-stream entry (base64 of zlib, as RQ writes it)."""
    if not raw:
        return ""
    try:
        return zlib.decompress(b64decode(raw)).decode("utf-8", "replace")
    except (ValueError, zlib.error):
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


def decode_job_data(raw: bytes | None) -> Any:
    """The job's arguments as stored by RQ's JSON serializer (``[func, instance, args,
    kwargs]``, zlib-compressed); ``None`` when unreadable."""
    if not raw:
        return None
    try:
        return json.loads(zlib.decompress(raw))
    except (ValueError, zlib.error):
        return None


def parse_rq_time(value: bytes | str | None) -> datetime | None:
    """An RQ timestamp (``2026-01-02T03:04:05.123456Z``) as an aware datetime."""
    if not value:
        return None
    text = value.decode() if isinstance(value, bytes) else value
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _pairs(raw: Sequence[Any]) -> list[tuple[str, float]]:
    """(member, score) pairs from a WITHSCORES reply, flat or nested."""
    if raw and isinstance(raw[0], list | tuple):
        return [(_text(m), float(s)) for m, s in raw]
    return [(_text(raw[i]), float(raw[i + 1])) for i in range(0, len(raw), 2)]


@dataclass(frozen=True)
class Group:
    """One kind of failure in a dead-letter queue."""

    fingerprint: str
    exc_class: str
    message: str
    example: str
    error_type: str
    count: int
    first_seen: datetime | None
    last_seen: datetime | None


@dataclass(frozen=True)
class SyncReport:
    """How up to date the index is after a sync."""

    indexed: int
    pending: int
    busy: bool = False

    @property
    def complete(self) -> bool:
        return self.pending == 0 and not self.busy

    @property
    def indexed_shown(self) -> str:
        return f"{self.indexed:,}"

    @property
    def pending_shown(self) -> str:
        return f"{self.pending:,}"


@dataclass
class FailedJobRow:
    """What a list of failed jobs shows about one job, read in one round trip per page."""

    job_id: str
    failed_at: datetime | None
    exists: bool = True
    origin: str = ""
    status: str = ""
    worker: str = ""
    attempts: int = 0
    failure: Failure = field(default_factory=lambda: Failure(UNKNOWN_CLASS, ""))
    intent_id: int | None = None
    intent_hash: str = ""
    #: The intent's admin page, filled in by the caller.
    intent_url: str = ""


_ROW_FIELDS = ("origin", "status", "worker_name", "meta", "data", "ended_at")


def load_rows(connection: Redis, scored_ids: Sequence[tuple[str, float]]) -> list[FailedJobRow]:
    """Rows for ``(job id, failed-at)`` pairs: one pipelined HMGET per job."""
    with connection.pipeline(transaction=False) as pipe:
        for job_id, _ in scored_ids:
            pipe.hmget(f"rq:job:{job_id}", _ROW_FIELDS)
        replies = pipe.execute()
    rows = []
    for (job_id, failed_at), values in zip(scored_ids, replies, strict=True):
        origin, status, worker, raw_meta, raw_data, _ended = values
        row = FailedJobRow(job_id, datetime.fromtimestamp(failed_at, tz=UTC) if failed_at else None)
        if origin is None and status is None:
            row.exists = False
            row.failure = Failure(MISSING_CLASS, "the job's data is no longer in Redis")
            rows.append(row)
            continue
        meta = _load_meta(raw_meta)
        row.origin, row.status, row.worker = _text(origin), _text(status), _text(worker)
        row.attempts = len(meta.get("errors") or [])
        row.failure = failure_of(meta)
        data = decode_job_data(raw_data)
        if isinstance(data, list) and len(data) >= 3 and data[2]:
            first = data[2][0] if isinstance(data[2], list) else None
            if isinstance(first, dict):
                intent_id = first.get("intentId")
                row.intent_id = intent_id if isinstance(intent_id, int) else None
                row.intent_hash = str(first.get("intentHash") or "")
        rows.append(row)
    return rows


def _load_meta(raw: bytes | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


class DeadLetterIndex:
    """The grouped view of one stage's dead-letter queue (see the module docstring)."""

    def __init__(self, queue_name: str, connection: Redis) -> None:
        self.stage: Stage = stage(queue_name)
        self.connection = connection
        self.prefix = f"{KEY_PREFIX}:dlq:{self.stage.name}"

    # --- keys -----------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @staticmethod
    def _registry(band: str) -> str:
        return f"rq:failed:{band}"

    # --- reading --------------------------------------------------------------------------

    def total(self) -> int:
        """Jobs in the index (equals the dead-letter queue's size once synced)."""
        return int(self.connection.zcard(self._key("all")))

    def group_count(self) -> int:
        return int(self.connection.zcard(self._key("counts")))

    def groups(self, offset: int = 0, limit: int = 50) -> list[Group]:
        """Groups, largest first."""
        ranked = _pairs(
            self.connection.zrevrange(
                self._key("counts"), offset, offset + limit - 1, withscores=True
            )
        )
        return self._groups([(fp, int(count)) for fp, count in ranked])

    def group(self, fingerprint: str) -> Group | None:
        count = self.connection.zscore(self._key("counts"), fingerprint)
        if count is None:
            return None
        return self._groups([(fingerprint, int(count))])[0]

    def _groups(self, ranked: list[tuple[str, int]]) -> list[Group]:
        if not ranked:
            return []
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hmget(self._key("info"), [fp for fp, _ in ranked])
            for fp, _ in ranked:
                pipe.zrange(self._key("g", fp), 0, 0, withscores=True)
                pipe.zrange(self._key("g", fp), -1, -1, withscores=True)
            infos, *edges = pipe.execute()
        groups = []
        for index, ((fp, count), raw_info) in enumerate(zip(ranked, infos, strict=True)):
            info = json.loads(raw_info) if raw_info else {}
            first, last = edges[2 * index], edges[2 * index + 1]
            groups.append(
                Group(
                    fingerprint=fp,
                    exc_class=info.get("class", UNKNOWN_CLASS),
                    message=info.get("message", ""),
                    example=info.get("example", ""),
                    error_type=info.get("type", ""),
                    count=count,
                    first_seen=_when(first),
                    last_seen=_when(last),
                )
            )
        return groups

    def job_ids(
        self,
        fingerprint: str | None = None,
        offset: int = 0,
        limit: int = 50,
        *,
        newest: bool = True,
    ) -> list[tuple[str, float]]:
        """(job id, failed-at) of a group (or of every indexed job), one page."""
        key = self._key("g", fingerprint) if fingerprint else self._key("all")
        stop = offset + limit - 1
        if newest:
            return _pairs(self.connection.zrevrange(key, offset, stop, withscores=True))
        return _pairs(self.connection.zrange(key, offset, stop, withscores=True))

    def count(self, fingerprint: str | None = None) -> int:
        key = self._key("g", fingerprint) if fingerprint else self._key("all")
        return int(self.connection.zcard(key))

    def fingerprints_of(self, job_ids: Iterable[str]) -> dict[str, str]:
        ids = list(job_ids)
        if not ids:
            return {}
        values = self.connection.hmget(self._key("fp"), ids)
        return {job_id: _text(fp) for job_id, fp in zip(ids, values, strict=True) if fp}

    # --- keeping it up to date ------------------------------------------------------------

    def sync(self, budget: float | None = 0.3, *, full: bool = False) -> SyncReport:
        """Bring the index up to date with the failed registries, spending at most about
        ``budget`` seconds fingerprinting new jobs (``None``: no limit). Concurrent syncs
        of the same stage do not wait for each other: the loser reports ``busy``."""
        # An unbudgeted sync of a huge backlog may run for minutes; a budgeted one a second.
        hold = 600 if budget is None else 60
        lock = self.connection.lock(self._key("lock"), timeout=hold, blocking=False)
        if not lock.acquire(blocking=False):
            return SyncReport(self.total(), 0, busy=True)
        try:
            return self._sync(budget, full)
        finally:
            with contextlib.suppress(LockError):  # expired or deleted meanwhile: nothing to free
                lock.release()

    def _sync(self, budget: float | None, full: bool) -> SyncReport:
        deadline = None if budget is None else time.monotonic() + budget
        bands = self.stage.rq_names
        with self.connection.pipeline(transaction=False) as pipe:
            for band in bands:
                pipe.zcard(self._registry(band))
                pipe.zrange(self._registry(band), 0, 0, withscores=True)
                pipe.zrange(self._registry(band), -1, -1, withscores=True)
            pipe.hgetall(self._key("sig"))
            pipe.get(self._key("checked"))
            *parts, stored, checked = pipe.execute()
        signatures = {
            band: json.dumps([parts[3 * i], _pairs(parts[3 * i + 1]), _pairs(parts[3 * i + 2])])
            for i, band in enumerate(bands)
        }
        stored_sig = {_text(k): _text(v) for k, v in stored.items()}
        full = full or not checked or time.time() - float(checked) > FULL_CHECK_INTERVAL
        changed = [b for b in bands if full or stored_sig.get(b) != signatures[b]]
        pending = 0
        for band in changed:
            left = self._sync_band(band, deadline, budget, full=full)
            pending += left
            with self.connection.pipeline(transaction=False) as pipe:
                if left:
                    pipe.hdel(self._key("sig"), band)
                else:
                    pipe.hset(self._key("sig"), band, signatures[band])
                pipe.execute()
        if full and not pending:
            self.connection.set(self._key("checked"), time.time())
        return SyncReport(self.total(), pending)

    def _sync_band(
        self, band: str, deadline: float | None, budget: float | None, *, full: bool
    ) -> int:
        """Diff one registry against its index; returns jobs left to index."""
        registry, indexed = self._registry(band), self._key("idx", band)
        scratch = self._key("scratch", band)
        # The diff stays on the server; only what this sync can index comes back.
        take = -1 if budget is None else max(BATCH, int(budget * READ_PER_SECOND))
        with self.connection.pipeline(transaction=True) as pipe:
            pipe.zdiffstore(scratch, [registry, indexed])
            pipe.zrange(scratch, 0, take if take < 0 else take - 1, withscores=True)
            pipe.delete(scratch)
            pipe.zdiff([indexed, registry])
            pipe.zrevrange(registry, 0, RECENT_WINDOW - 1, withscores=True)
            new_count, new_raw, _, removed_raw, recent_raw = pipe.execute()
        new = _pairs(new_raw)
        removed = [_text(m) for m in removed_raw]
        refailed = self._refailed(band, _pairs(recent_raw), full=full)
        # A re-failed job leaves its old group and is indexed again like a new one.
        self._remove([band], removed + [job_id for job_id, _ in refailed])
        todo = sorted(new + refailed, key=lambda pair: pair[1])
        done = 0
        while done < len(todo):
            # At least one batch per sync, so every sync makes progress.
            if done and deadline is not None and time.monotonic() > deadline:
                break
            self._add(band, todo[done : done + BATCH])
            done += BATCH
        return max(0, int(new_count) + len(refailed) - min(done, len(todo)))

    def _refailed(
        self, band: str, recent: list[tuple[str, float]], *, full: bool
    ) -> list[tuple[str, float]]:
        """Indexed jobs whose registry score changed (they failed again since)."""
        registry, indexed = self._registry(band), self._key("idx", band)
        if full:
            scratch = self._key("scratch", band)
            with self.connection.pipeline(transaction=True) as pipe:
                pipe.zinterstore(scratch, {registry: 1, indexed: -1})
                pipe.zremrangebyscore(scratch, 0, 0)
                pipe.zrange(scratch, 0, -1)
                pipe.delete(scratch)
                _, _, moved_raw, _ = pipe.execute()
            moved = [_text(m) for m in moved_raw]
            if not moved:
                return []
            scores = self.connection.zmscore(registry, moved)
            return [(m, float(s)) for m, s in zip(moved, scores, strict=True) if s is not None]
        if not recent:
            return []
        scores = self.connection.zmscore(indexed, [job_id for job_id, _ in recent])
        return [
            (job_id, score)
            for (job_id, score), old in zip(recent, scores, strict=True)
            if old is not None and float(old) != score
        ]

    def _add(self, band: str, items: Sequence[tuple[str, float]]) -> None:
        with self.connection.pipeline(transaction=False) as pipe:
            for job_id, _ in items:
                pipe.hmget(f"rq:job:{job_id}", ["meta", "ended_at", "failure_ttl"])
            replies = pipe.execute()
        needs_traceback = [
            job_id
            for (job_id, _), (raw_meta, _, _) in zip(items, replies, strict=True)
            if raw_meta is not None and not _final_error(_load_meta(raw_meta))
        ]
        tracebacks = self._latest_tracebacks(needs_traceback)
        placed: dict[str, tuple[str, float]] = {}
        infos: dict[str, str] = {}
        for (job_id, score), (raw_meta, ended, ttl) in zip(items, replies, strict=True):
            if raw_meta is None and ended is None:
                failure = Failure(MISSING_CLASS, "the job's data is no longer in Redis")
            else:
                failure = failure_of(_load_meta(raw_meta), tracebacks.get(job_id))
            ended_at = parse_rq_time(ended)
            if ended_at is not None:
                failed_at = ended_at.timestamp()
            else:
                failed_at = score - (int(ttl) if ttl else DEFAULT_FAILURE_TTL)
            fp = failure.fingerprint
            placed[job_id] = (fp, failed_at)
            if fp not in infos:
                infos[fp] = json.dumps(
                    {"class": failure.exc_class, "message": failure.normalised,
                     "example": failure.message[:EXAMPLE_LENGTH], "type": failure.error_type}
                )  # fmt: skip
        with self.connection.pipeline(transaction=True) as pipe:
            pipe.hset(self._key("fp"), mapping={j: fp for j, (fp, _) in placed.items()})
            by_group: dict[str, dict[str, float]] = {}
            for job_id, (fp, failed_at) in placed.items():
                by_group.setdefault(fp, {})[job_id] = failed_at
            for fp, members in by_group.items():
                pipe.zadd(self._key("g", fp), members)
                pipe.hsetnx(self._key("info"), fp, infos[fp])
            pipe.zadd(self._key("all"), {j: at for j, (_, at) in placed.items()})
            pipe.zadd(self._key("idx", band), dict(items))
            pipe.execute()
        self._recount(set(by_group))

    def _latest_tracebacks(self, job_ids: list[str]) -> dict[str, str]:
        if not job_ids:
            return {}
        with self.connection.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.xrevrange(f"rq:results:{job_id}", "+", "-", count=1)
            replies = pipe.execute()
        found = {}
        for job_id, entries in zip(job_ids, replies, strict=True):
            if entries:
                found[job_id] = decode_exc_string(entries[0][1].get(b"exc_string"))
        return found

    def _remove(self, bands: Sequence[str], job_ids: list[str]) -> None:
        for start in range(0, len(job_ids), BATCH):
            chunk = job_ids[start : start + BATCH]
            fps = self.fingerprints_of(chunk)
            with self.connection.pipeline(transaction=True) as pipe:
                for job_id in chunk:
                    if job_id in fps:
                        pipe.zrem(self._key("g", fps[job_id]), job_id)
                pipe.hdel(self._key("fp"), *chunk)
                pipe.zrem(self._key("all"), *chunk)
                for band in bands:
                    pipe.zrem(self._key("idx", band), *chunk)
                pipe.execute()
            self._recount(set(fps.values()))

    def _recount(self, fingerprints: set[str]) -> None:
        """Counts from the group sets themselves, so they can never drift."""
        if not fingerprints:
            return
        ordered = sorted(fingerprints)
        with self.connection.pipeline(transaction=False) as pipe:
            for fp in ordered:
                pipe.zcard(self._key("g", fp))
            counts = pipe.execute()
        with self.connection.pipeline(transaction=True) as pipe:
            for fp, count in zip(ordered, counts, strict=True):
                if count:
                    pipe.zadd(self._key("counts"), {fp: count})
                else:
                    pipe.zrem(self._key("counts"), fp)
                    pipe.hdel(self._key("info"), fp)
            pipe.execute()

    def forget(self, job_ids: Iterable[str]) -> None:
        """Drop jobs from the index at once (after retrying or clearing them), so the next
        page does not show them even before a sync."""
        ids = list(job_ids)
        if not ids:
            return
        self._remove(self.stage.rq_names, ids)

    def reset(self) -> None:
        """Delete the whole index (it is rebuilt by the next syncs)."""
        keys = list(self.connection.scan_iter(match=f"{self.prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            self.connection.delete(*keys[start : start + 500])


def _final_error(meta: dict[str, Any]) -> bool:
    errors = meta.get("errors") or []
    return bool(errors) and isinstance(errors[-1], dict) and bool(errors[-1].get("final"))


def _when(edge: list[tuple[bytes, float]]) -> datetime | None:
    return datetime.fromtimestamp(edge[0][1], tz=UTC) if edge else None
