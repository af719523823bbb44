"""Two anvil chains with our contracts, for runs against real nodes: the chaos run
(``intentqueue.chaos``) and the execution benchmark (``intentqueue.bench``).

``AnvilChains`` starts a source and a destination chain (``--block-time 1
--mixed-mining``: a block a second, plus one per transaction), deploys ``Portal`` and
``TestToken`` on each with anvil's first prefunded account (the funder), funds a solver
key made for the run, and builds intents: a route (one test token to ``RECIPIENT`` on the
destination) and its reward on the source, optionally published and funded on the source
chain, as the payload ``submit_intent`` takes. ``stop()`` (or leaving the ``with`` block)
stops the chains.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.db import connection
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address
from tqdm import tqdm
from web3 import Web3

from intentqueue.chain.devchain import contract_artifact, deploy_dev_contracts, fund_account
from intentqueue.hashing import reward_tuple, route_tuple

ROOT = Path(__file__).resolve().parent.parent
ANVIL = ROOT / "node_modules" / ".bin" / "anvil"
#: anvil's first prefunded account (its well-known test mnemonic): pays for the setup.
ANVIL_FUNDER_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
SOURCE_ID, DESTINATION_ID = 31337, 31338
RECIPIENT = "0x000000000000000000000000000000000000bEEF"
PROVER = "0x0000000000000000000000000000000000000c0D"
TOKEN_UNIT = 10**18
FULFILLED_TOPIC = "0x" + keccak(text="IntentFulfilled(bytes32,bytes32)").hex()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stop_process(process: subprocess.Popen[Any], timeout: float = 10) -> None:
    """SIGTERM ``process``, and SIGKILL it if it is still there after ``timeout`` s."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def anvil_available() -> bool:
    return ANVIL.exists() and shutil.which(str(ANVIL)) is not None


def rpc_answers(url: str) -> bool:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})
    request = urllib.request.Request(
        url, data=body.encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def database_url() -> str:
    """The URL of the database this process uses (a scratch one), for worker processes."""
    params = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{params['NAME']}"
    auth = params.get("USER") or "postgres"
    if params.get("PASSWORD"):
        auth += f":{params['PASSWORD']}"
    host = f"{params['HOST'] or '127.0.0.1'}:{params['PORT'] or 5432}"
    return f"postgres://{auth}@{host}/{params['NAME']}"


@dataclass
class AnvilChain:
    """One anvil chain with our contracts."""

    chain_id: int
    url: str
    process: subprocess.Popen[bytes]
    w3: Web3
    portal: Any
    token: Any
    #: anvil's output (one line per RPC method called), when it was asked to keep it.
    log: Path | None = None

    def entry(self) -> dict[str, Any]:
        """This chain's ``INTENTQUEUE["chains"]`` entry."""
        return {"rpc_url": self.url, "portal": self.portal.address}

    def stop(self) -> None:
        stop_process(self.process)

    def rpc_calls(self) -> Counter[str]:
        """RPC calls served so far, by method (from the log; empty without one)."""
        if self.log is None or not self.log.exists():
            return Counter()
        with self.log.open(errors="replace") as lines:
            return Counter(
                line.strip() for line in lines
                if "_" in line and line[:1].isalpha() and " " not in line.strip()
            )  # fmt: skip


def start_anvil(chain_id: int, funder: LocalAccount, *, log: Path | None = None) -> AnvilChain:
    """An anvil process on a free port with ``Portal`` and ``TestToken`` deployed by
    ``funder``. With ``log``, anvil's output (the RPC methods it serves) goes there."""
    port = free_port()
    output = log.open("wb") if log is not None else None
    process = subprocess.Popen(
        [str(ANVIL), "--chain-id", str(chain_id), "--port", str(port),
         *([] if log is not None else ["--silent"]), "--block-time", "1", "--mixed-mining"],
        stdout=output or subprocess.DEVNULL, stderr=subprocess.STDOUT if output else
        subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    if output is not None:
        output.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not rpc_answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"anvil did not start on port {port}")
        time.sleep(0.05)
    w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 30}))
    addresses = {k: to_checksum_address(v) for k, v in deploy_dev_contracts(w3, funder).items()}
    return AnvilChain(
        chain_id, url, process, w3,
        w3.eth.contract(address=addresses["portal"], abi=contract_artifact("Portal")["abi"]),
        w3.eth.contract(address=addresses["token"], abi=contract_artifact("TestToken")["abi"]),
        log,
    )  # fmt: skip


