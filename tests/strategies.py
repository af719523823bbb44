"""Strategies for tests: each fails or waits in a chosen way, through the real pipeline."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar

from intentqueue.exceptions import NetworkError, PermanentError, TransientError
from intentqueue.models import Intent
from intentqueue.strategies.base import Option, Strategy, ValidationReport, parse_int
from intentqueue.strategies.standard import StandardStrategy

ERRORS = {"transient": TransientError, "network": NetworkError, "permanent": PermanentError}


def _parse_text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


class ScriptedStrategy(Strategy):
    """Fails with ``fail`` (transient/network/permanent/crash) on its first ``fail_times``
    runs for each intent, sleeping ``sleep_ms`` first; then accepts the intent."""

    options_spec: ClassVar[Mapping[str, Option]] = {
        "fail": Option(_parse_text, default="none"),
        "fail_times": Option(parse_int, default=0),
        "sleep_ms": Option(parse_int, default=0),
    }

    def can_handle(self, intent: Intent) -> bool:
        return True

    def validate(self, intent: Intent, *, on_chain: bool = True) -> ValidationReport:
        time.sleep(self.options["sleep_ms"] / 1000)
        runs = intent.timeline.filter(to_status="VALIDATING", error="").count()
        kind = self.options["fail"]
        if kind != "none" and runs <= self.options["fail_times"]:
            if kind == "crash":
                raise RuntimeError(f"unexpected crash on run {runs}")
            raise ERRORS[kind](f"{kind} failure on run {runs}")
        return ValidationReport(strategy=self.name, passed=[], skipped=[], issues=[])


class OffChainStandardStrategy(StandardStrategy):
    """The standard strategy without its on-chain validations, for tests that configure
    no chain (those validations are tested against dev chains in test_chain_validations)."""

    validation_classes: ClassVar = tuple(
        v for v in StandardStrategy.validation_classes if not v.on_chain
    )
