"""The base classes of strategies and their validations.

A strategy decides whether the solver accepts an intent and what it charges for it. It
is configured under ``INTENTQUEUE["strategies"]`` and built by dotted path::

    INTENTQUEUE = {
        "strategies": {
            "standard": {
                "class": "intentqueue.strategies.standard.StandardStrategy",
                "enabled": True,
                "options": {"fee": {"flat": 10_000, "bps": 50}},
            },
        },
    }

A strategy is a list of ``Validation`` classes plus options. Each validation declares the
options it reads (``options_spec``); the strategy accepts exactly the union of those and
its own, so a typo in the settings is an error that names the option's path.

``Strategy.validate()`` runs every validation (a failing check does not hide the others),
then raises ``ValidationFailed`` with all permanent reasons, or ``TransientError`` when
only temporary issues were found. ``Strategy.quote()`` runs the same checks, minus those
flagged ``skip_in_quote``, and returns the issues with the fee breakdown instead.

Amounts are Python ints throughout. Addresses are compared lower-cased.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

from intentqueue.exceptions import TransientError, ValidationFailed

if TYPE_CHECKING:
    from intentqueue.models import Intent

#: One basis point is 1/10000.
BPS_DENOMINATOR = 10_000


class IssueKind(StrEnum):
    """How bad a validation issue is."""

    #: The intent can never pass: it becomes INVALID.
    PERMANENT = "permanent"
    #: The intent may pass later (funding not seen yet, a chain not answering): retried.
    TEMPORARY = "temporary"


@dataclass(frozen=True)
class Issue:
    """One reason an intent did not pass a validation."""

    #: ``Validation.name`` of the check that found it.
    validation: str
    #: What is wrong, with the numbers a reader needs.
    message: str
    kind: IssueKind = IssueKind.PERMANENT

    def __str__(self) -> str:
        return f"{self.validation}: {self.message}"

    def as_dict(self) -> dict[str, str]:
        """JSON-ready form."""
        return {"validation": self.validation, "message": self.message, "kind": str(self.kind)}


# --- options ---------------------------------------------------------------------------


class OptionError(ValueError):
    """A bad option value; ``at`` is the path below the option (``"flat"`` in ``fee``)."""

    def __init__(self, message: str, at: str = "") -> None:
        self.at = at
        super().__init__(message)


@dataclass(frozen=True)
class Option:
    """An option a strategy accepts: how a configured value is read, and its default.

    ``parse`` gets the configured value and returns the value the checks use (normalised:
    ints, lower-case addresses), or raises ``OptionError``/``ValueError``/``TypeError``.
    ``None`` configured for an option whose default is ``None`` means "not set".
    """

    parse: Callable[[Any], Any]
    default: Any = None
    help: str = ""


def parse_int(value: Any, *, minimum: int = 0, maximum: int | None = None) -> int:
    """An int (or a decimal string of one) within bounds; bools and floats are refused."""
    if isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"expected an integer or a decimal string, got {value!r}")
    if value < minimum:
        raise OptionError(f"must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise OptionError(f"must be at most {maximum}, got {value}")
    return value


def parse_address(value: Any) -> str:
    """A 20-byte hex address, lower-cased."""
    is_hex = isinstance(value, str) and value[:2] == "0x" and len(value) == 42
    if not is_hex or not all(c in "0123456789abcdefABCDEF" for c in value[2:]):
        raise OptionError(f"expected a 20-byte hex address (0x + 40 hex digits), got {value!r}")
    return str(value).lower()


def parse_list(value: Any, item: Callable[[Any], Any]) -> list[Any]:
    """A list (or tuple) whose items ``item`` parses; errors name the index."""
    if not isinstance(value, list | tuple):
        raise OptionError(f"expected a list, got {value!r}")
    parsed = []
    for index, entry in enumerate(value):
        try:
            parsed.append(item(entry))
        except (ValueError, TypeError) as error:
            raise OptionError(str(error), at=str(index)) from error
    return parsed


@dataclass(frozen=True)
class FeeConfig:
    """The solver's fee: ``flat + bps * reward_total // 10000`` in token units."""

    flat: int = 0
    bps: int = 0


