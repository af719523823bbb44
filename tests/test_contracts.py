"""The Solidity contracts on a real in-process EVM (py-evm through eth-tester).

Deploys the committed artifacts (``intentqueue/chain/contracts/*.json``) and checks that the
Python intent hash matches the Portal's, and the source side (publishAndFund) and destination
side (fulfill) behaviours, including their custom errors.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
from eth_abi import encode
from eth_tester.exceptions import TransactionFailed
from eth_utils import function_signature_to_4byte_selector, keccak, to_bytes
from web3 import EthereumTesterProvider, Web3
from web3.contract import Contract
from web3.exceptions import ContractCustomError
from web3.logs import DISCARD

from intentqueue.hashing import intent_hash, reward_hash, route_hash

CONTRACTS_DIR = Path(__file__).resolve().parent.parent / "intentqueue" / "chain" / "contracts"
ZERO_BYTES32 = b"\x00" * 32
REVERTED_PREFIX = "execution reverted: "
ERC20_TRANSFER = function_signature_to_4byte_selector("transfer(address,uint256)")


def _artifact(name: str) -> dict[str, Any]:
    return json.loads((CONTRACTS_DIR / f"{name}.json").read_text())


def _deploy(w3: Web3, name: str, *args: Any) -> Contract:
    artifact = _artifact(name)
    factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    receipt = w3.eth.wait_for_transaction_receipt(factory.constructor(*args).transact())
    assert receipt["status"] == 1
    return w3.eth.contract(address=receipt["contractAddress"], abi=artifact["abi"])


def _transact(w3: Web3, fn: Any, sender: str, value: int = 0) -> Any:
    receipt = w3.eth.wait_for_transaction_receipt(fn.transact({"from": sender, "value": value}))
    assert receipt["status"] == 1
    return receipt


def _error_data(signature: str, *values: Any) -> str:
    """Revert data of the custom error ``signature`` (flat types only) with ``values``."""
    types = [t for t in signature[signature.index("(") + 1 : -1].split(",") if t]
    data = function_signature_to_4byte_selector(signature) + encode(types, list(values))
    return "0x" + data.hex()


def _revert_data(exc: BaseException) -> str | None:
    """The raw revert data carried by ``exc`` as a ``0x`` hex string.

    web3's eth-tester provider raises ``TransactionFailed("execution reverted: b'...'")`` for
    custom errors, with the revert bytes rendered as a Python literal.
    """
    if isinstance(exc, ContractCustomError) and isinstance(exc.data, str):
        return exc.data
    if isinstance(exc, TransactionFailed) and exc.args:
        raw = exc.args[0]
        if isinstance(raw, str) and raw.startswith(REVERTED_PREFIX + "b"):
            raw = ast.literal_eval(raw.removeprefix(REVERTED_PREFIX))
        if isinstance(raw, bytes):
            return "0x" + raw.hex()
    return None


def _expect_revert(fn: Any, tx: dict[str, Any], expected_data: str) -> None:
    """Sending ``fn`` with ``tx`` reverts with exactly the revert data ``expected_data``."""
    with pytest.raises((ContractCustomError, TransactionFailed)) as info:
        fn.transact(tx)
    assert _revert_data(info.value) == expected_data


def _claimant(address: str) -> bytes:
    """An address as the bytes32 claimant fulfill records."""
    return b"\x00" * 12 + to_bytes(hexstr=address)


def _transfer_data(recipient: str, amount: int) -> str:
    return "0x" + (ERC20_TRANSFER + encode(["address", "uint256"], [recipient, amount])).hex()


# The on-chain arguments are built from the snake_case dicts independently of
# intentqueue.hashing, so a field-order or type mismatch there shows up as a hash mismatch.
def _route_arg(route: dict[str, Any]) -> dict[str, Any]:
    return {
        "salt": to_bytes(hexstr=route["salt"]),
        "deadline": route["deadline"],
        "portal": route["portal"],
        "nativeAmount": route["native_amount"],
        "tokens": [{"token": t["token"], "amount": t["amount"]} for t in route["tokens"]],
        "calls": [
            {"target": c["target"], "data": to_bytes(hexstr=c["data"]), "value": c["value"]}
            for c in route["calls"]
        ],
    }


def _reward_arg(reward: dict[str, Any]) -> dict[str, Any]:
    return {
        "deadline": reward["deadline"],
        "creator": reward["creator"],
        "prover": reward["prover"],
        "nativeAmount": reward["native_amount"],
        "tokens": [{"token": t["token"], "amount": t["amount"]} for t in reward["tokens"]],
    }


@pytest.fixture
def chain() -> dict[str, Any]:
    w3 = Web3(EthereumTesterProvider())
    deployer, creator, solver, recipient, prover = w3.eth.accounts[:5]
    w3.eth.default_account = deployer
    return {
        "w3": w3,
        "creator": creator,
        "solver": solver,
        "recipient": recipient,
        "prover": prover,
        "token_a": _deploy(w3, "TestToken", "Token A", "TKA"),
        "token_b": _deploy(w3, "TestToken", "Token B", "TKB"),
        # Two portals stand for the source and the destination chain's portal.
        "source": _deploy(w3, "Portal"),
        "destination": _deploy(w3, "Portal"),
    }


def _intent(c: dict[str, Any], *, deadline_offset: int = 3600) -> tuple[dict, dict]:
    w3: Web3 = c["w3"]
    now = w3.eth.get_block("latest")["timestamp"]
    token_a, token_b = c["token_a"].address, c["token_b"].address
    route = {
        "salt": "0x" + keccak(text="salt-1").hex(),
        "deadline": now + deadline_offset,
        "portal": c["destination"].address,
        "native_amount": 0,
        "tokens": [{"token": token_a, "amount": 100 * 10**18}, {"token": token_b, "amount": 5}],
        "calls": [
            {"target": token_a, "data": _transfer_data(c["recipient"], 100 * 10**18), "value": 0},
            {"target": token_b, "data": _transfer_data(c["recipient"], 5), "value": 0},
        ],
    }
    reward = {
        "deadline": now + 7200,
        "creator": c["creator"],
        "prover": c["prover"],
        "native_amount": 10**15,
        "tokens": [{"token": token_a, "amount": 101 * 10**18}],
    }
    return route, reward


def _fund_solver(c: dict[str, Any], route: dict[str, Any]) -> None:
    """Mint the route's tokens to the solver and approve the destination portal."""
    by_address = {c["token_a"].address: c["token_a"], c["token_b"].address: c["token_b"]}
    for t in route["tokens"]:
        token = by_address[t["token"]]
        _transact(c["w3"], token.functions.mint(c["solver"], t["amount"]), c["solver"])
        approve = token.functions.approve(c["destination"].address, t["amount"])
        _transact(c["w3"], approve, c["solver"])


