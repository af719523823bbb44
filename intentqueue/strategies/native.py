"""The ``native-intents`` strategy: routes and rewards in the chains' own coin.

The route delivers native value (``route.nativeAmount``, paid by the solver as the
fulfill transaction's value) through plain value transfers (calls with empty calldata);
the reward is native value escrowed on the source chain. No ERC-20 token is involved,
so the execution stage sends no approval, only ``fulfill`` with value.

Not enabled by default; configure it next to the standard strategy::

    INTENTQUEUE = {
        "strategies": {
            "native-intents": {
                "class": "intentqueue.strategies.native.NativeIntentsStrategy",
                "options": {"fee": {"bps": 30}, "max_native_amount": "1000000000000000000"},
            },
        },
    }

and submit intents with ``"strategy": "native-intents"``. Options: ``fee`` (on the native
reward), ``max_native_amount`` (largest route value; default no limit), plus those of
the shared validations (``expiry_buffer_seconds``, ``supported_chains``, ``route_allow``,
``route_deny``, ``allowed_provers``, ``wallet_type``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

from intentqueue.strategies import onchain, validations
from intentqueue.strategies.base import (
    FeeBreakdown,
    Issue,
    Option,
    Strategy,
    Validation,
    parse_int,
    to_amount,
)

if TYPE_CHECKING:
    from intentqueue.models import Intent

#: Calldata of a plain value transfer.
EMPTY_CALLDATA = ("", "0x")


def native_route_total(intent: Intent) -> int:
    """The route's native amount."""
    return to_amount(intent.route_native_amount, "route_native_amount")


def native_reward_total(intent: Intent) -> int:
    """The reward's native amount."""
    return to_amount(intent.reward_native_amount, "reward_native_amount")


class NativeOnly(Validation):
    """Route and reward are native value only, delivered by plain transfers.

    No route or reward tokens; the route's native amount is positive and at most
    ``max_native_amount``; every call has empty calldata and the calls' values add up to
    the route's native amount (the portal holds nothing else to pay them from).
    """

    name = "native_only"
    options_spec: ClassVar[Mapping[str, Option]] = {
        "max_native_amount": Option(parse_int, help="largest route value in wei; default none"),
    }

    def check(self, intent: Intent, strategy: Strategy) -> list[Issue]:
        issues = []
        if intent.route_tokens:
            issues.append(self.issue(f"the route moves {len(intent.route_tokens)} token(s)"))
        if intent.reward_tokens:
            issues.append(self.issue(f"the reward holds {len(intent.reward_tokens)} token(s)"))
        route = native_route_total(intent)
        if route == 0:
            issues.append(self.issue("the route carries no native value"))
        limit = strategy.options["max_native_amount"]
        if limit is not None and route > limit:
            issues.append(self.issue(f"route value {route} exceeds the limit {limit}"))
        sent = 0
        for index, call in enumerate(intent.route_calls):
            if str(call.get("data") or "") not in EMPTY_CALLDATA:
                issues.append(self.issue(f"call {index} has calldata; only plain transfers"))
            sent += to_amount(call.get("value", 0), f"route_calls[{index}].value")
        if sent != route:
            issues.append(
                self.issue(f"the calls send {sent} wei, the route's native amount is {route}")
            )
        return issues


class NativeProfitable(Validation):
    """The native reward pays for the route and the fee: ``route <= reward - fee``."""

    name = "fee"

    def check(self, intent: Intent, strategy: Strategy) -> list[Issue]:
        fees = strategy.fee_breakdown(intent)
        if fees.profitable:
            return []
        return [
            self.issue(
                f"route value {fees.route_total} exceeds reward value {fees.reward_total} "
                f"minus fee {fees.fee}: at most {fees.max_route}, or a reward of at least "
                f"{fees.required_minimum}"
            )
        ]


class NativeIntentsStrategy(Strategy):
    """Intents whose route and reward are native value."""

    supports_quote = True
    supports_native_value = True

    validation_classes: ClassVar[Sequence[type[Validation]]] = (
        NativeOnly,
        validations.NotExpired,
        validations.SupportedChains,
        validations.RouteEnabled,
        validations.ProverAllowed,
        NativeProfitable,
        onchain.IntentFunded,
        onchain.SolverBalance,
        onchain.PortalSupported,
    )

    def can_handle(self, intent: Intent) -> bool:
        """Intents without tokens that move native value."""
        return (
            not intent.route_tokens
            and not intent.reward_tokens
            and (bool(intent.route_native_amount) or bool(intent.reward_native_amount))
        )

    def check(self) -> list[str]:
        """Warn when no chain is supported: every intent would be rejected."""
        if validations.SupportedChains.chain_ids(self):
            return []
        return [
            f"{self.settings_path}: no supported chains, every intent will be rejected "
            f"(set options.supported_chains or configure INTENTQUEUE.chains)"
        ]

    def fee_breakdown(self, intent: Intent) -> FeeBreakdown:
        """The fee arithmetic on the native amounts (wei)."""
        return FeeBreakdown.compute(
            reward_total=native_reward_total(intent),
            route_total=native_route_total(intent),
            fee=self.options["fee"],
        )
