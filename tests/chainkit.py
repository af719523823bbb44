"""Real chains for the execution tests: embedded dev chains, anvil, and an RPC relay that
can lose answers on purpose.

- ``dev_chains`` (session): two embedded py-evm chains served over JSON-RPC, 31337 the
  source and 31338 the destination, with a short block time plus automine (like anvil's
  ``--mixed-mining``) so receipts come at once and confirmations keep coming;
- ``anvil_chains`` (session): the same on two anvil processes (``--block-time 1
  --mixed-mining``), skipped when the binary is missing (``npm ci`` installs it);
- ``solver``: a fresh funded solver key per test, in ``SOLVER_PRIVATE_KEY``;
- ``RpcRelay``: a JSON-RPC relay in front of a chain that can hold or drop the answers
  of chosen methods, to crash or starve a worker exactly after a broadcast.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_bytes, to_checksum_address
from web3 import Web3
from web3.contract import Contract

from intentqueue.anvil import (  # the chain constants and helpers the bench uses too
    ANVIL,
    ANVIL_FUNDER_KEY,
    DESTINATION_ID,
    PROVER,
    RECIPIENT,
    SOURCE_ID,
    TOKEN_UNIT,
    free_port,
    rpc_answers,
    stop_process,
)
from intentqueue.chain import client as chain_client
from intentqueue.chain import config as chain_config
from intentqueue.chain import wallets
from intentqueue.chain.devchain import (
    DevChain,
    DevChainServer,
    contract_artifact,
    deploy_dev_contracts,
    dev_accounts,
    fund_account,
)
from intentqueue.exceptions import RecheckLater
from intentqueue.hashing import intent_hash, reward_tuple, route_tuple
from intentqueue.models import Intent
from intentqueue.processors.base import JobData
from intentqueue.processors.execution import BlockchainProcessor
from intentqueue.status import IntentStatus
from tests.factories import transfer_data


@dataclass
class Chain:
    """One running chain with our contracts and a funder that pays for test setup."""

    chain_id: int
    url: str
    w3: Web3
    portal: Contract
    token: Contract
    funder: LocalAccount
    lock: threading.Lock = field(default_factory=threading.Lock)

    def contract(self, address: str, name: str = "TestToken") -> Contract:
        return self.w3.eth.contract(address=address, abi=contract_artifact(name)["abi"])

    def transact(self, call: Any, *, sender: LocalAccount | None = None, value: int = 0) -> Any:
        """Send ``call`` from ``sender`` (the funder) and wait for a successful receipt."""
        account = sender or self.funder
        with self.lock:
            tx = call.build_transaction(
                {"from": account.address, "value": value, "chainId": self.chain_id,
                 "nonce": self.w3.eth.get_transaction_count(account.address, "pending")}
            )  # fmt: skip
            signed = account.sign_transaction(tx)
            tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30, poll_latency=0.05)
        assert receipt["status"] == 1, receipt
        return receipt

    def fulfilled_events(self, ihash: str | None) -> list[Any]:
        """Every ``IntentFulfilled`` log of ``ihash`` (of any intent: ``None``)."""
        topic = "0x" + keccak(text="IntentFulfilled(bytes32,bytes32)").hex()
        return list(
            self.w3.eth.get_logs(
                {
                    "address": self.portal.address,
                    "fromBlock": 0,
                    "toBlock": "latest",
                    "topics": [topic] if ihash is None else [topic, ihash],
                }
            )
        )

    def mine(self, blocks: int = 1) -> None:
        self.w3.provider.make_request("anvil_mine", [hex(blocks)])  # type: ignore[arg-type]

    def entry(self, **overrides: Any) -> dict[str, Any]:
        """This chain's ``INTENTQUEUE["chains"]`` entry."""
        return {"rpc_url": self.url, "portal": self.portal.address, **overrides}


@dataclass
class ChainPair:
    source: Chain
    destination: Chain

    def settings(self, **destination: Any) -> dict[str, Any]:
        """``INTENTQUEUE["chains"]`` for both chains; ``destination`` overrides its entry."""
        return {
            str(self.source.chain_id): self.source.entry(),
            str(self.destination.chain_id): self.destination.entry(**destination),
        }


def _setup(chain_id: int, url: str, funder: LocalAccount) -> Chain:
    w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 30}))
    addresses = deploy_dev_contracts(w3, funder)
    portal = w3.eth.contract(address=addresses["portal"], abi=contract_artifact("Portal")["abi"])
    token = w3.eth.contract(address=addresses["token"], abi=contract_artifact("TestToken")["abi"])
    return Chain(chain_id, url, w3, portal, token, funder)