def _fulfill_fn(c: dict[str, Any], ihash: str, route: dict, rhash: bytes, claimant: bytes) -> Any:
    return c["destination"].functions.fulfill(
        to_bytes(hexstr=ihash), _route_arg(route), rhash, claimant
    )


def test_python_intent_hash_matches_portal(chain: dict[str, Any]) -> None:
    route, reward = _intent(chain)
    destination = chain["w3"].eth.chain_id
    on_chain = (
        chain["source"]
        .functions.getIntentHash(destination, _route_arg(route), _reward_arg(reward))
        .call()
    )
    assert tuple(on_chain) == (
        to_bytes(hexstr=intent_hash(destination, route, reward)),
        route_hash(route),
        reward_hash(reward),
    )
    assert len(route["tokens"]) == 2 and len(route["calls"]) == 2


def test_test_token_basics(chain: dict[str, Any]) -> None:
    w3, token = chain["w3"], chain["token_a"]
    alice, bob = chain["creator"], chain["solver"]
    assert token.functions.name().call() == "Token A"
    assert token.functions.symbol().call() == "TKA"
    assert token.functions.decimals().call() == 18
    _transact(w3, token.functions.mint(alice, 1000), bob)
    _transact(w3, token.functions.transfer(bob, 300), alice)
    _transact(w3, token.functions.approve(bob, 200), alice)
    assert token.functions.allowance(alice, bob).call() == 200
    _transact(w3, token.functions.transferFrom(alice, bob, 150), bob)
    assert token.functions.balanceOf(alice).call() == 550
    assert token.functions.balanceOf(bob).call() == 450
    assert token.functions.allowance(alice, bob).call() == 50
    assert token.functions.totalSupply().call() == 1000
    _expect_revert(
        token.functions.transferFrom(alice, bob, 51),
        {"from": bob},
        _error_data("InsufficientAllowance(address,uint256,uint256)", bob, 50, 51),
    )