def parse_fee(value: Any) -> FeeConfig:
    """``{"flat": int or decimal str, "bps": int in 0..9999}``, both optional."""
    if not isinstance(value, Mapping):
        raise OptionError(f"expected a dict with 'flat' and/or 'bps', got {value!r}")
    for key in value:
        if key not in ("flat", "bps"):
            raise OptionError("unknown key (allowed: bps, flat)", at=str(key))
    parsed: dict[str, int] = {}
    for key, maximum in (("flat", None), ("bps", BPS_DENOMINATOR - 1)):
        if key in value:
            try:
                parsed[key] = parse_int(value[key], maximum=maximum)
            except OptionError as error:
                raise OptionError(str(error), at=key) from error
    return FeeConfig(**parsed)


# --- amounts ----------------------------------------------------------------------------


def to_amount(value: Any, what: str) -> int:
    """An amount stored on an intent as an int; unreadable data fails the validation."""
    if isinstance(value, Decimal) and value == value.to_integral_value() and value >= 0:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit() and value.isascii():
        return int(value)
    raise ValidationFailed(f"{what}: not an amount: {value!r}")


def token_amounts(entries: Iterable[Mapping[str, Any]], what: str) -> list[tuple[str, int]]:
    """``[(lower-case token address, amount)]`` of an intent's ``route_tokens`` or
    ``reward_tokens``."""
    pairs = []
    for index, entry in enumerate(entries):
        where = f"{what}[{index}]"
        token = entry.get("token") if isinstance(entry, Mapping) else None
        if not isinstance(token, str):
            raise ValidationFailed(f"{where}.token: not an address: {token!r}")
        pairs.append((token.lower(), to_amount(entry.get("amount"), f"{where}.amount")))
    return pairs


def total(entries: Iterable[Mapping[str, Any]], what: str) -> int:
    """The sum of the amounts of token entries."""
    return sum(amount for _, amount in token_amounts(entries, what))


# --- results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationReport:
    """What a validation run did: the checks that passed, those skipped, the issues."""

    strategy: str
    passed: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    issues: tuple[Issue, ...] = ()

    @property
    def ok(self) -> bool:
        """No issue at all."""
        return not self.issues

    @property
    def permanent(self) -> list[Issue]:
        """The issues that make the intent INVALID."""
        return [issue for issue in self.issues if issue.kind == IssueKind.PERMANENT]

    @property
    def temporary(self) -> list[Issue]:
        """The issues that may go away on a retry."""
        return [issue for issue in self.issues if issue.kind == IssueKind.TEMPORARY]

    def raise_for_issues(self) -> None:
        """``ValidationFailed`` (all permanent reasons), else ``TransientError``, else
        nothing."""
        if permanent := self.permanent:
            raise ValidationFailed([str(issue) for issue in permanent])
        if temporary := self.temporary:
            raise TransientError("; ".join(str(issue) for issue in temporary))


@dataclass(frozen=True)
class FeeBreakdown:
    """The fee arithmetic of one intent, in token units (all ints).

    The route is profitable when ``route_total <= reward_total - fee``, where
    ``fee = flat_fee + bps * reward_total // 10000``.
    """

    reward_total: int
    route_total: int
    flat_fee: int
    bps: int
    bps_fee: int
    #: The smallest reward total that pays for this route and the fee.
    required_minimum: int

    @property
    def fee(self) -> int:
        """Flat fee plus the basis-point fee."""
        return self.flat_fee + self.bps_fee

    @property
    def max_route(self) -> int:
        """The largest route the reward pays for after the fee."""
        return self.reward_total - self.fee

    @property
    def margin(self) -> int:
        """What is left of the reward after the route and the fee (negative: a loss)."""
        return self.max_route - self.route_total

    @property
    def profitable(self) -> bool:
        """The reward covers the route and the fee."""
        return self.margin >= 0

    @classmethod
    def compute(cls, reward_total: int, route_total: int, fee: FeeConfig) -> FeeBreakdown:
        """The breakdown for the given totals under ``fee``."""
        return cls(
            reward_total=reward_total,
            route_total=route_total,
            flat_fee=fee.flat,
            bps=fee.bps,
            bps_fee=fee.bps * reward_total // BPS_DENOMINATOR,
            required_minimum=required_reward(route_total, fee),
        )


