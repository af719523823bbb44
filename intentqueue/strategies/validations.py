"""The off-chain validations of the standard strategy.

Each class is one rule of the original solver's standard strategy, reading its options
from ``strategy.options`` (declared in ``options_spec``, parsed when the strategy is
built). All of them are permanent: an intent that fails one can never pass it later.
The checks that read a chain (funding on the source chain, the solver's balance) are
``on_chain`` validations of their own.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from intentqueue.strategies.base import (
    Issue,
    Option,
    OptionError,
    Validation,
    now_seconds,
    parse_address,
    parse_int,
    parse_list,
    to_amount,
    token_amounts,
)

if TYPE_CHECKING:
    from intentqueue.models import Intent
    from intentqueue.strategies.base import Strategy

#: ``bytes4(keccak256("transfer(address,uint256)"))``
TRANSFER_SELECTOR = "0xa9059cbb"
_TRANSFER_ARGS = re.compile(r"[0-9a-fA-F]{128}")

#: A route rule: (source, destination); ``None`` is the wildcard ``*``.
RouteRule = tuple[int | None, int | None]


def decode_transfer(data: Any) -> tuple[str, int] | None:
    """``(recipient, amount)`` of ERC-20 ``transfer`` calldata, or ``None`` when ``data`` is
    not exactly one such call (selector + two 32-byte words, a clean address word)."""
    if not isinstance(data, str) or data[:10].lower() != TRANSFER_SELECTOR:
        return None
    args = data[10:]
    if not _TRANSFER_ARGS.fullmatch(args) or int(args[:64], 16) >> 160:
        return None
    return "0x" + args[24:64].lower(), int(args[64:], 16)


# --- option parsers --------------------------------------------------------------------


def parse_chain_id(value: Any) -> int:
    """A chain id: a positive int or a decimal string of one."""
    return parse_int(value, minimum=1)


def parse_route_rule(value: Any) -> RouteRule:
    """``"src:dst"`` where either side is a chain id or ``*``."""
    sides = value.split(":") if isinstance(value, str) else []
    if len(sides) != 2:
        raise OptionError(f'expected "source:destination" (chain ids or *), got {value!r}')
    source, destination = (None if side.strip() == "*" else parse_chain_id(side) for side in sides)
    return source, destination


def parse_allowed_tokens(value: Any) -> dict[int, frozenset[str]]:
    """``{"<destination chain id>": [token address, ...]}``."""
    if not isinstance(value, Mapping):
        raise OptionError(f"expected a dict of chain id -> token addresses, got {value!r}")
    parsed: dict[int, frozenset[str]] = {}
    for key, tokens in value.items():
        try:
            parsed[parse_chain_id(key)] = frozenset(parse_list(tokens, parse_address))
        except OptionError as error:
            raise OptionError(str(error), at=f"{key}.{error.at}".rstrip(".")) from error
    return parsed


def parse_token_limits(value: Any) -> dict[str, int]:
    """``{token address (any case): max amount (int or decimal string)}``."""
    if not isinstance(value, Mapping):
        raise OptionError(f"expected a dict of token address -> max amount, got {value!r}")
    parsed: dict[str, int] = {}
    for key, limit in value.items():
        try:
            token = parse_address(key)
            if token in parsed:
                raise OptionError("the same token is listed twice (addresses ignore case)")
            parsed[token] = parse_int(limit)
        except OptionError as error:
            raise OptionError(str(error), at=str(key)) from error
    return parsed


def parse_addresses(value: Any) -> frozenset[str]:
    """A list of addresses, as a lower-case set."""
    return frozenset(parse_list(value, parse_address))


def configured_chain_ids() -> set[int]:
    """The ids of every configured chain: ``INTENTQUEUE["chains"]`` and the dev chain state
    file (``intentqueue.chain.config``)."""
    from intentqueue.chain.config import configured_chain_ids as chain_ids

    return chain_ids()


# --- validations -----------------------------------------------------------------------


class NoDuplicateRewardTokens(Validation):
    """Each reward token is listed once; a repeated token is a malformed reward."""

    name = "duplicate_reward_tokens"

    def check(self, intent: Intent, strategy: Strategy) -> list[Issue]:
        counts = Counter(token for token, _ in token_amounts(intent.reward_tokens, "reward_tokens"))
        return [
            self.issue(f"reward token {token} is listed {count} times")
            for token, count in sorted(counts.items())
            if count > 1
        ]


class NotExpired(Validation):
    """Both deadlines leave at least ``expiry_buffer_seconds`` to fulfil and prove."""

    name = "expiry"
    options_spec: ClassVar[Mapping[str, Option]] = {
        "expiry_buffer_seconds": Option(
            parse_int, default=300, help="seconds a deadline must lie beyond now"
        ),
    }

    def check(self, intent: Intent, strategy: Strategy) -> list[Issue]:
        buffer = strategy.options["expiry_buffer_seconds"]
        limit = now_seconds() + buffer
        deadlines = (("reward", intent.reward_deadline), ("route", intent.route_deadline))
        return [
            self.issue(f"{what} deadline {deadline} is not later than now + {buffer}s ({limit})")
            for what, deadline in deadlines
            if deadline <= limit
        ]


class SupportedChains(Validation):
    """Source and destination are chains the solver serves, and they differ.

    The chains are the ``supported_chains`` option, or when it is not set, the chains
    configured in ``INTENTQUEUE["chains"]``.
    """

    name = "supported_chains"
    options_spec: ClassVar[Mapping[str, Option]] = {
        "supported_chains": Option(
            lambda value: frozenset(parse_list(value, parse_chain_id)),
            help="chain ids; default: the keys of INTENTQUEUE['chains']",
        ),
    }

    @staticmethod
    def chain_ids(strategy: Strategy) -> set[int]:
        """The chains ``strategy`` accepts."""
        configured = strategy.options["supported_chains"]
        return set(configured) if configured is not None else configured_chain_ids()

    def check(self, intent: Intent, strategy: Strategy) -> list[Issue]:
        supported = self.chain_ids(strategy)
        shown = ", ".join(map(str, sorted(supported))) or "none"
        issues = [
            self.issue(f"{what} chain {chain} is not supported (supported: {shown})")
            for what, chain in (
                ("source", intent.source_chain_id),
                ("destination", intent.destination_chain_id),
            )
            if chain not in supported
        ]
        if intent.source_chain_id == intent.destination_chain_id:
            issues.append(
                self.issue(f"source and destination are both chain {intent.source_chain_id}")
            )
        return issues


class RouteEnabled(Validation):
    """The route ``source:destination`` passes the allow and deny lists.

    ``route_deny`` wins over ``route_allow``; an empty or absent allow list allows every
    route that is not denied. Either side of a rule may be ``*``.
    """

    name = "route_enabled"
    options_spec: ClassVar[Mapping[str, Option]] = {
        "route_allow": Option(lambda value: parse_list(value, parse_route_rule)),
        "route_deny": Option(lambda value: parse_list(value, parse_route_rule)),
    }

    @staticmethod
    def matches(rule: RouteRule, source: int, destination: int) -> bool:
        """Whether ``rule`` covers the route."""
        return rule[0] in (None, source) and rule[1] in (None, destination)

    def check(self, intent: Intent, strategy: Strategy) -> list[Issue]:
        route = (intent.source_chain_id, intent.destination_chain_id)
        allow = strategy.options["route_allow"] or []
        if any(self.matches(rule, *route) for rule in strategy.options["route_deny"] or []):
            return [self.issue(f"route {route[0]}:{route[1]} is denied")]
        if allow and not any(self.matches(rule, *route) for rule in allow):
            return [self.issue(f"route {route[0]}:{route[1]} is not in the allow list")]
        return []


class RouteTokens(Validation):
    """The route only moves allowed ERC-20 tokens, by plain ``transfer`` calls.

    Every route token is in ``allowed_tokens[destination chain]`` (when the option is
    set; a chain missing from it allows no token), no native value is sent (unless the
    strategy ``supports_native_value``), and every call is ``transfer(address,uint256)``
    with exactly 4 + 64 bytes of calldata on one of the route's tokens.
    """

    name = "route_tokens"
    options_spec: ClassVar[Mapping[str, Option]] = {
        "allowed_tokens": Option(
            parse_allowed_tokens, help='{"<destination chain id>": [token address, ...]}'
        ),
    }

    def check(self, intent: Intent, strategy: Strategy) -> list[Issue]:
        tokens = {token for token, _ in token_amounts(intent.route_tokens, "route_tokens")}
        issues = self.allowed(tokens, intent.destination_chain_id, strategy)
        native = to_amount(intent.route_native_amount, "route_native_amount")
        if native and not strategy.supports_native_value:
            issues.append(self.issue(f"the route carries native value {native}"))
        for index, call in enumerate(intent.route_calls):
            value = to_amount(call.get("value", 0), f"route_calls[{index}].value")
            target = str(call.get("target", "")).lower()
            if value and not strategy.supports_native_value:
                issues.append(self.issue(f"call {index} sends native value {value}"))
            if decode_transfer(call.get("data")) is None:
                issues.append(
                    self.issue(f"call {index} is not an ERC-20 transfer(address,uint256)")
                )
            elif target not in tokens:
                issues.append(self.issue(f"call {index} targets {target}, not a route token"))
        return issues

    def allowed(self, tokens: set[str], chain: int, strategy: Strategy) -> list[Issue]:
        """Issues for route tokens outside the allow-list of ``chain``."""
        allowed_tokens = strategy.options["allowed_tokens"]
        if allowed_tokens is None:
            return []
        permitted = allowed_tokens.get(chain, frozenset())
        return [
            self.issue(f"route token {token} is not allowed on chain {chain}")
            for token in sorted(tokens - permitted)
        ]


class AmountLimits(Validation):
    """Route amounts stay within ``token_limits``, and the transfers within the route.

    Amounts of a token listed twice are added up. Transfers to tokens that are not in
    the route are ``RouteTokens``' concern and are not counted here.
    """

    name = "amount_limits"
    options_spec: ClassVar[Mapping[str, Option]] = {
        "token_limits": Option(parse_token_limits, help="{token address: max amount}"),
    }

    def check(self, intent: Intent, strategy: Strategy) -> list[Issue]:
        limits = strategy.options["token_limits"] or {}
        route: defaultdict[str, int] = defaultdict(int)
        for token, amount in token_amounts(intent.route_tokens, "route_tokens"):
            route[token] += amount
        issues = [
            self.issue(f"route amount {amount} of {token} exceeds the limit {limits[token]}")
            for token, amount in route.items()
            if token in limits and amount > limits[token]
        ]
        sent: defaultdict[str, int] = defaultdict(int)
        for call in intent.route_calls:
            transfer, target = decode_transfer(call.get("data")), str(call.get("target")).lower()
            if transfer is not None and target in route:
                sent[target] += transfer[1]
        issues += [
            self.issue(
                f"transfers of {token} add up to {amount}, more than the route's {route[token]}"
            )
            for token, amount in sent.items()
            if amount > route[token]
        ]
        return issues


class ProverAllowed(Validation):
    """The reward's prover is one of ``allowed_provers`` (any prover when not set)."""

    name = "prover_allowed"
    options_spec: ClassVar[Mapping[str, Option]] = {
        "allowed_provers": Option(parse_addresses, help="prover addresses; default: any"),
    }

    def check(self, intent: Intent, strategy: Strategy) -> list[Issue]:
        allowed = strategy.options["allowed_provers"]
        if allowed is None or intent.reward_prover.lower() in allowed:
            return []
        return [self.issue(f"prover {intent.reward_prover} is not allowed")]


class Profitable(Validation):
    """The reward pays for the route and the fee: ``route <= reward - fee``.

    Like the original, token amounts of different tokens are added as if they had the
    same unit (stablecoins of equal decimals). The fee is the strategy's ``fee`` option.
    """

    name = "fee"

    def check(self, intent: Intent, strategy: Strategy) -> list[Issue]:
        fees = strategy.fee_breakdown(intent)
        if fees.profitable:
            return []
        return [
            self.issue(
                f"route total {fees.route_total} exceeds reward total {fees.reward_total} "
                f"minus fee {fees.fee} (flat {fees.flat_fee} + {fees.bps} bps = {fees.bps_fee}):"
                f" at most {fees.max_route}, or a reward of at least {fees.required_minimum}"
            )
        ]
