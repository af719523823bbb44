"""Queue names, Redis keys and RQ objects of the two stages.

Each stage (``fulfillment``, ``execution``) is one logical queue made of one RQ queue per
priority: priority 10 (normal, the default) uses the stage's own name
(``intent-fulfillment``), priorities 1-9 use ``<name>-p<n>``. A worker started on the
stage's name serves all of them, highest priority first (see ``worker.py``). Everything
is a plain RQ queue with the JSON serializer, so ``rq info`` and django-rq show it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import redis
from rq import Queue, Retry
from rq.serializers import JSONSerializer

from intentqueue.conf import QUEUE_KEYS, JobOptions, intentqueue_settings
from intentqueue.exceptions import UnknownQueueError

#: Priorities, 1 = highest. Intents without one get ``NORMAL_PRIORITY``.
HIGHEST_PRIORITY = 1
NORMAL_PRIORITY = 10
PRIORITIES = range(HIGHEST_PRIORITY, NORMAL_PRIORITY + 1)

#: Prefix of every key intentqueue writes besides RQ's own.
KEY_PREFIX = "intentqueue"
#: Set of paused stage names.
PAUSED_KEY = f"{KEY_PREFIX}:paused"


def band_name(base: str, priority: int) -> str:
    """The RQ queue that holds ``base``'s jobs of ``priority``."""
    return base if priority == NORMAL_PRIORITY else f"{base}-p{priority}"


def band_names(base: str) -> list[str]:
    """All RQ queues of a stage, highest priority first."""
    return [band_name(base, p) for p in PRIORITIES]


def all_rq_queue_names(base_names: list[str]) -> list[str]:
    """Every RQ queue name of the given stages (for ``RQ_QUEUES``)."""
    return [name for base in base_names for name in band_names(base)]


@dataclass(frozen=True)
class Stage:
    """One logical queue: its settings key (``fulfillment``), RQ name and job options."""

    key: str
    name: str
    options: JobOptions

    @property
    def rq_names(self) -> list[str]:
        """Its RQ queues, highest priority first."""
        return band_names(self.name)

    def retry(
        self, attempts: int | None = None, delays_ms: list[int] | None = None
    ) -> Retry | None:
        """RQ's ``Retry`` for this stage: ``attempts`` total runs (``None``: the default)."""
        attempts = self.options.attempts if attempts is None else attempts
        if attempts <= 1:
            return None
        delays = delays_ms if delays_ms is not None else backoff_delays_ms(self.options, attempts)
        # RQ counts retries (attempts - 1) and wants whole seconds; an interval list as
        # long as the retries, or its first value is reused for early retries.
        return Retry(max=attempts - 1, interval=[round(d / 1000) for d in delays])


def backoff_delays_ms(options: JobOptions, attempts: int) -> list[int]:
    """Delay before retry n (n = 1 .. attempts-1): ``delay * 2**(n-1)`` or ``delay``."""
    base = options.backoff.delay
    if options.backoff.type == "fixed":
        return [base] * (attempts - 1)
    return [base * 2 ** (n - 1) for n in range(1, attempts)]


def stage(key_or_name: str) -> Stage:
    """The stage by settings key (``fulfillment``) or by any of its RQ queue names."""
    conf = intentqueue_settings
    for key in QUEUE_KEYS:
        queue = conf.queue(key)
        if key_or_name == key or key_or_name in band_names(queue.name):
            return Stage(key=key, name=queue.name, options=queue.default_job_options)
    known = ", ".join(conf.queue_names)
    raise UnknownQueueError(f"unknown queue {key_or_name!r}; the queues are: {known}")


def stages() -> list[Stage]:
    """Both stages, fulfillment first."""
    return [stage(key) for key in QUEUE_KEYS]