@pytest.fixture(scope="session")
def dev_chains() -> Iterator[ChainPair]:
    """Embedded source and destination chains (blocks every 0.3 s, and per transaction)."""
    servers = [
        DevChainServer(DevChain(chain_id, block_time=0.3, automine=True)).start()
        for chain_id in (SOURCE_ID, DESTINATION_ID)
    ]
    try:
        funder = dev_accounts()[0].local_account()
        yield ChainPair(*(_setup(s.chain.chain_id, s.url, funder) for s in servers))
    finally:
        for server in servers:
            server.stop()


@contextlib.contextmanager
def anvil(chain_id: int, *extra: str) -> Iterator[str]:
    """An anvil process on a free port; its RPC URL."""
    port = free_port()
    process = subprocess.Popen(
        [str(ANVIL), "--chain-id", str(chain_id), "--port", str(port), "--silent", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while not rpc_answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"anvil did not start on port {port}")
            time.sleep(0.05)
        yield url
    finally:
        stop_process(process)


def require_anvil() -> None:
    if not (ANVIL.exists() and shutil.which(str(ANVIL))):
        pytest.skip(f"anvil is not installed at {ANVIL} (run `npm ci`)")


@pytest.fixture(scope="session")
def anvil_chains() -> Iterator[ChainPair]:
    """Source and destination chains on anvil, one block a second plus one per transaction."""
    require_anvil()
    funder = Account.from_key(ANVIL_FUNDER_KEY)
    mining = ("--block-time", "1", "--mixed-mining")
    with anvil(SOURCE_ID, *mining) as source_url, anvil(DESTINATION_ID, *mining) as dest_url:
        yield ChainPair(
            _setup(SOURCE_ID, source_url, funder), _setup(DESTINATION_ID, dest_url, funder)
        )


# --- the solver -------------------------------------------------------------------------


@dataclass
class Solver:
    account: LocalAccount

    @property
    def address(self) -> str:
        return str(self.account.address)

    @property
    def key(self) -> str:
        return "0x" + bytes(self.account.key).hex()

    def env(self) -> dict[str, str]:
        return {wallets.KEY_ENV: self.key}


def fund_solver(pair: ChainPair, solver: Solver, *, eth: int = 10**20, tokens: int = 0) -> None:
    for chain in (pair.source, pair.destination):
        with chain.lock:
            fund_account(chain.w3, chain.funder, solver.address, wei=eth)
    if tokens:
        mint(pair.destination, solver.address, tokens)


def mint(chain: Chain, to: str, amount: int) -> None:
    chain.transact(chain.token.functions.mint(to_checksum_address(to), amount))


def new_solver(monkeypatch: pytest.MonkeyPatch) -> Solver:
    solver = Solver(Account.create())
    monkeypatch.setenv(wallets.KEY_ENV, solver.key)
    monkeypatch.delenv(wallets.KEY_FILE_ENV, raising=False)
    reset_caches()
    return solver


def reset_caches() -> None:
    """Forget wallets, chains and clients built from an earlier environment."""
    wallets.clear_cache()
    chain_config.clear_cache()
    chain_client.clear_clients()


@pytest.fixture
def solver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Solver]:
    """A fresh solver key in ``SOLVER_PRIVATE_KEY`` (not funded: see ``fund_solver``)."""
    yield new_solver(monkeypatch)
    reset_caches()


# --- intents ------------------------------------------------------------------------------


