"""The chain client's reads against real chains: the lean reads answer what web3's
contract calls answer, fee data is never that of an older block, and the RPC session
reads the environment once."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from django.conf import settings
from django.test import override_settings
from eth_account import Account

from intentqueue.chain.client import ChainClient, get_client, rpc_session
from intentqueue.chain.config import parse_chain
from intentqueue.chain.wallets import get_wallet
from intentqueue.exceptions import PermanentError
from intentqueue.hashing import reward_hash, route_tuple
from intentqueue.processors.execution import Execution, _checksummed_route
from tests.chainkit import (
    DESTINATION_ID,
    TOKEN_UNIT,
    ChainPair,
    RpcRelay,
    Solver,
    anvil,
    fund_solver,
    make_intent_parts,
    mint,
    require_anvil,
    validated_intent,
)

MARK = "0x000000000000000000000000000000000000dEaD"


@pytest.fixture
def client(dev_chains: ChainPair, solver: Solver) -> Iterator[ChainClient]:
    with override_settings(INTENTQUEUE={**settings.INTENTQUEUE, "chains": dev_chains.settings()}):
        yield get_client(DESTINATION_ID)


def test_reads_answer_what_web3_answers(
    client: ChainClient, dev_chains: ChainPair, solver: Solver
) -> None:
    fund_solver(dev_chains, solver)
    chain = dev_chains.destination
    mint(chain, solver.address, 3 * TOKEN_UNIT)
    token = chain.token.address
    assert client.token_balance(token, solver.address) == 3 * TOKEN_UNIT
    assert client.token_balance(token.lower(), MARK) == 0
    owner = chain.funder.address
    expected = chain.token.functions.allowance(owner, chain.portal.address).call()
    assert client.allowance(token, owner, chain.portal.address) == expected
    assert client.balance(solver.address) == chain.w3.eth.get_balance(solver.address)
    assert client.nonce(owner) == chain.w3.eth.get_transaction_count(owner)
    assert client.fulfilled("0x" + "ab" * 32) == bytes(32)
    with pytest.raises(PermanentError, match="is the address a contract"):
        client.token_balance(MARK, solver.address)
    assert client.token(token) is client.token(token)  # built once


def test_head_and_headers_are_the_blocks_the_node_has(client: ChainClient) -> None:
    head = client.head()
    block = client.w3.eth.get_block(head["number"])
    assert head["hash"] == block["hash"].to_0x_hex()
    assert head["base_fee"] == block["baseFeePerGas"]
    assert client.header(head["number"]) == head


@pytest.mark.django_db
def test_fulfill_calldata_is_what_web3_encodes(
    client: ChainClient, dev_chains: ChainPair, solver: Solver
) -> None:
    intent = validated_intent(dev_chains, *make_intent_parts(dev_chains))
    wallet = get_wallet()
    run = SimpleNamespace(intent=intent, client=client, wallet=wallet)
    expected = client.portal.encode_abi(
        "fulfill",
        args=[
            bytes.fromhex(intent.hash[2:]),
            _checksummed_route(route_tuple(intent.route)),
            reward_hash(intent.reward),
            wallet.claimant,
        ],
    )
    assert Execution.fulfill_data(run) == expected  # type: ignore[arg-type]


def test_fee_data_is_asked_again_in_each_new_block(solver: Solver) -> None:
    """On a chain that mines only when asked: within one block the tip is asked once,
    and a new block gives fees computed from that block."""
    require_anvil()
    with anvil(DESTINATION_ID) as url, RpcRelay(url) as relay:
        client = ChainClient(parse_chain(str(DESTINATION_ID), {"rpc_url": relay.url,
                                                                "portal": MARK}))  # fmt: skip
        first = client.fees()
        first_block = client.head()["number"]
        assert client.fees() == first
        assert relay.seen["eth_maxPriorityFeePerGas"] == 1
        assert relay.seen["eth_getBlockByNumber"] == 3  # the head is read every time
        client.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
        second = client.fees()
        assert relay.seen["eth_maxPriorityFeePerGas"] == 2
        head = client.head()
        tip = second["maxPriorityFeePerGas"]
        assert second["maxFeePerGas"] == 2 * head["base_fee"] + tip
        assert client._fees is not None and client._fees[0] == head["number"] > first_block
        second["maxFeePerGas"] = 0  # callers get copies
        assert client.fees()["maxFeePerGas"] == 2 * head["base_fee"] + tip


def test_the_rpc_session_reads_proxies_from_the_environment_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    session = rpc_session("https://rpc.example/v2/key")
    assert session.trust_env is False
    assert session.proxies["https"] == "http://proxy.example:3128"
    assert rpc_session("http://127.0.0.1:8545").proxies == {}  # NO_PROXY honoured
    monkeypatch.delenv("HTTPS_PROXY")
    assert session.proxies["https"] == "http://proxy.example:3128"  # resolved at creation


def test_an_account_with_no_code_reads_as_permanent(client: ChainClient) -> None:
    with pytest.raises(PermanentError):
        client.allowance(Account.create().address, MARK, MARK)


def test_receipts_read_as_web3_reads_them(
    client: ChainClient, dev_chains: ChainPair, solver: Solver
) -> None:
    chain = dev_chains.destination
    expected = chain.transact(chain.token.functions.mint(solver.address, 1))
    found = client.mined(expected["transactionHash"].to_0x_hex())
    assert found is not None
    receipt, head = found
    for key in ("blockNumber", "blockHash", "status", "gasUsed", "transactionHash"):
        assert receipt[key] == expected[key], key
    assert head >= receipt["blockNumber"]
    assert client.receipt("0x" + "12" * 32) is None
