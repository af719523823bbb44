"""System checks: configuration problems are reported at start-up with a clear message."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from intentqueue import conf

JSON_SERIALIZERS = {"rq.serializers.JSONSerializer", "JSONSerializer"}


@checks.register(checks.Tags.compatibility)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``INTENTQUEUE`` must be well formed and match django-rq's ``RQ_QUEUES``."""
    try:
        loaded = conf.load(getattr(settings, "INTENTQUEUE", None))
    except ImproperlyConfigured as error:
        return [checks.Error(str(error), id="intentqueue.E001")]
    errors: list[checks.CheckMessage] = []
    rq_queues = getattr(settings, "RQ_QUEUES", {}) or {}
    for name in loaded.queue_names:
        queue = rq_queues.get(name)
        if queue is None:
            errors.append(
                checks.Error(
                    f"RQ_QUEUES has no queue {name!r}",
                    hint="Build RQ_QUEUES with intentqueue.conf.rq_queues(INTENTQUEUE, ...).",
                    id="intentqueue.E002",
                )
            )
        elif _serializer_name(queue.get("SERIALIZER")) not in JSON_SERIALIZERS:
            errors.append(
                checks.Error(
                    f"RQ_QUEUES[{name!r}] must use rq.serializers.JSONSerializer "
                    f"(got {queue.get('SERIALIZER')!r}): pickle lets anyone who can write "
                    "to Redis run code in the workers.",
                    id="intentqueue.E003",
                )
            )
    return errors


def _serializer_name(value: Any) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    return f"{value.__module__}.{value.__qualname__}"


@checks.register("redis")
def check_redis_memory_policy(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Warn when Redis evicts keys (it would silently drop jobs) or is unreachable; refuse a
    missing or wrong password (a configuration error that no retry will fix)."""
    from redis.exceptions import AuthenticationError, RedisError

    from intentqueue.health import memory_problems, redis_memory
    from intentqueue.queues import describe_redis_error, get_connection

    try:
        connection = get_connection()
        memory = redis_memory(connection)
    except AuthenticationError as error:
        return [checks.Error(describe_redis_error(error), id="intentqueue.E012")]
    except RedisError as error:
        return [checks.Warning(describe_redis_error(error), id="intentqueue.W002")]
    except ImproperlyConfigured as error:
        return [checks.Warning(f"Redis is not reachable: {error}", id="intentqueue.W002")]
    return [
        checks.Warning(f"Redis {problem}", id="intentqueue.W001")
        for problem in memory_problems(memory)
    ]


@checks.register(checks.Tags.compatibility)
def check_chain_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Every entry of ``INTENTQUEUE["chains"]`` must name an RPC URL and a portal."""
    from intentqueue.chain.config import check_chains

    try:
        problems = check_chains()
    except ImproperlyConfigured:  # the INTENTQUEUE setting itself is broken: E001 says so
        return []
    return [checks.Error(problem, id="intentqueue.E010") for problem in problems]


@checks.register(checks.Tags.security)
def check_solver_keystore(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``SOLVER_KEYSTORE``, when set, must unlock with its password (a wrong password
    stops a worker at start rather than failing every execution job)."""
    from intentqueue.chain.wallets import check_keystore

    return [checks.Error(problem, id="intentqueue.E011") for problem in check_keystore()]


@checks.register(checks.Tags.security)
def check_rq_admin_link(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """django-rq's admin registration (``RQ_SHOW_ADMIN_LINK``, on unless turned off) mounts
    its views for every staff user, one of which unpickles job meta from Redis."""
    from django.apps import apps

    if not apps.is_installed("django_rq") or not getattr(settings, "RQ_SHOW_ADMIN_LINK", True):
        return []
    return [
        checks.Warning(
            "RQ_SHOW_ADMIN_LINK is on: django-rq's dashboard in the admin is open to every "
            "staff user (empty queues, delete jobs, unaudited) and its 'delete all failed "
            "jobs' unpickles job data read from Redis.",
            hint='Set RQ_SHOW_ADMIN_LINK = False and mount path("admin/rq/", '
            'include("intentqueue.rq_dashboard")) instead of django_rq.urls.',
            id="intentqueue.W003",
        )
    ]