class AnvilChains:
    """A source and a destination anvil chain, the funder and a solver key of the run.

    ``log_dir``: keep the destination chain's output there (``destination.rpc_calls()``
    then counts the RPC calls it served).
    """

    def __init__(self, *, out: Any = sys.stderr, log_dir: Path | None = None) -> None:
        self.out = out
        self.log_dir = log_dir
        self.funder: LocalAccount = Account.from_key(ANVIL_FUNDER_KEY)
        self.solver: LocalAccount = Account.create()
        self.chains: dict[str, AnvilChain] = {}

    def __enter__(self) -> AnvilChains:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def source(self) -> AnvilChain:
        return self.chains["source"]

    @property
    def destination(self) -> AnvilChain:
        return self.chains["destination"]

    @property
    def solver_key(self) -> str:
        """The solver's private key, 0x hex (for ``SOLVER_PRIVATE_KEY``)."""
        return "0x" + bytes(self.solver.key).hex()

    def start(self) -> None:
        self.chains["source"] = start_anvil(SOURCE_ID, self.funder)
        log = self.log_dir / f"anvil-{DESTINATION_ID}.log" if self.log_dir else None
        self.chains["destination"] = start_anvil(DESTINATION_ID, self.funder, log=log)

    def stop(self) -> None:
        for chain in self.chains.values():
            chain.stop()
        self.chains.clear()

    def entries(self, confirmations: int | None = None) -> dict[str, Any]:
        """``INTENTQUEUE["chains"]`` for both chains; ``confirmations`` on the destination."""
        settle = {"confirmations": confirmations} if confirmations else {}
        return {
            str(self.source.chain_id): self.source.entry(),
            str(self.destination.chain_id): {**self.destination.entry(), **settle},
        }

    def fund_solver(self, tokens: int) -> None:
        """Gas money on both chains, and ``tokens`` test tokens on the destination."""
        destination = self.destination
        fund_account(
            destination.w3, self.funder, self.solver.address, wei=10**21,
            token=destination.token.address, token_amount=tokens,
        )  # fmt: skip
        fund_account(self.source.w3, self.funder, self.solver.address, wei=10**21)

    # --- intents -------------------------------------------------------------------------

    def make_intent(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """A route (one test token to ``RECIPIENT`` on the destination) and its reward."""
        now, amount = int(time.time()), TOKEN_UNIT
        dest_token = self.destination.token.address
        transfer = "0xa9059cbb" + RECIPIENT[2:].lower().rjust(64, "0") + f"{amount:064x}"
        route = {
            "salt": "0x" + os.urandom(32).hex(), "deadline": now + 7200,
            "portal": self.destination.portal.address, "native_amount": 0,
            "tokens": [{"token": dest_token, "amount": amount}],
            "calls": [{"target": dest_token, "data": transfer, "value": 0}],
        }  # fmt: skip
        reward = {
            "deadline": now + 10800, "creator": self.funder.address, "prover": PROVER,
            "native_amount": 0,
            "tokens": [{"token": self.source.token.address, "amount": amount + amount // 10}],
        }  # fmt: skip
        return route, reward

    def publish(self, parts: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        """Publish and fund every intent on the source chain (sent in batches, consecutive
        nonces, one receipt wait per batch)."""
        source = self.source
        w3 = source.w3
        total = sum(int(r["tokens"][0]["amount"]) for _, r in parts)
        fund_account(w3, self.funder, self.funder.address, token=source.token.address,
                     token_amount=total)  # fmt: skip
        self._send(w3, [source.token.functions.approve(source.portal.address, total)])
        calls = [
            source.portal.functions.publishAndFund(
                self.destination.chain_id, route_tuple(route), reward_tuple(reward)
            )
            for route, reward in parts
        ]
        batch = 100
        with tqdm(total=len(calls), desc="publish", file=self.out, leave=False) as bar:
            for start in range(0, len(calls), batch):
                self._send(w3, calls[start : start + batch])
                bar.update(min(batch, len(calls) - start))

    def _send(self, w3: Web3, calls: list[Any]) -> None:
        nonce = w3.eth.get_transaction_count(self.funder.address, "pending")
        gas_price = 2 * int(w3.eth.gas_price) + 10**9
        gas = int(calls[0].estimate_gas({"from": self.funder.address}) * 1.5)
        hashes = []
        for offset, call in enumerate(calls):
            tx = call.build_transaction({
                "from": self.funder.address, "nonce": nonce + offset, "gas": gas,
                "gasPrice": gas_price, "chainId": w3.eth.chain_id,
            })  # fmt: skip
            signed = self.funder.sign_transaction(tx)
            hashes.append(w3.eth.send_raw_transaction(signed.raw_transaction))
        for tx_hash in hashes:
            receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60, poll_latency=0.05)
            if receipt["status"] != 1:
                raise RuntimeError(f"setup transaction {tx_hash.hex()} reverted")

    def payload(
        self, route: dict[str, Any], reward: dict[str, Any], **extra: Any
    ) -> dict[str, Any]:
        """The intent as ``submit_intent`` takes it; ``extra`` adds top-level keys."""

        def tokens(part: dict[str, Any]) -> list[dict[str, str]]:
            return [{"token": t["token"], "amount": str(t["amount"])} for t in part["tokens"]]

        return {
            "sourceChainId": self.source.chain_id,
            "destination": self.destination.chain_id,
            "route": {
                "salt": route["salt"], "deadline": route["deadline"], "portal": route["portal"],
                "nativeAmount": str(route["native_amount"]), "tokens": tokens(route),
                "calls": route["calls"],
            },
            "reward": {
                "deadline": reward["deadline"], "creator": reward["creator"],
                "prover": reward["prover"], "nativeAmount": str(reward["native_amount"]),
                "tokens": tokens(reward),
            },
            **extra,
        }  # fmt: skip

    def fulfilled_events(self) -> Counter[str]:
        """``IntentFulfilled`` events on the destination chain, per intent hash."""
        destination = self.destination
        logs = destination.w3.eth.get_logs({
            "address": destination.portal.address, "fromBlock": 0, "toBlock": "latest",
            "topics": [FULFILLED_TOPIC],
        })  # fmt: skip
        return Counter("0x" + bytes(log["topics"][1]).hex() for log in logs)
