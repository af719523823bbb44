"""The ``INTENTQUEUE`` settings namespace.

One dict in the project's settings, merged over ``DEFAULTS`` (the queue module's default
configuration) key by key. Unknown keys and ill-typed values are errors that name the
offending path, reported by the system check ``intentqueue.E001`` at start-up.

Access goes through ``intentqueue_settings`` (attribute access, typed)::

    from intentqueue.conf import intentqueue_settings
    intentqueue_settings.queues["fulfillment"].default_job_options.attempts

It is rebuilt whenever ``settings.INTENTQUEUE`` changes (``override_settings`` in tests).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

QUEUE_KEYS = ("fulfillment", "execution")


@dataclass(frozen=True)
class RedisConfig:
    """Where Redis is. ``url`` (from ``REDIS_URL``) wins over host/port/password/db."""

    #: A ``redis://`` or ``rediss://`` (TLS) URL with optional password and db.
    url: str | None = None
    #: Host, used when ``url`` is empty.
    host: str = "localhost"
    #: TCP port, used when ``url`` is empty.
    port: int = 6379
    #: Password (AUTH), used when ``url`` is empty.
    password: str | None = None
    #: Database index, used when ``url`` is empty.
    db: int = 0
    #: How often a command is retried on a connection error before it fails.
    max_retries_per_request: int = 3
    #: Sentinel addresses (``host:port``); when set, the master named ``master_name`` is
    #: asked of them and ``password``/``db`` apply to it.
    sentinels: list[str] = field(default_factory=list)
    #: The Sentinel master's name.
    master_name: str | None = None


@dataclass(frozen=True)
class BackoffConfig:
    """Delay between attempts: ``delay * 2**(n-1)`` (exponential) or ``delay`` (fixed)."""

    #: ``exponential`` or ``fixed``.
    type: Literal["exponential", "fixed"] = "exponential"
    #: Base delay in milliseconds.
    delay: int = 2000


@dataclass(frozen=True)
class JobOptions:
    """Options every job of a queue gets unless the job overrides them."""

    #: Total runs of a job, the first included (3 = 1 run + 2 retries).
    attempts: int = 3
    #: Delay before each retry.
    backoff: BackoffConfig = field(default_factory=BackoffConfig)
    #: Completed jobs kept per queue, as BullMQ reads it: True removes each job when it
    #: completes, False keeps all, N keeps the last N.
    remove_on_complete: bool | int = 100
    #: Failed jobs kept in the dead-letter queue: True removes them, False keeps all, N keeps
    #: the last N.
    remove_on_fail: bool | int = 500

    @staticmethod
    def keep_count(value: bool | int) -> int | None:
        """How many jobs a ``remove_on_*`` value keeps (None: all)."""
        if value is True:
            return 0
        if value is False:
            return None
        return int(value)


@dataclass(frozen=True)
class LimiterConfig:
    """At most ``max`` events per ``duration`` milliseconds; ``max`` 0 turns it off."""

    #: Events allowed per window (0: no limit).
    max: int = 0
    #: Window length in milliseconds.
    duration: int = 1000


@dataclass(frozen=True)
class BreakersConfig:
    """Protective controls of the execution stage, per destination chain
    (``intentqueue.breakers``)."""

    #: Consecutive RPC network failures of a chain that open its circuit.
    failure_threshold: int = 5
    #: Milliseconds an open circuit holds its chain's jobs before one probe is let through.
    cooldown: int = 30000
    #: Execution jobs of one chain running at once, across all workers (0: no bound).
    max_in_flight_per_chain: int = 3


@dataclass(frozen=True)
class QueueConfig:
    """One queue: its RQ name, how many workers serve it, and its job defaults."""

    #: The RQ queue name (also the key in django-rq's ``RQ_QUEUES``).
    name: str
    #: Worker processes that serve this queue on one host (the standalone command and
    #: ``rqworker-pool`` start this many).
    concurrency: int
    #: Defaults for the queue's jobs.
    default_job_options: JobOptions
    #: Job starts allowed per window, across all workers of the queue (off by default).
    limiter: LimiterConfig = field(default_factory=LimiterConfig)


@dataclass(frozen=True)
class WorkerConfig:
    """Worker behaviour shared by both queues."""

    #: How many times a job may stall (its worker died) before it fails as stalled.
    max_stalled_count: int = 3
    #: Milliseconds between checks for stalled jobs.
    stalled_interval: int = 30000
    #: Milliseconds a worker's hold on its job lasts without being renewed.
    lock_duration: int = 30000


@dataclass(frozen=True)
class ProcessorsConfig:
    """The processor class (dotted path) that runs each stage's jobs."""

    #: Validates intents with their strategy.
    fulfillment: str = "intentqueue.processors.fulfillment.FulfillmentProcessor"
    #: Executes validated intents on their destination chain.
    execution: str = "intentqueue.processors.execution.BlockchainProcessor"


