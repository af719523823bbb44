"""Build the configured strategies by dotted path and hand them out by name.

Instances are built on first use and cached per process; the cache is cleared whenever
the ``INTENTQUEUE`` setting changes (``override_settings`` in tests).
"""

from __future__ import annotations

import threading
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.utils.module_loading import import_string

from intentqueue.conf import intentqueue_settings
from intentqueue.exceptions import UnknownStrategyError
from intentqueue.strategies.base import Strategy

#: The keys a strategy's entry in ``INTENTQUEUE["strategies"]`` may have.
SPEC_KEYS = ("class", "enabled", "options")

_strategies: dict[str, Strategy] = {}
_lock = threading.Lock()


def strategy_names() -> list[str]:
    """The names of the enabled strategies, in configuration order."""
    return [
        name
        for name, spec in intentqueue_settings.strategies.items()
        if spec.get("enabled", True) is True
    ]


def get_strategy(name: str) -> Strategy:
    """The enabled strategy configured as ``name``.

    Raises ``UnknownStrategyError`` (listing the available names) for a name that is not
    configured or disabled, and ``ImproperlyConfigured`` for a broken configuration.
    """
    strategy = _strategies.get(name)
    if strategy is not None:
        return strategy
    with _lock:
        if name not in _strategies:
            if name not in strategy_names():
                available = ", ".join(strategy_names()) or "none"
                raise UnknownStrategyError(
                    f"unknown or disabled strategy {name!r} (available: {available})"
                )
            _strategies[name] = build_strategy(name, intentqueue_settings.strategies[name])
        return _strategies[name]


def build_strategy(name: str, spec: Any) -> Strategy:
    """A new strategy from its configuration entry (not cached)."""
    where = f"INTENTQUEUE.strategies.{name}"
    if not isinstance(spec, dict):
        raise ImproperlyConfigured(f"{where}: expected a dict, got {spec!r}")
    for key in spec:
        if key not in SPEC_KEYS:
            allowed = ", ".join(SPEC_KEYS)
            raise ImproperlyConfigured(f"{where}.{key}: unknown key (allowed: {allowed})")
    if not isinstance(spec.get("enabled", True), bool):
        raise ImproperlyConfigured(f"{where}.enabled: expected True or False")
    path = spec.get("class")
    try:
        cls = import_string(path) if isinstance(path, str) else None
    except ImportError as error:
        raise ImproperlyConfigured(f"{where}.class: cannot import {path!r}: {error}") from error
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ImproperlyConfigured(
            f"{where}.class: {path!r} is not a subclass of intentqueue.strategies.Strategy"
        )
    options = spec.get("options")
    return cls(name, {} if options is None else options)


def check_strategies() -> list[str]:
    """Problems of the strategies configuration, one message each (for a system check).

    Every enabled strategy is built afresh, so a problem is found at start-up rather
    than by the first job. Errors of the ``INTENTQUEUE`` setting itself are left to the
    settings check.
    """
    try:
        specs = dict(intentqueue_settings.strategies)
    except ImproperlyConfigured:
        return []
    problems: list[str] = []
    for name, spec in specs.items():
        if isinstance(spec, dict) and spec.get("enabled", True) is False:
            continue
        try:
            problems.extend(build_strategy(name, spec).check())
        except ImproperlyConfigured as error:
            problems.append(str(error))
    return problems


def clear_cache() -> None:
    """Forget the built strategies; the next ``get_strategy()`` builds them again."""
    with _lock:
        _strategies.clear()


def _setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == "INTENTQUEUE":
        clear_cache()


setting_changed.connect(_setting_changed)
