"""On-chain validations, quotes and the native-intents strategy against the dev chains."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from django.conf import settings
from django.test import override_settings

from intentqueue.chain.models import ChainTransaction
from intentqueue.chain.wallets import KEY_ENV, WalletNotConfigured
from intentqueue.exceptions import NetworkError, TransientError, ValidationFailed
from intentqueue.models import Intent
from intentqueue.payloads import parse_intent_payload
from intentqueue.strategies import Issue, Strategy, Validation, get_strategy
from intentqueue.strategies.native import NativeIntentsStrategy
from intentqueue.strategies.quoting import quote_payload
from intentqueue.strategies.standard import StandardStrategy
from tests.chainkit import (
    PROVER,
    RECIPIENT,
    TOKEN_UNIT,
    ChainPair,
    Solver,
    free_port,
    fund_solver,
    make_intent_parts,
    mint,
    payload,
    publish,
    reset_caches,
)
from tests.factories import transfer_data

pytestmark = pytest.mark.django_db

STRATEGIES = {
    "standard": {"class": "intentqueue.strategies.standard.StandardStrategy"},
    "native-intents": {
        "class": "intentqueue.strategies.native.NativeIntentsStrategy",
        "options": {"fee": {"bps": 100}},
    },
}
ON_CHAIN = ("intent_funded", "solver_balance", "portal_supported")


@pytest.fixture
def configure(dev_chains: ChainPair) -> Iterator[Any]:
    """Point INTENTQUEUE at the dev chains; call again to change the destination entry or
    replace the chains."""
    overrides: list[override_settings] = []

    def apply(chains: dict[str, Any] | None = None, **destination: Any) -> None:
        chains = chains if chains is not None else dev_chains.settings(**destination)
        conf = {**settings.INTENTQUEUE, "chains": chains, "strategies": STRATEGIES}
        override = override_settings(INTENTQUEUE=conf)
        override.enable()
        overrides.append(override)

    apply()
    yield apply
    for override in reversed(overrides):
        override.disable()


def intent_of(pair: ChainPair, route: dict[str, Any], reward: dict[str, Any], **kw: Any) -> Intent:
    """The intent as the fulfillment stage sees it (in memory, not saved)."""
    return Intent(**parse_intent_payload(payload(pair, route, reward, **kw)).model_fields())


def standard() -> StandardStrategy:
    return get_strategy("standard")  # type: ignore[return-value]


def test_a_funded_intent_the_solver_can_fill_passes(
    dev_chains: ChainPair, solver: Solver, configure: Any
) -> None:
    fund_solver(dev_chains, solver, tokens=10 * TOKEN_UNIT)
    route, reward = make_intent_parts(dev_chains)
    publish(dev_chains, route, reward)
    report = standard().validate(intent_of(dev_chains, route, reward))
    assert report.passed[-3:] == ON_CHAIN and report.skipped == () and report.ok


def test_not_funded_yet_and_short_balance_are_temporary(
    dev_chains: ChainPair, solver: Solver, configure: Any
) -> None:
    fund_solver(dev_chains, solver, tokens=TOKEN_UNIT)
    route, reward = make_intent_parts(dev_chains, amount=2 * TOKEN_UNIT)
    intent = intent_of(dev_chains, route, reward)
    with pytest.raises(TransientError) as raised:
        standard().validate(intent)
    portal = dev_chains.source.portal.address
    token = dev_chains.destination.token.address
    assert str(raised.value) == (
        f"intent_funded: the reward is not funded in portal {portal} on chain 31337 yet; "
        f"solver_balance: solver {solver.address} holds {TOKEN_UNIT} of {token} on chain "
        f"31338, the route needs {2 * TOKEN_UNIT}"
    )
    publish(dev_chains, route, reward)
    mint(dev_chains.destination, solver.address, TOKEN_UNIT)
    assert standard().validate(intent).ok  # the retry passes


def test_destination_rules_are_permanent_and_reported_with_the_rest(
    dev_chains: ChainPair, solver: Solver, configure: Any
) -> None:
    fund_solver(dev_chains, solver, tokens=10 * TOKEN_UNIT)
    other_token = "0x" + "66" * 20
    configure(prover="0x" + "77" * 20, tokens=[other_token])
    route, reward = make_intent_parts(dev_chains)
    publish(dev_chains, route, reward)
    intent = intent_of(dev_chains, route, reward)
    intent.route_portal = "0x" + "88" * 20
    with pytest.raises(ValidationFailed) as raised:
        standard().validate(intent)
    token = dev_chains.destination.token.address.lower()
    portal = dev_chains.destination.portal.address
    assert [r for r in raised.value.reasons if r.startswith("portal_supported")] == [
        f"portal_supported: route portal {intent.route_portal} is not the portal of chain "
        f"31338 ({portal})",
        f"portal_supported: prover {PROVER} is not the prover of chain 31338 (0x{'77' * 20})",
        f"portal_supported: route token {token} is not served on chain 31338",
    ]


def test_unconfigured_chains_are_permanent(
    dev_chains: ChainPair, solver: Solver, configure: Any
) -> None:
    fund_solver(dev_chains, solver, tokens=10 * TOKEN_UNIT)
    destination = dev_chains.settings()["31338"]
    configure({"31338": destination})
    route, reward = make_intent_parts(dev_chains)
    report = standard().run_validations(intent_of(dev_chains, route, reward))
    funded = [i for i in report.issues if i.validation == "intent_funded"]
    assert [str(i) for i in funded] == [
        "intent_funded: source chain 31337 is not configured (INTENTQUEUE['chains']['31337'] "
        "with rpc_url and portal)"
    ]
    assert "solver_balance" in report.passed and "portal_supported" in report.passed


def test_an_unreachable_chain_raises_a_network_error(
    dev_chains: ChainPair, solver: Solver, configure: Any
) -> None:
    chains = dev_chains.settings()
    chains["31337"] = {**chains["31337"], "rpc_url": f"http://127.0.0.1:{free_port()}"}
    configure(chains)
    route, reward = make_intent_parts(dev_chains)
    with pytest.raises(NetworkError, match=r"Portal\.isIntentFunded: RPC unreachable"):
        standard().validate(intent_of(dev_chains, route, reward))


def test_a_missing_solver_key_is_not_the_intents_fault(
    dev_chains: ChainPair, configure: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    reset_caches()
    route, reward = make_intent_parts(dev_chains)
    with pytest.raises(WalletNotConfigured, match="has no key"):
        standard().validate(intent_of(dev_chains, route, reward))


class Sleepy(Validation):
    on_chain = True
    threads: ClassVar[list[str]] = []

    def check(self, intent: Intent, strategy: Strategy) -> list[Issue]:
        Sleepy.threads.append(threading.current_thread().name)
        time.sleep(0.3)
        return [] if self.name != "c" else [self.issue("c found something")]


class SleepyStrategy(Strategy):
    validation_classes: ClassVar = tuple(
        type(f"Sleepy{n}", (Sleepy,), {"name": n}) for n in ("a", "b", "c")
    )

    def can_handle(self, intent: Intent) -> bool:
        return True


def test_on_chain_validations_run_concurrently() -> None:
    Sleepy.threads.clear()
    started = time.monotonic()
    report = SleepyStrategy("sleepy", {}).run_validations(Intent())
    assert time.monotonic() - started < 0.6  # not 0.9: the three ran at once
    assert report.passed == ("a", "b") and [i.validation for i in report.issues] == ["c"]
    assert len(set(Sleepy.threads)) == 3 and threading.current_thread().name not in Sleepy.threads


def test_a_quote_reads_the_chain_and_sends_nothing(
    dev_chains: ChainPair, solver: Solver, configure: Any
) -> None:
    fund_solver(dev_chains, solver)
    route, reward = make_intent_parts(dev_chains, amount=10 * TOKEN_UNIT, reward=11 * TOKEN_UNIT)
    data = payload(dev_chains, route, reward)
    nonce = dev_chains.destination.w3.eth.get_transaction_count(solver.address)
    quote = quote_payload(data)
    assert quote.skipped == ("intent_funded",)  # nothing is funded before a quote
    assert [i.validation for i in quote.issues] == ["solver_balance"]
    assert quote.as_dict()["issues"][0]["kind"] == "temporary"
    assert (quote.route_total, quote.reward_total, quote.margin) == (
        10 * TOKEN_UNIT, 11 * TOKEN_UNIT, TOKEN_UNIT,
    )  # fmt: skip
    mint(dev_chains.destination, solver.address, 10 * TOKEN_UNIT)
    assert quote_payload(data).ok
    assert quote_payload(data, on_chain=False).skipped == ON_CHAIN
    assert dev_chains.destination.w3.eth.get_transaction_count(solver.address) == nonce
    assert not ChainTransaction.objects.exists() and not Intent.objects.exists()


# --- native intents ------------------------------------------------------------------------


def test_native_intents_pass_and_are_quoted_in_wei(
    dev_chains: ChainPair, solver: Solver, configure: Any
) -> None:
    fund_solver(dev_chains, solver)
    route, reward = make_intent_parts(dev_chains, native=10**16, reward=2 * 10**16)
    publish(dev_chains, route, reward)
    intent = intent_of(dev_chains, route, reward, strategy="native-intents")
    strategy = get_strategy("native-intents")
    assert isinstance(strategy, NativeIntentsStrategy) and strategy.can_handle(intent)
    report = strategy.validate(intent)
    assert report.passed[0] == "native_only" and report.passed[-3:] == ON_CHAIN
    quote = strategy.quote(intent)
    assert (quote.route_total, quote.reward_total, quote.bps_fee) == (
        10**16,
        2 * 10**16,
        2 * 10**14,
    )
    assert quote.ok and quote.margin == 10**16 - 2 * 10**14


def test_native_intents_reject_tokens_calldata_and_losses(
    dev_chains: ChainPair, solver: Solver, configure: Any
) -> None:
    fund_solver(dev_chains, solver)
    calls = [
        {"target": RECIPIENT, "data": "0x", "value": 4 * 10**15},
        {"target": RECIPIENT, "data": transfer_data(RECIPIENT, 1), "value": 10**15},
    ]
    route, reward = make_intent_parts(dev_chains, native=10**16, reward=10**16, calls=calls)
    intent = intent_of(dev_chains, route, reward)
    intent.route_tokens = [{"token": dev_chains.destination.token.address, "amount": "1"}]
    strategy = get_strategy("native-intents")
    assert not strategy.can_handle(intent)
    report = strategy.run_validations(intent, on_chain=False)
    assert [str(i) for i in report.permanent] == [
        "native_only: the route moves 1 token(s)",
        "native_only: call 1 has calldata; only plain transfers",
        f"native_only: the calls send {5 * 10**15} wei, the route's native amount is {10**16}",
        f"fee: route value {10**16} exceeds reward value {10**16} minus fee {10**14}: at most "
        f"{10**16 - 10**14}, or a reward of at least 10101010101010101",
    ]
    assert report.skipped == ON_CHAIN