@dataclass(frozen=True)
class HealthConfig:
    """When the queues count as healthy (see ``intentqueue.health``)."""

    #: Oldest waiting job's age, in seconds, above which a queue is unhealthy.
    max_waiting_age: int = 300
    #: Whether a queue without a live worker is unhealthy.
    require_workers: bool = True
    #: Redis ``used_memory / maxmemory`` above which Redis is reported unhealthy.
    max_memory_ratio: float = 0.8


@dataclass(frozen=True)
class IntentQueueSettings:
    """The whole ``INTENTQUEUE`` namespace."""

    #: Connection to Redis.
    redis: RedisConfig
    #: The two queues, keyed ``fulfillment`` and ``execution``.
    queues: dict[str, QueueConfig]
    #: Worker behaviour.
    worker: WorkerConfig
    #: Health rules.
    health: HealthConfig = field(default_factory=HealthConfig)
    #: Processor classes per stage.
    processors: ProcessorsConfig = field(default_factory=ProcessorsConfig)
    #: Circuit breakers and in-flight bounds per destination chain.
    breakers: BreakersConfig = field(default_factory=BreakersConfig)
    #: Fulfillment jobs one ``metadata.source`` (client) may enqueue per window; more are
    #: rejected with ``EnqueueRateLimitedError`` (off by default).
    enqueue_limit: LimiterConfig = field(default_factory=LimiterConfig)
    #: Strategies by name: ``{"class": dotted path, "enabled": bool, "options": {...}}``;
    #: each strategy class validates its own options.
    strategies: dict[str, Any] = field(default_factory=dict)
    #: Chains by chain id (a string): ``{"rpc_url": ..., "portal": ..., ...}``, read by
    #: ``intentqueue.chain``.
    chains: dict[str, Any] = field(default_factory=dict)
    #: Wallet types by name: ``{"class": dotted path, "options": {...}}``, read by
    #: ``intentqueue.chain.wallets``; an execution job's ``walletType`` picks one.
    wallets: dict[str, Any] = field(default_factory=dict)
    #: Strategy used when an intent names none.
    default_strategy: str = "standard"
    #: Bearer token for the Prometheus endpoint (staff with ``view_queues`` may always read
    #: it); None: staff only.
    metrics_token: str | None = None

    def queue(self, key: str) -> QueueConfig:
        """The queue configured under ``key`` (``fulfillment`` or ``execution``)."""
        return self.queues[key]

    def queue_by_name(self, name: str) -> QueueConfig:
        """The queue whose RQ name is ``name``; ``UnknownQueueError`` if there is none."""
        from intentqueue.exceptions import UnknownQueueError

        for queue in self.queues.values():
            if queue.name == name:
                return queue
        known = ", ".join(q.name for q in self.queues.values())
        raise UnknownQueueError(f"unknown queue {name!r}; the queues are: {known}")

    @property
    def queue_names(self) -> list[str]:
        """RQ names of all queues, fulfillment first."""
        return [self.queues[key].name for key in QUEUE_KEYS]


#: The queue module's default configuration, in the shape ``INTENTQUEUE`` takes.
DEFAULTS: dict[str, Any] = {
    "redis": {
        "url": None,
        "host": "localhost",
        "port": 6379,
        "password": None,
        "db": 0,
        "max_retries_per_request": 3,
        "sentinels": [],
        "master_name": None,
    },
    "queues": {
        "fulfillment": {
            "name": "intent-fulfillment",
            "concurrency": 10,
            "default_job_options": {
                "attempts": 3,
                "backoff": {"type": "exponential", "delay": 2000},
                "remove_on_complete": 100,
                "remove_on_fail": 500,
            },
            "limiter": {"max": 0, "duration": 1000},
        },
        "execution": {
            "name": "blockchain-execution",
            "concurrency": 5,
            "default_job_options": {
                "attempts": 3,
                "backoff": {"type": "exponential", "delay": 5000},
                "remove_on_complete": 100,
                "remove_on_fail": 1000,
            },
            "limiter": {"max": 0, "duration": 1000},
        },
    },
    "worker": {
        "max_stalled_count": 3,
        "stalled_interval": 30000,
        "lock_duration": 30000,
    },
    "health": {"max_waiting_age": 300, "require_workers": True, "max_memory_ratio": 0.8},
    "processors": {
        "fulfillment": "intentqueue.processors.fulfillment.FulfillmentProcessor",
        "execution": "intentqueue.processors.execution.BlockchainProcessor",
    },
    "enqueue_limit": {"max": 0, "duration": 60000},
    "breakers": {"failure_threshold": 5, "cooldown": 30000, "max_in_flight_per_chain": 3},
    "strategies": {
        "standard": {
            "class": "intentqueue.strategies.standard.StandardStrategy",
            "enabled": True,
            "options": {},
        },
    },
    "chains": {},
    "wallets": {
        "basic": {"class": "intentqueue.chain.wallets.BasicWallet"},
    },
    "default_strategy": "standard",
    "metrics_token": None,
}