def make_intent_parts(
    pair: ChainPair,
    *,
    amount: int = 5 * TOKEN_UNIT,
    reward: int | None = None,
    native: int = 0,
    deadline: int = 3600,
    calls: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A route on the destination chain (``amount`` test tokens, or ``native`` wei, to
    ``RECIPIENT``) and a reward on the source chain, in ``intentqueue.hashing``'s shape."""
    now = int(time.time())
    dest_token = pair.destination.token.address
    if native:
        tokens, default_calls = [], [{"target": RECIPIENT, "data": "0x", "value": native}]
        reward_tokens: list[dict[str, Any]] = []
    else:
        tokens = [{"token": dest_token, "amount": amount}]
        default_calls = [
            {"target": dest_token, "data": transfer_data(RECIPIENT, amount), "value": 0}
        ]
        reward_tokens = [
            {"token": pair.source.token.address, "amount": reward or amount + amount // 10}
        ]
    route = {
        "salt": "0x" + os.urandom(32).hex(),
        "deadline": now + deadline,
        "portal": pair.destination.portal.address,
        "native_amount": native,
        "tokens": tokens,
        "calls": calls if calls is not None else default_calls,
    }
    reward_part = {
        "deadline": now + deadline + 3600,
        "creator": pair.source.funder.address,
        "prover": PROVER,
        "native_amount": (reward or native + native // 10) if native else 0,
        "tokens": reward_tokens,
    }
    return route, reward_part


def publish(pair: ChainPair, route: dict[str, Any], reward: dict[str, Any]) -> str:
    """Publish and fund the intent on the source chain (the funder is the creator)."""
    source = pair.source
    for token in reward["tokens"]:
        mint(source, source.funder.address, int(token["amount"]))
        approve = source.contract(token["token"]).functions.approve(
            source.portal.address, int(token["amount"])
        )
        source.transact(approve)
    call = source.portal.functions.publishAndFund(
        pair.destination.chain_id, route_tuple(route), reward_tuple(reward)
    )
    source.transact(call, value=int(reward["native_amount"]))
    ihash = intent_hash(pair.destination.chain_id, route, reward)
    assert source.portal.functions.isIntentFunded(to_bytes(hexstr=ihash)).call()
    return ihash


def payload(
    pair: ChainPair, route: dict[str, Any], reward: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """The intent as ``submit_intent`` takes it."""
    return {
        "sourceChainId": pair.source.chain_id,
        "destination": pair.destination.chain_id,
        "route": {
            "salt": route["salt"], "deadline": route["deadline"], "portal": route["portal"],
            "nativeAmount": str(route["native_amount"]),
            "tokens": [{"token": t["token"], "amount": str(t["amount"])} for t in route["tokens"]],
            "calls": route["calls"],
        },
        "reward": {
            "deadline": reward["deadline"], "creator": reward["creator"],
            "prover": reward["prover"], "nativeAmount": str(reward["native_amount"]),
            "tokens": [{"token": t["token"], "amount": str(t["amount"])} for t in reward["tokens"]],
        },
        "source": "tests",
        **extra,
    }  # fmt: skip


def validated_intent(
    pair: ChainPair, route: dict[str, Any], reward: dict[str, Any], **fields: Any
) -> Intent:
    """An intent saved as VALIDATED (no fulfillment job): ready for the execution stage."""
    return Intent.objects.create(
        hash=intent_hash(pair.destination.chain_id, route, reward),
        source_chain_id=pair.source.chain_id,
        destination_chain_id=pair.destination.chain_id,
        route_salt=route["salt"], route_deadline=route["deadline"], route_portal=route["portal"],
        route_native_amount=route["native_amount"],
        route_tokens=[{"token": t["token"], "amount": str(t["amount"])} for t in route["tokens"]],
        route_calls=[{**c, "value": str(c["value"])} for c in route["calls"]],
        reward_deadline=reward["deadline"], reward_creator=reward["creator"],
        reward_prover=reward["prover"], reward_native_amount=reward["native_amount"],
        reward_tokens=[{"token": t["token"], "amount": str(t["amount"])} for t in reward["tokens"]],
        status=IntentStatus.VALIDATED, source="tests", **fields,
    )  # fmt: skip


# --- a relay that loses answers -------------------------------------------------------------


class RpcRelay:
    """Relays JSON-RPC to ``upstream``. ``hold(method)`` forwards calls of ``method`` and
    never answers them (the caller hangs as if the answer was lost); ``drop(method, n)``
    closes the connection of the next ``n`` calls of ``method`` without forwarding them."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.held: set[str] = set()
        self.drops: dict[str, int] = {}
        self.seen: dict[str, int] = {}
        self.release = threading.Event()
        self._lock = threading.Lock()
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                method = str(json.loads(body).get("method", "")) if body[:1] == b"{" else ""
                with relay._lock:
                    relay.seen[method] = relay.seen.get(method, 0) + 1
                    dropped = relay.drops.get(method, 0) > 0
                    if dropped:
                        relay.drops[method] -= 1
                if dropped:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                request = urllib.request.Request(
                    relay.upstream, data=body, headers={"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = response.read()
                if method in relay.held:
                    relay.release.wait(120)
                    self.close_connection = True
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def hold(self, method: str) -> None:
        self.held.add(method)

    def drop(self, method: str, times: int) -> None:
        with self._lock:
            self.drops[method] = times

    def clear(self) -> None:
        self.held.clear()
        self.drops.clear()
        self.release.set()

    def __enter__(self) -> RpcRelay:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def execute(intent: Intent, wallet_type: str | None = None, timeout: float = 20) -> dict[str, Any]:
    """Run the execution job of ``intent`` in this process until it stops asking to be
    re-run."""
    data = JobData(intent.pk, intent.hash, intent.strategy, wallet_type).to_json()
    deadline = time.monotonic() + timeout
    while True:
        try:
            return BlockchainProcessor(None).process(data)
        except RecheckLater:
            assert time.monotonic() < deadline, "still waiting"
            time.sleep(0.2)