@functools.lru_cache(maxsize=8)
def _connection_for(url: str, retries: int) -> redis.Redis:
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry as RedisRetry

    return redis.Redis.from_url(
        url,
        retry=RedisRetry(ExponentialBackoff(cap=1.0, base=0.05), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        socket_connect_timeout=5,
        health_check_interval=30,
    )


@functools.lru_cache(maxsize=8)
def _sentinel_master(
    sentinels: tuple[str, ...], master: str, password: str | None, db: int, retries: int
) -> redis.Redis:
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry as RedisRetry
    from redis.sentinel import Sentinel

    addresses = [(a.rpartition(":")[0], int(a.rpartition(":")[2])) for a in sentinels]
    return Sentinel(addresses, socket_connect_timeout=5).master_for(
        master,
        password=password,
        db=db,
        retry=RedisRetry(ExponentialBackoff(cap=1.0, base=0.05), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def get_connection() -> redis.Redis:
    """The process-wide Redis client of the configured server (thread- and fork-safe):
    ``redis.url``, else the Sentinel master, else host/port/password/db."""
    conf = intentqueue_settings.redis
    if conf.url:
        return _connection_for(conf.url, conf.max_retries_per_request)
    if conf.sentinels and conf.master_name:
        return _sentinel_master(
            tuple(conf.sentinels), conf.master_name, conf.password, conf.db,
            conf.max_retries_per_request,
        )  # fmt: skip
    auth = f":{conf.password}@" if conf.password else ""
    url = f"redis://{auth}{conf.host}:{conf.port}/{conf.db}"
    return _connection_for(url, conf.max_retries_per_request)


def redis_location(connection: redis.Redis) -> str:
    """Where ``connection`` points, as a URL without credentials (``redis://host:port/db``,
    ``unix://path``, or the Sentinel master's name)."""
    pool = connection.connection_pool
    kwargs = pool.connection_kwargs
    db = kwargs.get("db", 0)
    service = getattr(pool, "service_name", None)
    if service:
        return f"Sentinel master {service!r} (db {db})"
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}?db={db}"
    scheme = "rediss" if issubclass(pool.connection_class, redis.SSLConnection) else "redis"
    return f"{scheme}://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"


def describe_redis_error(error: BaseException, connection: redis.Redis | None = None) -> str:
    """One line for an operator: what went wrong with Redis and where (never the password).

    redis-py's own messages name neither the server nor, for a missing password, the
    problem ("HELLO must be called with the client already authenticated").
    """
    try:
        connection = connection or get_connection()
        where = redis_location(connection)
        password = connection.connection_pool.connection_kwargs.get("password")
    except Exception:  # the settings themselves are broken: say what we can
        where, password = "the configured Redis", None
    detail = " ".join(str(error).split())
    if password:  # redis-py does not quote it; nor will we, whatever a server answers
        detail = detail.replace(password, "***")
    if isinstance(error, redis.AuthenticationError):
        if not password:
            problem = "authentication required (the server needs a password; none is configured)"
        elif "no password is set" in detail or "without any password configured" in detail:
            problem = "a password is configured but the server has none set"
        else:
            problem = "wrong password or user name (the server refused them)"
    elif isinstance(error, redis.ConnectionError | redis.TimeoutError):
        problem = f"not reachable ({detail or type(error).__name__})"
    else:
        problem = f"{type(error).__name__}: {detail}"
    return f"Redis at {where}: {problem}"


def rq_queue(name: str, connection: redis.Redis | None = None) -> Queue:
    """A plain RQ queue (JSON serializer) named ``name``, cached per connection (a Queue
    asks the server for its version once, so a fresh one per enqueue costs a round trip)."""
    return _cached_queue(name, connection or get_connection())


@functools.lru_cache(maxsize=256)
def _cached_queue(name: str, connection: redis.Redis) -> Queue:
    from intentqueue.jobs import IntentJob

    return Queue(name, connection=connection, serializer=JSONSerializer, job_class=IntentJob)


def job_id_for(stage_key: str, intent_hash: str) -> str:
    """The deterministic RQ job id of an intent's job in a stage."""
    return f"{stage_key}-{intent_hash.removeprefix('0x')}"