#: Settings whose keys are names chosen by the user (merged shallowly, any key allowed).
OPEN_MAPS = {"INTENTQUEUE.strategies", "INTENTQUEUE.chains", "INTENTQUEUE.wallets"}


def _merge(base: dict[str, Any], override: dict[str, Any], path: str) -> dict[str, Any]:
    """``override`` laid over ``base``, recursively; keys not in ``base`` are errors."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        where = f"{path}.{key}"
        if path in OPEN_MAPS:
            merged[key] = value
            continue
        if key not in base:
            allowed = ", ".join(sorted(base))
            raise ImproperlyConfigured(f"{where}: unknown setting (allowed here: {allowed})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ImproperlyConfigured(f"{where}: expected a dict, got {value!r}")
            merged[key] = _merge(base[key], value, where)
        else:
            merged[key] = value
    return merged


def _check_type(value: Any, annotation: Any, where: str) -> None:
    origin = get_origin(annotation)
    if origin is Literal:
        if value not in get_args(annotation):
            choices = ", ".join(repr(a) for a in get_args(annotation))
            raise ImproperlyConfigured(f"{where}: must be one of {choices}, got {value!r}")
        return
    if origin is list:
        (item,) = get_args(annotation)
        if not isinstance(value, list):
            raise ImproperlyConfigured(f"{where}: expected a list, got {value!r}")
        for index, element in enumerate(value):
            _check_type(element, item, f"{where}[{index}]")
        return
    allowed = get_args(annotation) if origin in (types.UnionType, typing.Union) else (annotation,)
    for option in allowed:
        if option is type(None) and value is None:
            return
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if option in (str, bool) and type(value) is option:
            return
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return
    names = " or ".join(getattr(a, "__name__", str(a)) for a in allowed)
    raise ImproperlyConfigured(f"{where}: expected {names}, got {value!r}")


def _build[T](cls: type[T], data: dict[str, Any], path: str) -> T:
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value, where, hint = data[f.name], f"{path}.{f.name}", hints[f.name]
        if f.name in ("strategies", "chains", "wallets"):
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise ImproperlyConfigured(f"{where}: expected a dict of dicts, got {value!r}")
            kwargs[f.name] = value
        elif dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, value, where)  # type: ignore[arg-type]
        elif f.name == "queues":
            kwargs[f.name] = {k: _build(QueueConfig, v, f"{where}.{k}") for k, v in value.items()}
        else:
            _check_type(value, hint, where)
            kwargs[f.name] = value
    return cls(**kwargs)


def _queue_problems(conf: IntentQueueSettings) -> list[str]:
    problems: list[str] = []
    for key, queue in conf.queues.items():
        where = f"INTENTQUEUE.queues.{key}"
        options = queue.default_job_options
        if not queue.name or not queue.name.replace("-", "").replace("_", "").isalnum():
            problems.append(f"{where}.name: letters, digits, '-' and '_' only, got {queue.name!r}")
        if queue.concurrency < 1:
            problems.append(f"{where}.concurrency: must be at least 1")
        if options.attempts < 1:
            problems.append(f"{where}.default_job_options.attempts: must be at least 1")
        if options.backoff.delay < 0:
            problems.append(f"{where}.default_job_options.backoff.delay: must not be negative")
        for keep in ("remove_on_complete", "remove_on_fail"):
            value = getattr(options, keep)
            if not isinstance(value, bool) and value < 0:
                problems.append(f"{where}.default_job_options.{keep}: must not be negative")
    if len(set(conf.queue_names)) != len(conf.queue_names):
        problems.append("INTENTQUEUE.queues: the queues must have different names")
    limiters = {f"queues.{k}.limiter": q.limiter for k, q in conf.queues.items()}
    for where, limiter in {**limiters, "enqueue_limit": conf.enqueue_limit}.items():
        if limiter.max < 0 or limiter.duration < 1:
            problems.append(f"INTENTQUEUE.{where}: max >= 0 and duration >= 1 (ms) required")
    return problems


def _sentinel_problems(redis: RedisConfig) -> list[str]:
    problems = []
    for index, address in enumerate(redis.sentinels):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            problems.append(f"INTENTQUEUE.redis.sentinels[{index}]: expected host:port")
    if redis.sentinels and not redis.master_name:
        problems.append("INTENTQUEUE.redis.master_name: required with sentinels")
    return problems


def _breaker_problems(breakers: BreakersConfig) -> list[str]:
    problems = []
    if breakers.failure_threshold < 1:
        problems.append("INTENTQUEUE.breakers.failure_threshold: must be at least 1")
    if breakers.cooldown < 1:
        problems.append("INTENTQUEUE.breakers.cooldown: must be at least 1 (milliseconds)")
    if breakers.max_in_flight_per_chain < 0:
        problems.append("INTENTQUEUE.breakers.max_in_flight_per_chain: must not be negative")
    return problems


def _validate(conf: IntentQueueSettings) -> None:
    """Checks of values (types are checked while building)."""
    problems = _queue_problems(conf)
    worker = conf.worker
    if worker.max_stalled_count < 0:
        problems.append("INTENTQUEUE.worker.max_stalled_count: must not be negative")
    for key in ("stalled_interval", "lock_duration"):
        if getattr(worker, key) < 1000:
            problems.append(f"INTENTQUEUE.worker.{key}: must be at least 1000 (milliseconds)")
    if conf.redis.port < 1 or conf.redis.port > 65535:
        problems.append("INTENTQUEUE.redis.port: must be between 1 and 65535")
    if conf.redis.max_retries_per_request < 0:
        problems.append("INTENTQUEUE.redis.max_retries_per_request: must not be negative")
    problems += _sentinel_problems(conf.redis)
    problems += _breaker_problems(conf.breakers)
    if not 0 < conf.health.max_memory_ratio <= 1:
        problems.append("INTENTQUEUE.health.max_memory_ratio: must be in (0, 1]")
    enabled = {name for name, spec in conf.strategies.items() if spec.get("enabled", True)}
    if conf.default_strategy not in enabled:
        problems.append(
            f"INTENTQUEUE.default_strategy: {conf.default_strategy!r} is not an enabled strategy"
        )
    for name, spec in conf.strategies.items():
        if not isinstance(spec.get("class"), str):
            problems.append(f"INTENTQUEUE.strategies.{name}.class: a dotted path is required")
    if problems:
        raise ImproperlyConfigured("; ".join(problems))


def load(user_settings: Any) -> IntentQueueSettings:
    """Build and validate settings from the project's ``INTENTQUEUE`` value."""
    if user_settings is None:
        user_settings = {}
    if not isinstance(user_settings, dict):
        raise ImproperlyConfigured(f"INTENTQUEUE: expected a dict, got {user_settings!r}")
    merged = _merge(DEFAULTS, user_settings, "INTENTQUEUE")
    unknown_queues = set(merged["queues"]) - set(QUEUE_KEYS)
    if unknown_queues:
        raise ImproperlyConfigured(f"INTENTQUEUE.queues: unknown queue keys {unknown_queues}")
    conf = _build(IntentQueueSettings, merged, "INTENTQUEUE")
    _validate(conf)
    return conf