def test_publish_and_fund_escrows_reward(chain: dict[str, Any]) -> None:
    w3, source, token_a = chain["w3"], chain["source"], chain["token_a"]
    creator = chain["creator"]
    route, reward = _intent(chain)
    destination = w3.eth.chain_id
    ihash = to_bytes(hexstr=intent_hash(destination, route, reward))
    amount = reward["tokens"][0]["amount"]
    _transact(w3, token_a.functions.mint(creator, amount), creator)
    _transact(w3, token_a.functions.approve(source.address, amount), creator)
    assert source.functions.isIntentFunded(ihash).call() is False

    publish = source.functions.publishAndFund(destination, _route_arg(route), _reward_arg(reward))
    native = reward["native_amount"]
    assert publish.call({"from": creator, "value": native}) == ihash
    receipt = _transact(w3, publish, creator, value=native)

    assert source.functions.isIntentFunded(ihash).call() is True
    assert source.functions.rewardStatus(ihash).call() == 1
    assert token_a.functions.balanceOf(source.address).call() == amount
    assert token_a.functions.balanceOf(creator).call() == 0
    assert w3.eth.get_balance(source.address) == native

    (published,) = source.events.IntentPublished().process_receipt(receipt, errors=DISCARD)
    assert published["args"]["intentHash"] == ihash
    assert published["args"]["destination"] == destination
    assert published["args"]["creator"] == creator
    assert published["args"]["prover"] == chain["prover"]
    assert published["args"]["rewardDeadline"] == reward["deadline"]
    (funded,) = source.events.IntentFunded().process_receipt(receipt, errors=DISCARD)
    assert funded["args"]["intentHash"] == ihash
    assert funded["args"]["funder"] == creator

    _expect_revert(
        publish,
        {"from": creator, "value": native},
        _error_data("IntentAlreadyExists(bytes32)", ihash),
    )


def test_publish_requires_exact_native_amount(chain: dict[str, Any]) -> None:
    route, reward = _intent(chain)
    reward["tokens"] = []
    publish = chain["source"].functions.publishAndFund(
        chain["w3"].eth.chain_id, _route_arg(route), _reward_arg(reward)
    )
    _expect_revert(
        publish,
        {"from": chain["creator"], "value": reward["native_amount"] - 1},
        _error_data("InsufficientNativeAmount()"),
    )


def test_fulfill_runs_calls_and_records_claimant(chain: dict[str, Any]) -> None:
    w3, destination = chain["w3"], chain["destination"]
    solver, recipient = chain["solver"], chain["recipient"]
    route, reward = _intent(chain)
    ihash = intent_hash(w3.eth.chain_id, route, reward)
    claimant = _claimant(solver)
    _fund_solver(chain, route)

    fulfill = _fulfill_fn(chain, ihash, route, reward_hash(reward), claimant)
    results = fulfill.call({"from": solver})
    assert len(results) == 2
    assert all(r == (1).to_bytes(32, "big") for r in results)  # ERC-20 transfer returned true
    receipt = _transact(w3, fulfill, solver)

    assert chain["token_a"].functions.balanceOf(recipient).call() == 100 * 10**18
    assert chain["token_b"].functions.balanceOf(recipient).call() == 5
    assert chain["token_a"].functions.balanceOf(destination.address).call() == 0
    assert chain["token_b"].functions.balanceOf(destination.address).call() == 0
    assert chain["token_a"].functions.balanceOf(solver).call() == 0
    assert destination.functions.fulfilled(to_bytes(hexstr=ihash)).call() == claimant

    (event,) = destination.events.IntentFulfilled().process_receipt(receipt, errors=DISCARD)
    assert event["args"]["intentHash"] == to_bytes(hexstr=ihash)
    assert event["args"]["claimant"] == claimant

    _fund_solver(chain, route)
    _expect_revert(
        fulfill,
        {"from": solver},
        _error_data("IntentAlreadyFulfilled(bytes32)", to_bytes(hexstr=ihash)),
    )


