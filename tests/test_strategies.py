"""Strategies: each standard validation, issue aggregation, quotes and the registry."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from intentqueue.exceptions import TransientError, UnknownStrategyError, ValidationFailed
from intentqueue.models import Intent
from intentqueue.strategies import (
    Issue,
    IssueKind,
    Strategy,
    Validation,
    check_strategies,
    get_strategy,
    strategy_names,
)
from intentqueue.strategies.base import FeeConfig, required_reward
from intentqueue.strategies.standard import StandardStrategy
from intentqueue.strategies.validations import (
    AmountLimits,
    NoDuplicateRewardTokens,
    NotExpired,
    Profitable,
    ProverAllowed,
    RouteEnabled,
    RouteTokens,
    SupportedChains,
    decode_transfer,
)
from tests.factories import PROVER, RECIPIENT, TOKEN, IntentFactory, transfer_data
from tests.strategies import OffChainStandardStrategy

pytestmark = pytest.mark.django_db

OTHER_TOKEN = "0x" + "66" * 20
STANDARD = "intentqueue.strategies.standard.StandardStrategy"


def standard(**options: Any) -> StandardStrategy:
    """The standard strategy serving chains 1 and 10 unless told otherwise, without its
    on-chain validations: these tests configure no chain to read."""
    options.setdefault("supported_chains", [1, 10])
    return OffChainStandardStrategy("standard", options)


def issues(validation: type[Validation], intent: Intent, **options: Any) -> list[Issue]:
    return validation().check(intent, standard(**options))


def messages(found: list[Issue]) -> list[str]:
    return [issue.message for issue in found]


def shout(address: str) -> str:
    """The address in upper-case hex (addresses compare case-insensitively)."""
    return "0x" + address[2:].upper()


def transfer(token: str, amount: int, recipient: str = RECIPIENT) -> dict[str, str]:
    return {"target": token, "data": transfer_data(recipient, amount), "value": "0"}


@pytest.fixture
def configure() -> Iterator[Any]:
    """Override ``INTENTQUEUE`` (keeping the test's Redis) for the rest of the test."""
    overrides: list[override_settings] = []

    def apply(**values: Any) -> None:
        override = override_settings(INTENTQUEUE={**settings.INTENTQUEUE, **values})
        override.enable()
        overrides.append(override)

    yield apply
    for override in reversed(overrides):
        override.disable()


# --- strategies used by the tests ---------------------------------------------------------


class FundingNotSeen(Validation):
    """Stands in for the on-chain funding check: always temporarily failing."""

    name = "funded"
    on_chain = True
    skip_in_quote = True

    def check(self, intent: Intent, strategy: Strategy) -> list[Issue]:
        return [self.issue("funding not seen yet", IssueKind.TEMPORARY)]


class RpcTimeout(Validation):
    """A check whose chain read times out."""

    name = "balance"

    def check(self, intent: Intent, strategy: Strategy) -> list[Issue]:
        raise TransientError("rpc timeout")


class FundedStandardStrategy(OffChainStandardStrategy):
    """The standard checks plus the (temporary) funding check."""

    validation_classes: ClassVar = (*OffChainStandardStrategy.validation_classes, FundingNotSeen)


class ChainOnlyStrategy(Strategy):
    """Only checks that fail temporarily."""

    validation_classes: ClassVar = (FundingNotSeen, RpcTimeout)

    def can_handle(self, intent: Intent) -> bool:
        return intent.destination_chain_id == 10


# --- the validations ----------------------------------------------------------------------


def test_the_factory_intent_passes_every_standard_validation() -> None:
    report = standard().validate(IntentFactory.build())
    assert report.passed == (
        "duplicate_reward_tokens",
        "expiry",
        "supported_chains",
        "route_enabled",
        "route_tokens",
        "amount_limits",
        "prover_allowed",
        "fee",
    )
    assert report.ok and report.skipped == () and report.issues == ()


def test_standard_strategy_handles_any_intent() -> None:
    assert standard().can_handle(IntentFactory.build(destination_chain_id=999))


def test_duplicate_reward_tokens() -> None:
    assert issues(NoDuplicateRewardTokens, IntentFactory.build()) == []
    reward = [
        {"token": TOKEN, "amount": "1"},
        {"token": TOKEN.upper().replace("0X", "0x"), "amount": "2"},
        {"token": OTHER_TOKEN, "amount": "3"},
    ]
    found = issues(NoDuplicateRewardTokens, IntentFactory.build(reward_tokens=reward))
    assert found == [
        Issue("duplicate_reward_tokens", f"reward token {TOKEN} is listed 2 times"),
    ]
    assert found[0].kind == IssueKind.PERMANENT


def test_expiry_uses_the_buffer_for_both_deadlines() -> None:
    now = int(time.time())
    fresh = IntentFactory.build(route_deadline=now + 400, reward_deadline=now + 400)
    assert issues(NotExpired, fresh) == []
    assert len(issues(NotExpired, fresh, expiry_buffer_seconds=600)) == 2

    late_route = IntentFactory.build(route_deadline=now + 100, reward_deadline=now + 4000)
    [issue] = issues(NotExpired, late_route)
    assert issue.message.startswith(f"route deadline {now + 100} is not later than now + 300s")

    late_reward = IntentFactory.build(route_deadline=now + 4000, reward_deadline=now - 5)
    assert messages(issues(NotExpired, late_reward))[0].startswith("reward deadline")


def test_supported_chains_from_the_option() -> None:
    assert issues(SupportedChains, IntentFactory.build()) == []
    found = issues(SupportedChains, IntentFactory.build(), supported_chains=[10, 137])
    assert messages(found) == ["source chain 1 is not supported (supported: 10, 137)"]


def test_supported_chains_default_to_the_configured_chains(configure: Any) -> None:
    intent = IntentFactory.build(destination_chain_id=137)
    strategy = StandardStrategy("standard", {})
    assert messages(SupportedChains().check(intent, strategy)) == [
        "source chain 1 is not supported (supported: none)",
        "destination chain 137 is not supported (supported: none)",
    ]
    configure(chains={"1": {}, "137": {}})
    assert SupportedChains().check(intent, strategy) == []


def test_source_and_destination_must_differ() -> None:
    found = issues(SupportedChains, IntentFactory.build(destination_chain_id=1))
    assert messages(found) == ["source and destination are both chain 1"]


@pytest.mark.parametrize(
    ("allow", "deny", "expected"),
    [
        (None, None, None),
        ([], [], None),
        (["1:10"], None, None),
        (["*:10"], None, None),
        (["1:*"], ["*:137"], None),
        (["2:10", "1:137"], None, "route 1:10 is not in the allow list"),
        (None, ["1:10"], "route 1:10 is denied"),
        (["1:10"], ["*:10"], "route 1:10 is denied"),
        (["*:*"], ["1:*"], "route 1:10 is denied"),
    ],
)
def test_route_allow_and_deny_lists(
    allow: list[str] | None, deny: list[str] | None, expected: str | None
) -> None:
    found = issues(RouteEnabled, IntentFactory.build(), route_allow=allow, route_deny=deny)
    assert messages(found) == ([expected] if expected else [])


def test_route_tokens_allow_list_per_destination_chain() -> None:
    intent = IntentFactory.build()
    assert issues(RouteTokens, intent) == []
    assert issues(RouteTokens, intent, allowed_tokens={"10": [shout(TOKEN)]}) == []
    found = issues(RouteTokens, intent, allowed_tokens={"10": [OTHER_TOKEN]})
    assert messages(found) == [f"route token {TOKEN} is not allowed on chain 10"]
    found = issues(RouteTokens, intent, allowed_tokens={"137": [TOKEN]})
    assert messages(found) == [f"route token {TOKEN} is not allowed on chain 10"]


def test_route_calls_must_be_plain_transfers_of_route_tokens() -> None:
    call = transfer(TOKEN, 1000000)
    calls = [
        {**call, "value": "5"},
        {**call, "data": call["data"] + "00"},
        {**call, "data": "0x095ea7b3" + call["data"][10:]},
        {**call, "data": call["data"][:10] + "ff" + call["data"][12:]},
        transfer(OTHER_TOKEN, 1),
    ]
    found = issues(RouteTokens, IntentFactory.build(route_calls=calls, route_native_amount=7))
    assert messages(found) == [
        "the route carries native value 7",
        "call 0 sends native value 5",
        "call 1 is not an ERC-20 transfer(address,uint256)",
        "call 2 is not an ERC-20 transfer(address,uint256)",
        "call 3 is not an ERC-20 transfer(address,uint256)",
        f"call 4 targets {OTHER_TOKEN}, not a route token",
    ]


def test_decode_transfer() -> None:
    assert decode_transfer(transfer_data(RECIPIENT, 42)) == (RECIPIENT, 42)
    assert decode_transfer(transfer_data(RECIPIENT, 42).upper().replace("0X", "0x")) == (
        RECIPIENT,
        42,
    )
    assert decode_transfer("0xa9059cbb") is None
    assert decode_transfer(None) is None
    assert decode_transfer("0xa9059cbb" + "-" + "0" * 127) is None


def test_amount_limits_per_token() -> None:
    intent = IntentFactory.build()
    assert issues(AmountLimits, intent) == []
    assert issues(AmountLimits, intent, token_limits={shout(TOKEN): 1000000}) == []
    assert issues(AmountLimits, intent, token_limits={OTHER_TOKEN: 1}) == []
    found = issues(AmountLimits, intent, token_limits={TOKEN: "999999"})
    assert messages(found) == [f"route amount 1000000 of {TOKEN} exceeds the limit 999999"]


def test_transfers_must_not_exceed_the_route_amount() -> None:
    calls = [transfer(TOKEN, 600000), transfer(TOKEN, 400000)]
    assert issues(AmountLimits, IntentFactory.build(route_calls=calls)) == []
    calls.append(transfer(TOKEN, 1))
    found = issues(AmountLimits, IntentFactory.build(route_calls=calls))
    assert messages(found) == [
        f"transfers of {TOKEN} add up to 1000001, more than the route's 1000000"
    ]


def test_prover_allowed() -> None:
    intent = IntentFactory.build()
    assert issues(ProverAllowed, intent) == []
    assert issues(ProverAllowed, intent, allowed_provers=[shout(PROVER)]) == []
    found = issues(ProverAllowed, intent, allowed_provers=[OTHER_TOKEN])
    assert messages(found) == [f"prover {PROVER} is not allowed"]


def test_fee_profitability() -> None:
    intent = IntentFactory.build()  # route 1_000_000, reward 1_100_000
    assert issues(Profitable, intent) == []
    assert issues(Profitable, intent, fee={"flat": "100000"}) == []
    found = issues(Profitable, intent, fee={"flat": 50_000, "bps": 500})
    assert messages(found) == [
        "route total 1000000 exceeds reward total 1100000 minus fee 105000 "
        "(flat 50000 + 500 bps = 55000): at most 995000, or a reward of at least 1105263"
    ]


def test_unreadable_amounts_are_permanent_issues() -> None:
    intent = IntentFactory.build()
    intent.reward_tokens = [{"token": TOKEN, "amount": "1.5"}]
    with pytest.raises(ValidationFailed) as failed:
        standard().validate(intent)
    assert "duplicate_reward_tokens: reward_tokens[0].amount: not an amount: '1.5'" in (
        failed.value.reasons
    )


# --- aggregation ------------------------------------------------------------------------


def test_permanent_failures_are_reported_together() -> None:
    intent = IntentFactory.build(
        reward_tokens=[{"token": TOKEN, "amount": "1"}, {"token": TOKEN, "amount": "1"}],
        reward_prover=OTHER_TOKEN,
    )
    with pytest.raises(ValidationFailed) as failed:
        standard(allowed_provers=[PROVER]).validate(intent)
    assert failed.value.reasons == [
        f"duplicate_reward_tokens: reward token {TOKEN} is listed 2 times",
        f"prover_allowed: prover {OTHER_TOKEN} is not allowed",
        "fee: route total 1000000 exceeds reward total 2 minus fee 0 "
        "(flat 0 + 0 bps = 0): at most 2, or a reward of at least 1000000",
    ]


def test_temporary_issues_alone_raise_a_transient_error() -> None:
    strategy = ChainOnlyStrategy("chain-only", {})
    with pytest.raises(TransientError) as raised:
        strategy.validate(IntentFactory.build())
    assert str(raised.value) == "funded: funding not seen yet; balance: rpc timeout"
    assert not isinstance(raised.value, ValidationFailed)


def test_permanent_issues_win_over_temporary_ones() -> None:
    strategy = FundedStandardStrategy("funded", {"supported_chains": [1, 10]})
    with pytest.raises(TransientError):
        strategy.validate(IntentFactory.build())
    with pytest.raises(ValidationFailed) as failed:
        strategy.validate(IntentFactory.build(reward_prover=OTHER_TOKEN, destination_chain_id=1))
    assert failed.value.reasons == ["supported_chains: source and destination are both chain 1"]


def test_on_chain_validations_can_be_left_out() -> None:
    strategy = FundedStandardStrategy("funded", {"supported_chains": [1, 10]})
    report = strategy.validate(IntentFactory.build(), on_chain=False)
    assert report.skipped == ("funded",)
    assert "fee" in report.passed and "funded" not in report.passed


def test_run_validations_returns_issues_without_raising() -> None:
    report = ChainOnlyStrategy("chain-only", {}).run_validations(IntentFactory.build())
    assert not report.ok and report.permanent == [] and len(report.temporary) == 2


# --- quotes -----------------------------------------------------------------------------


def test_quote_numbers() -> None:
    strategy = standard(fee={"flat": 10_000, "bps": 50})
    quote = strategy.quote(IntentFactory.build())
    assert (quote.reward_total, quote.route_total) == (1_100_000, 1_000_000)
    assert (quote.flat_fee, quote.bps, quote.bps_fee, quote.fee) == (10_000, 50, 5_500, 15_500)
    assert (quote.max_route, quote.margin) == (1_084_500, 84_500)
    assert quote.required_minimum == 1_015_075
    assert quote.ok and quote.profitable and quote.issues == ()
    assert quote.as_dict()["margin"] == "84500"
    assert quote.as_dict()["required_minimum"] == "1015075"


def test_quote_of_an_unprofitable_intent_returns_the_issue() -> None:
    reward = [{"token": TOKEN, "amount": "1015074"}]
    quote = standard(fee={"flat": 10_000, "bps": 50}).quote(
        IntentFactory.build(reward_tokens=reward)
    )
    assert quote.margin == -1 and not quote.profitable
    assert [issue.validation for issue in quote.issues] == ["fee"]
    assert quote.as_dict()["issues"][0]["kind"] == "permanent"


def test_quote_skips_validations_flagged_skip_in_quote() -> None:
    quote = FundedStandardStrategy("funded", {"supported_chains": [1, 10]}).quote(
        IntentFactory.build()
    )
    assert quote.ok and quote.skipped == ("funded",)


@pytest.mark.parametrize("bps", [0, 1, 50, 333, 5000, 9999])
@pytest.mark.parametrize("route", [0, 1, 7, 999_999, 10**30 + 3])
def test_required_minimum_is_the_smallest_reward_that_covers_the_route(
    route: int, bps: int
) -> None:
    fee = FeeConfig(flat=17, bps=bps)
    minimum = required_reward(route, fee)

    def covers(reward: int) -> bool:
        return route <= reward - (fee.flat + fee.bps * reward // 10_000)

    assert covers(minimum) and not covers(minimum - 1)


# --- options ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "path"),
    [
        ({"expiry_buffer": 10}, "options.expiry_buffer: unknown option"),
        ({"expiry_buffer_seconds": -1}, "options.expiry_buffer_seconds: must be at least 0"),
        ({"expiry_buffer_seconds": 1.5}, "options.expiry_buffer_seconds: expected an integer"),
        ({"supported_chains": "1,10"}, "options.supported_chains: expected a list"),
        ({"supported_chains": [1, True]}, "options.supported_chains.1: expected an integer"),
        ({"route_allow": ["1-10"]}, 'options.route_allow.0: expected "source:destination"'),
        ({"route_deny": ["1:x"]}, "options.route_deny.0: expected an integer"),
        ({"allowed_tokens": {"10": ["0x12"]}}, "options.allowed_tokens.10.0: expected a 20-byte"),
        ({"allowed_tokens": {"ten": []}}, "options.allowed_tokens.ten: expected an integer"),
        ({"token_limits": {TOKEN: 1.5}}, f"options.token_limits.{TOKEN}: expected an integer"),
        ({"allowed_provers": PROVER}, "options.allowed_provers: expected a list"),
        ({"fee": {"flat": 1, "percent": 2}}, "options.fee.percent: unknown key"),
        ({"fee": {"bps": 10_000}}, "options.fee.bps: must be at most 9999"),
        ({"fee": 5}, "options.fee: expected a dict"),
    ],
)
def test_bad_options_name_their_path(options: dict[str, Any], path: str) -> None:
    with pytest.raises(ImproperlyConfigured) as raised:
        StandardStrategy("standard", options)
    assert str(raised.value).startswith(f"INTENTQUEUE.strategies.standard.{path}")


def test_options_are_normalised() -> None:
    strategy = standard(
        token_limits={shout(TOKEN): "5"},
        route_allow=["1:*"],
        allowed_provers=None,
        fee={"flat": "3"},
    )
    assert strategy.options["token_limits"] == {TOKEN: 5}
    assert strategy.options["route_allow"] == [(1, None)]
    assert strategy.options["allowed_provers"] is None
    assert strategy.options["fee"] == FeeConfig(flat=3, bps=0)
    assert strategy.options["expiry_buffer_seconds"] == 300


# --- the registry -----------------------------------------------------------------------


def test_default_configuration_has_the_standard_strategy() -> None:
    assert strategy_names() == ["standard"]
    strategy = get_strategy("standard")
    assert isinstance(strategy, StandardStrategy) and strategy.name == "standard"
    assert get_strategy("standard") is strategy
    assert strategy.supports_quote


def test_unknown_strategy_lists_the_available_ones() -> None:
    with pytest.raises(UnknownStrategyError) as raised:
        get_strategy("crowd-liquidity")
    assert str(raised.value) == (
        "unknown or disabled strategy 'crowd-liquidity' (available: standard)"
    )


def test_disabled_strategy_is_unknown(configure: Any) -> None:
    configure(
        strategies={
            "standard": {"class": STANDARD, "enabled": False},
            "funded": {"class": "tests.test_strategies.FundedStandardStrategy"},
        },
        default_strategy="funded",
    )
    assert strategy_names() == ["funded"]
    assert isinstance(get_strategy("funded"), FundedStandardStrategy)
    with pytest.raises(UnknownStrategyError, match=r"available: funded"):
        get_strategy("standard")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"class": "intentqueue.strategies.missing.Strategy"},
            "INTENTQUEUE.strategies.broken.class: cannot import",
        ),
        (
            {"class": "intentqueue.models.Intent"},
            "INTENTQUEUE.strategies.broken.class: 'intentqueue.models.Intent' is not a subclass",
        ),
        (
            {"class": STANDARD, "options": {"fee": {"bps": -1}}},
            "INTENTQUEUE.strategies.broken.options.fee.bps: must be at least 0",
        ),
        (
            {"class": STANDARD, "option": {}},
            "INTENTQUEUE.strategies.broken.option: unknown key",
        ),
        (
            {"class": STANDARD, "enabled": "yes"},
            "INTENTQUEUE.strategies.broken.enabled: expected True or False",
        ),
    ],
)
def test_broken_configuration(configure: Any, spec: dict[str, Any], message: str) -> None:
    configure(strategies={"standard": {"class": STANDARD}, "broken": spec}, chains={"1": {}})
    assert [problem.startswith(message) for problem in check_strategies()] == [True]
    if spec.get("enabled") == "yes":
        return  # not "enabled is True": get_strategy treats it as disabled
    with pytest.raises(ImproperlyConfigured, match=f"^{message}"):
        get_strategy("broken")


def test_check_strategies_warns_when_no_chain_is_supported(configure: Any) -> None:
    assert check_strategies() == [
        "INTENTQUEUE.strategies.standard: no supported chains, every intent will be rejected "
        "(set options.supported_chains or configure INTENTQUEUE.chains)"
    ]
    configure(chains={"1": {}, "10": {}})
    assert check_strategies() == []


def test_settings_changes_rebuild_the_strategies(configure: Any) -> None:
    before = get_strategy("standard")
    assert before.options["fee"] == FeeConfig()
    configure(strategies={"standard": {"class": STANDARD, "options": {"fee": {"bps": 30}}}})
    during = get_strategy("standard")
    assert during is not before and during.options["fee"] == FeeConfig(bps=30)
    assert get_strategy("standard") is during
    configure(strategies={"standard": {"class": STANDARD}})
    assert get_strategy("standard").options["fee"] == FeeConfig()