class _LazySettings:
    """Attribute access to the current ``IntentQueueSettings``, built on first use."""

    _cached: IntentQueueSettings | None = None

    def _get(self) -> IntentQueueSettings:
        if self._cached is None:
            self._cached = load(getattr(settings, "INTENTQUEUE", None))
        return self._cached

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    def reload(self) -> None:
        """Forget the cached settings; the next access rebuilds them."""
        self._cached = None


intentqueue_settings: IntentQueueSettings = typing.cast(IntentQueueSettings, _LazySettings())


def _reload(*, setting: str, **kwargs: Any) -> None:
    if setting == "INTENTQUEUE":
        typing.cast(_LazySettings, intentqueue_settings).reload()


setting_changed.connect(_reload)


def rq_queues(
    user_settings: dict[str, Any] | None, connection: dict[str, Any], *, default_timeout: int = 360
) -> dict[str, dict[str, Any]]:
    """django-rq's ``RQ_QUEUES`` for every queue of ``INTENTQUEUE``, JSON-serialised.

    ``connection`` holds django-rq connection keys (``URL``, or ``HOST``/``PORT``/...,
    ``SENTINELS``, ``SSL``...). Call it from the project's settings so the two settings
    cannot disagree.
    """
    from intentqueue.queues import all_rq_queue_names

    loaded = load(user_settings)
    return {
        name: {
            **connection,
            "SERIALIZER": "rq.serializers.JSONSerializer",
            "DEFAULT_TIMEOUT": default_timeout,
        }
        for name in all_rq_queue_names(loaded.queue_names)
    }