def required_reward(route_total: int, fee: FeeConfig) -> int:
    """The smallest ``R`` with ``R - flat - bps * R // 10000 >= route_total``."""
    target = route_total + fee.flat
    if target == 0:
        return 0

    def covers(reward: int) -> bool:
        return reward - fee.bps * reward // BPS_DENOMINATOR >= target

    # R - bps*R/10000 >= target at the upper bound; the floor may let a smaller R pass.
    low, high = target, -(-target * BPS_DENOMINATOR // (BPS_DENOMINATOR - fee.bps))
    while low < high:
        middle = (low + high) // 2
        if covers(middle):
            high = middle
        else:
            low = middle + 1
    return low


@dataclass(frozen=True)
class Quote(FeeBreakdown):
    """A strategy's answer to "would you fulfil this, and at what fee?".

    The fee breakdown plus the issues the quote-mode validations found; nothing raised.
    """

    strategy: str = ""
    issues: tuple[Issue, ...] = ()
    #: Validations that did not run in quote mode.
    skipped: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """No issue: the solver would take the intent as it stands."""
        return not self.issues

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form; amounts are decimal strings (they overflow JS numbers)."""
        amounts = ("reward_total", "route_total", "flat_fee", "bps_fee", "required_minimum")
        data: dict[str, Any] = {name: str(getattr(self, name)) for name in amounts}
        data.update(
            strategy=self.strategy,
            bps=self.bps,
            fee=str(self.fee),
            max_route=str(self.max_route),
            margin=str(self.margin),
            profitable=self.profitable,
            ok=self.ok,
            issues=[issue.as_dict() for issue in self.issues],
            skipped=list(self.skipped),
        )
        return data


# --- validations ------------------------------------------------------------------------


class Validation(ABC):
    """One check of an intent. Subclasses set ``name`` and implement ``check()``.

    Validations are stateless; they read their options from ``strategy.options``. A check
    may also raise ``ValidationFailed`` (recorded as permanent issues) or
    ``TransientError`` (recorded as a temporary issue); other exceptions propagate.
    """

    #: Identifies the check in issues and reports.
    name: ClassVar[str]
    #: The check reads a chain (funding, balances): callers without a chain skip it.
    on_chain: ClassVar[bool] = False
    #: Quote mode does not run it (funding is not expected before a quote).
    skip_in_quote: ClassVar[bool] = False
    #: Options this check reads, merged into the strategy's accepted options.
    options_spec: ClassVar[Mapping[str, Option]] = {}

    @abstractmethod
    def check(self, intent: Intent, strategy: Strategy) -> list[Issue]:
        """The issues found in ``intent``; an empty list when it passes."""

    def issue(self, message: str, kind: IssueKind = IssueKind.PERMANENT) -> Issue:
        """An issue of this validation."""
        return Issue(self.name, message, kind)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


# --- strategies -------------------------------------------------------------------------


class Strategy(ABC):
    """A named, configured set of validations and a fee policy.

    Subclasses list their validations in ``validation_classes`` (or override
    ``validations()``) and implement ``can_handle()``. ``__init__`` validates the
    options and raises ``ImproperlyConfigured`` naming the option path; unknown options
    are errors. Instances are cached by the registry and shared: keep them stateless.
    """

    #: ``quote()`` gives meaningful numbers for this strategy.
    supports_quote: ClassVar[bool] = True
    #: Routes that deliver native value (the chain's coin) are acceptable.
    supports_native_value: ClassVar[bool] = False

    #: The validations ``validations()`` instantiates, in the order they run.
    validation_classes: ClassVar[Sequence[type[Validation]]] = ()
    #: Options of the strategy itself; those of ``validation_classes`` are added.
    options_spec: ClassVar[Mapping[str, Option]] = {
        "fee": Option(
            parse_fee,
            default=FeeConfig(),
            help='{"flat": amount, "bps": basis points of the reward}',
        ),
    }

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        self.name = name
        self.options: dict[str, Any] = self.clean_options(options)

    @property
    def settings_path(self) -> str:
        """Where this strategy is configured, for messages."""
        return f"INTENTQUEUE.strategies.{self.name}"

    @classmethod
    def accepted_options(cls) -> dict[str, Option]:
        """Every option the strategy accepts: its own and those of its validations."""
        accepted = dict(cls.options_spec)
        for validation in cls.validation_classes:
            accepted.update(validation.options_spec)
        return accepted

    def clean_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The parsed options with defaults filled in; ``ImproperlyConfigured`` on errors."""
        where = f"{self.settings_path}.options"
        if not isinstance(options, Mapping):
            raise ImproperlyConfigured(f"{where}: expected a dict, got {options!r}")
        accepted = self.accepted_options()
        for key in options:
            if key not in accepted:
                allowed = ", ".join(sorted(accepted)) or "none"
                raise ImproperlyConfigured(f"{where}.{key}: unknown option (allowed: {allowed})")
        cleaned: dict[str, Any] = {}
        for key, spec in accepted.items():
            value = options.get(key)
            if key not in options or (value is None and spec.default is None):
                cleaned[key] = spec.default
                continue
            try:
                cleaned[key] = spec.parse(value)
            except (ValueError, TypeError) as error:
                at = getattr(error, "at", "")
                path = f"{where}.{key}.{at}" if at else f"{where}.{key}"
                raise ImproperlyConfigured(f"{path}: {error}") from error
        return cleaned

    @abstractmethod
    def can_handle(self, intent: Intent) -> bool:
        """Whether this strategy is meant for ``intent`` at all (not whether it passes)."""

    def validations(self) -> list[Validation]:
        """The validations to run, in order."""
        return [validation() for validation in self.validation_classes]

    def check(self) -> list[str]:
        """Configuration problems worth reporting at start-up (the options parsed)."""
        return []

    def run_validations(
        self, intent: Intent, *, quote: bool = False, on_chain: bool = True
    ) -> ValidationReport:
        """Run the validations and collect every issue; raises nothing for issues.

        ``quote`` skips validations flagged ``skip_in_quote``; ``on_chain=False`` skips
        those that read a chain. The on-chain ones run concurrently, in threads (each
        mostly waits on RPC), while the others run here; the report lists everything in
        the order of ``validations()``.
        """
        skipped: list[str] = []
        to_run: list[Validation] = []
        for validation in self.validations():
            if (quote and validation.skip_in_quote) or (validation.on_chain and not on_chain):
                skipped.append(validation.name)
            else:
                to_run.append(validation)
        remote = [v for v in to_run if v.on_chain]
        found: dict[int, list[Issue]] = {}
        with ThreadPoolExecutor(
            max_workers=max(1, len(remote)), thread_name_prefix="validation"
        ) as pool:
            futures = {id(v): pool.submit(self._issues_of, v, intent) for v in remote}
            for validation in to_run:
                if not validation.on_chain:
                    found[id(validation)] = self._issues_of(validation, intent)
            for validation in remote:  # raises the first error of a remote check, in order
                found[id(validation)] = futures[id(validation)].result()
        passed = [v.name for v in to_run if not found[id(v)]]
        issues = [issue for v in to_run for issue in found[id(v)]]
        return ValidationReport(self.name, tuple(passed), tuple(skipped), tuple(issues))

    def _issues_of(self, validation: Validation, intent: Intent) -> list[Issue]:
        """The issues one validation finds; ``ValidationFailed`` and ``TransientError``
        become issues, other exceptions propagate."""
        try:
            return list(validation.check(intent, self))
        except ValidationFailed as error:
            return [validation.issue(reason) for reason in error.reasons]
        except TransientError as error:
            return [validation.issue(str(error), IssueKind.TEMPORARY)]

    def validate(self, intent: Intent, *, on_chain: bool = True) -> ValidationReport:
        """Run every validation; raise if any found an issue, else return the report.

        Raises ``ValidationFailed`` with every permanent reason when there is one, else
        ``TransientError`` with the temporary reasons.
        """
        report = self.run_validations(intent, on_chain=on_chain)
        report.raise_for_issues()
        return report

    def fee_breakdown(self, intent: Intent) -> FeeBreakdown:
        """The fee arithmetic of ``intent`` under this strategy's ``fee`` option."""
        return FeeBreakdown.compute(
            reward_total=total(intent.reward_tokens, "reward_tokens"),
            route_total=total(intent.route_tokens, "route_tokens"),
            fee=self.options["fee"],
        )

    def quote(self, intent: Intent, *, on_chain: bool = True) -> Quote:
        """The fee breakdown and the issues of the quote-mode validations.

        Issues are returned, not raised; ``ValidationFailed`` is raised only when the
        intent's token amounts cannot be read at all.
        """
        report = self.run_validations(intent, quote=True, on_chain=on_chain)
        fees = self.fee_breakdown(intent)
        numbers = {f.name: getattr(fees, f.name) for f in dataclasses.fields(FeeBreakdown)}
        return Quote(**numbers, strategy=self.name, issues=report.issues, skipped=report.skipped)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def now_seconds() -> int:
    """The current time in unix seconds (deadlines are stored so)."""
    return int(timezone.now().timestamp())