def test_fulfill_rejects_wrong_hash(chain: dict[str, Any]) -> None:
    w3 = chain["w3"]
    route, reward = _intent(chain)
    claimant = _claimant(chain["solver"])
    # Hashed for another destination chain: this portal computes a different hash.
    wrong = intent_hash(w3.eth.chain_id + 1, route, reward)
    expected = to_bytes(hexstr=intent_hash(w3.eth.chain_id, route, reward))
    _expect_revert(
        _fulfill_fn(chain, wrong, route, reward_hash(reward), claimant),
        {"from": chain["solver"]},
        _error_data("InvalidHash(bytes32)", expected),
    )


def test_fulfill_rejects_expired_route(chain: dict[str, Any]) -> None:
    route, reward = _intent(chain, deadline_offset=-1)
    claimant = _claimant(chain["solver"])
    ihash = intent_hash(chain["w3"].eth.chain_id, route, reward)
    _expect_revert(
        _fulfill_fn(chain, ihash, route, reward_hash(reward), claimant),
        {"from": chain["solver"]},
        _error_data("IntentExpired()"),
    )


def test_fulfill_rejects_wrong_portal(chain: dict[str, Any]) -> None:
    route, reward = _intent(chain)
    route["portal"] = chain["source"].address  # meant for another portal
    claimant = _claimant(chain["solver"])
    ihash = intent_hash(chain["w3"].eth.chain_id, route, reward)
    _expect_revert(
        _fulfill_fn(chain, ihash, route, reward_hash(reward), claimant),
        {"from": chain["solver"]},
        _error_data("InvalidPortal(address)", chain["source"].address),
    )


def test_fulfill_rejects_zero_claimant_and_native_mismatch(chain: dict[str, Any]) -> None:
    route, reward = _intent(chain)
    ihash = intent_hash(chain["w3"].eth.chain_id, route, reward)
    solver = chain["solver"]
    _expect_revert(
        _fulfill_fn(chain, ihash, route, reward_hash(reward), ZERO_BYTES32),
        {"from": solver},
        _error_data("ZeroClaimant()"),
    )
    claimant = _claimant(solver)
    _expect_revert(
        _fulfill_fn(chain, ihash, route, reward_hash(reward), claimant),
        {"from": solver, "value": 1},
        _error_data("InsufficientNativeAmount()"),
    )


def test_fulfill_reports_failed_call(chain: dict[str, Any]) -> None:
    route, reward = _intent(chain)
    # The second call moves more of token B than the portal holds.
    route["calls"][1]["data"] = _transfer_data(chain["recipient"], 6)
    _fund_solver(chain, route)
    ihash = intent_hash(chain["w3"].eth.chain_id, route, reward)
    claimant = _claimant(chain["solver"])
    inner = _error_data(
        "InsufficientBalance(address,uint256,uint256)", chain["destination"].address, 5, 6
    )
    _expect_revert(
        _fulfill_fn(chain, ihash, route, reward_hash(reward), claimant),
        {"from": chain["solver"]},
        _error_data("CallFailed(uint256,bytes)", 1, to_bytes(hexstr=inner)),
    )
    assert chain["destination"].functions.fulfilled(to_bytes(hexstr=ihash)).call() == ZERO_BYTES32
