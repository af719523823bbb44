"""The chain client's reads against real chains: the lean reads answer what web3's
contract calls answer, fee data is never that of an older block, and the RPC session
reads the environment once."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from django.conf import settings
from django.test import override_settings
from eth_account import Account

from intentqueue.chain.client import (
    ChainClient,
    JsonRpcTransport,
    classify,
    get_client,
    rpc_session,
)
from intentqueue.chain.config import parse_chain
from intentqueue.chain.wallets import get_wallet
from intentqueue.exceptions import NetworkError, PermanentError, TransientError
from intentqueue.hashing import reward_hash, route_tuple
from intentqueue.processors.execution import Execution, _checksummed_route
from tests.chainkit import (
    DESTINATION_ID,
    TOKEN_UNIT,
    ChainPair,
    RpcRelay,
    Solver,
    anvil,
    free_port,
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


# --- the lean JSON-RPC transport -------------------------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    """A JSON-RPC endpoint that answers every POST with ``status`` and records what came."""

    status = 200
    seen: list[dict[str, Any]]

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length))
        self.seen.append({"body": body, "authorization": self.headers.get("Authorization")})
        answer = json.dumps({"jsonrpc": "2.0", "id": body["id"], "result": "0x2a"}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[tuple[str, type[_Recorder]]]:
    handler = type("Handler", (_Recorder,), {"seen": [], "status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_the_transport_answers_what_the_provider_answers(client: ChainClient) -> None:
    assert client._transport is not None  # a local URL: no proxy, so the lean path
    provider = client.w3.provider
    calls: list[tuple[str, list[Any]]] = [
        ("eth_blockNumber", []),
        ("eth_getBalance", [MARK, "latest"]),
        ("eth_getBlockByNumber", ["0x0", False]),
        ("eth_noSuchMethod", []),
    ]
    for method, params in calls:
        ours = client._transport.call(method, params)
        theirs = provider.make_request(method, params)  # type: ignore[arg-type]
        assert ours.get("result") == theirs.get("result")
        assert bool(ours.get("error")) == bool(theirs.get("error"))


def test_the_transport_sends_url_credentials_and_retries_error_statuses(
    endpoint: tuple[str, type[_Recorder]],
) -> None:
    url, handler = endpoint
    transport = JsonRpcTransport(url.replace("http://", "http://user:p%40ss@"), timeout=5)
    assert transport.call("eth_chainId", [])["result"] == "0x2a"
    expected = "Basic " + base64.b64encode(b"user:p@ss").decode()
    assert handler.seen[-1]["authorization"] == expected
    handler.status = 502
    with pytest.raises(requests.HTTPError, match="502"):
        transport.call("eth_chainId", [])
    assert len(handler.seen) == 1 + 1 + JsonRpcTransport.RETRIES
    assert isinstance(classify(requests.HTTPError("502 Bad Gateway")), TransientError)


def test_an_unreachable_rpc_is_a_network_error() -> None:
    transport = JsonRpcTransport(f"http://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(requests.ConnectionError) as raised:
        transport.call("eth_blockNumber", [])
    assert isinstance(classify(raised.value), NetworkError)


def test_a_proxy_from_the_environment_keeps_the_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert JsonRpcTransport.for_url("https://rpc.example/v2/key", 5) is None
    assert JsonRpcTransport.for_url("http://127.0.0.1:8545", 5) is not None
