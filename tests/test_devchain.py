"""The embedded dev chain over JSON-RPC HTTP, used by real clients in other processes.

A py-evm chain is served by ``DevChainServer``; clients are ``Web3(HTTPProvider)`` in
separate processes, raw HTTP requests, and the ``manage.py devchain`` command run as a
process of its own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_abi import encode
from eth_account import Account
from eth_utils import function_signature_to_4byte_selector, keccak, to_bytes
from web3 import Web3
from web3.exceptions import ContractCustomError, ContractLogicError, Web3RPCError

from intentqueue.chain.devchain import (
    DevChain,
    DevChainServer,
    DevChainState,
    contract_artifact,
    deploy_dev_contracts,
    dev_accounts,
    run_devchains,
)
from intentqueue.hashing import intent_hash, reward_hash

ROOT = Path(__file__).resolve().parent.parent
CHAIN_ID = 31337
ACCOUNTS = dev_accounts()
DEPLOYER, ALICE, BOB, CAROL, DAVE, ERIN = ACCOUNTS[:6]
SOLVER = "0x000000000000000000000000000000000000dEaD"
SOLVER_KEY = "SOLVER_PRIVATE_KEY"

# Run with the test interpreter in a fresh process: a client that shares nothing with the
# server but the URL. argv: url, private key, recipient, count.
TRANSFER_CLIENT = """
import json, sys
from eth_account import Account
from web3 import Web3

url, key, to, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
w3 = Web3(Web3.HTTPProvider(url))
account = Account.from_key(key)
chain_id = w3.eth.chain_id
nonce = w3.eth.get_transaction_count(account.address, "pending")
statuses, blocks = [], []
for i in range(count):
    if i % 2:
        fees = {"maxFeePerGas": 3 * 10**9, "maxPriorityFeePerGas": 10**9}
    else:  # a legacy transaction, EIP-155 signed: v = chain_id * 2 + 35/36
        fees = {"gasPrice": 2 * 10**9}
    tx = {"to": to, "value": 1000 + i, "gas": 21000, "nonce": nonce + i, "chainId": chain_id}
    signed = account.sign_transaction({**tx, **fees})
    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=20, poll_latency=0.02)
    statuses.append(receipt["status"])
    blocks.append(receipt["blockNumber"])
    sent = w3.eth.get_transaction(tx_hash)
    assert sent["from"] == account.address and sent["nonce"] == nonce + i
print(json.dumps({"chain_id": chain_id, "statuses": statuses, "blocks": blocks,
                  "nonce": w3.eth.get_transaction_count(account.address)}))
"""


def _client(url: str, key: str, to: str, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", TRANSFER_CLIENT, url, key, to, str(count)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip


def _result(process: subprocess.Popen[str]) -> dict[str, Any]:
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


def _post(url: str, body: bytes | str) -> tuple[int, Any]:
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        raw = response.read()
        return response.status, json.loads(raw) if raw else None


def _rpc(url: str, method: str, *params: Any) -> dict[str, Any]:
    status, answer = _post(
        url, json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)})
    )
    assert status == 200
    return dict(answer)


def _error_data(signature: str, *values: Any) -> str:
    types = [t for t in signature[signature.index("(") + 1 : -1].split(",") if t]
    return (
        "0x" + (function_signature_to_4byte_selector(signature) + encode(types, list(values))).hex()
    )


def _transfer(
    sender: Any, nonce: int, *, chain_id: int = CHAIN_ID, value: int = 1, gas: int = 21000
) -> bytes:
    tx = {
        "to": ERIN.address,
        "value": value,
        "gas": gas,
        "nonce": nonce,
        "chainId": chain_id,
        "maxFeePerGas": 3 * 10**9,
        "maxPriorityFeePerGas": 10**9,
    }
    return bytes(sender.local_account().sign_transaction(tx).raw_transaction)


def _port_closed(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((host, int(port))) != 0


@pytest.fixture(scope="module")
def server() -> Iterator[DevChainServer]:
    with DevChainServer(DevChain(CHAIN_ID)) as running:
        yield running


@pytest.fixture(scope="module")
def w3(server: DevChainServer) -> Web3:
    return Web3(Web3.HTTPProvider(server.url))


@pytest.fixture(scope="module")
def contracts(w3: Web3) -> dict[str, Any]:
    addresses = deploy_dev_contracts(w3, DEPLOYER.local_account())
    return {
        name: w3.eth.contract(address=addresses[key], abi=contract_artifact(name)["abi"])
        for key, name in (("portal", "Portal"), ("token", "TestToken"))
    }


def test_another_process_sees_the_chain_id_and_sends_eip155_transfers(
    server: DevChainServer, w3: Web3
) -> None:
    before = w3.eth.get_balance(ERIN.address)
    result = _result(_client(server.url, ALICE.private_key, ERIN.address, 2))
    assert result["chain_id"] == CHAIN_ID
    assert result["statuses"] == [1, 1]
    assert result["nonce"] == 2
    assert w3.eth.get_balance(ERIN.address) == before + 1000 + 1001
    # Auto-mined: one block per transaction, and the chain's CHAINID opcode agrees.
    assert result["blocks"][1] == result["blocks"][0] + 1
    assert w3.eth.chain_id == CHAIN_ID and w3.net.version == str(CHAIN_ID)


def test_two_processes_sending_at_once_both_succeed(server: DevChainServer, w3: Web3) -> None:
    count = 12
    clients = [_client(server.url, s.private_key, ERIN.address, count) for s in (BOB, CAROL)]
    results = [_result(client) for client in clients]
    for result, sender in zip(results, (BOB, CAROL), strict=True):
        assert result["statuses"] == [1] * count
        assert w3.eth.get_transaction_count(sender.address) == count
    blocks = results[0]["blocks"] + results[1]["blocks"]
    assert len(set(blocks)) == 2 * count  # one transaction per block, none lost


def test_the_rpc_methods_a_client_needs(w3: Web3) -> None:
    latest = w3.eth.get_block("latest", full_transactions=True)
    assert latest["number"] == w3.eth.block_number and len(latest["logsBloom"]) == 256
    if latest["transactions"]:
        assert latest["transactions"][0]["blockNumber"] == latest["number"]
    assert w3.eth.gas_price == 10**9 and w3.eth.max_priority_fee == 10**9
    history = w3.eth.fee_history(3, "latest", [50])
    assert history["oldestBlock"] == max(0, latest["number"] - 2)
    assert len(history["baseFeePerGas"]) == len(history["gasUsedRatio"]) + 1 == 4
    assert len(history["reward"]) == 3
    assert w3.eth.estimate_gas({"from": DAVE.address, "to": ERIN.address, "value": 1}) == 21000
    assert w3.client_version.startswith("EthereumTester/")
    unknown = _rpc(w3.provider.endpoint_uri, "eth_getTransactionReceipt", "0x" + "ab" * 32)
    assert unknown["result"] is None


def test_reverted_call_is_a_geth_style_error_with_the_revert_data(
    w3: Web3, contracts: dict[str, Any]
) -> None:
    token = contracts["TestToken"]
    transfer_from = token.functions.transferFrom(ALICE.address, BOB.address, 5)
    expected = _error_data("InsufficientAllowance(address,uint256,uint256)", DAVE.address, 0, 5)
    with pytest.raises(ContractCustomError) as info:
        transfer_from.call({"from": DAVE.address})
    assert isinstance(info.value, ContractLogicError) and info.value.data == expected
    with pytest.raises(ContractCustomError) as info:
        transfer_from.estimate_gas({"from": DAVE.address})
    assert info.value.data == expected

    call = {
        "from": DAVE.address,
        "to": token.address,
        "data": transfer_from._encode_transaction_data(),
    }
    error = _rpc(w3.provider.endpoint_uri, "eth_call", call, "latest")["error"]
    assert error == {"code": 3, "message": "execution reverted", "data": expected}


def test_portal_hashes_and_sees_the_custom_chain_id(w3: Web3, contracts: dict[str, Any]) -> None:
    portal = contracts["Portal"]
    now = w3.eth.get_block("latest")["timestamp"]
    route = {
        "salt": "0x" + keccak(text="devchain").hex(),
        "deadline": now + 3600,
        "portal": portal.address,
        "native_amount": 0,
        "tokens": [],
        "calls": [],
    }
    reward = {
        "deadline": now + 7200,
        "creator": ALICE.address,
        "prover": BOB.address,
        "native_amount": 0,
        "tokens": [],
    }
    route_arg = {
        "salt": to_bytes(hexstr=route["salt"]),
        "deadline": route["deadline"],
        "portal": route["portal"],
        "nativeAmount": 0,
        "tokens": [],
        "calls": [],
    }
    reward_arg = {
        "deadline": reward["deadline"],
        "creator": reward["creator"],
        "prover": reward["prover"],
        "nativeAmount": 0,
        "tokens": [],
    }
    on_chain = portal.functions.getIntentHash(CHAIN_ID, route_arg, reward_arg).call()
    assert "0x" + on_chain[0].hex() == intent_hash(CHAIN_ID, route, reward)

    # fulfill hashes with block.chainid: a hash made for another chain id is rejected with
    # the hash for this chain's id.
    wrong = to_bytes(hexstr=intent_hash(1, route, reward))
    claimant = b"\x00" * 12 + to_bytes(hexstr=BOB.address)
    fulfill = portal.functions.fulfill(wrong, route_arg, reward_hash(reward), claimant)
    with pytest.raises(ContractCustomError) as info:
        fulfill.call({"from": BOB.address})
    expected = to_bytes(hexstr=intent_hash(CHAIN_ID, route, reward))
    assert info.value.data == _error_data("InvalidHash(bytes32)", expected)


def test_transaction_pool_errors_read_like_geth(w3: Web3) -> None:
    nonce = w3.eth.get_transaction_count(DAVE.address)
    cases = [
        (_transfer(DAVE, nonce, chain_id=1), "invalid chain id for signer: have 1 want 31337"),
        (_transfer(DAVE, nonce, value=10**30), "insufficient funds for gas * price + value"),
        (_transfer(DAVE, nonce, gas=20_000), "intrinsic gas too low"),
    ]
    for raw, message in cases:
        with pytest.raises(Web3RPCError) as info:
            w3.eth.send_raw_transaction(raw)
        assert info.value.rpc_response["error"]["code"] == -32000
        assert message in info.value.rpc_response["error"]["message"]

    # Ahead of the account's nonce: queued until the gap is filled, as a node's pool does.
    later = w3.eth.send_raw_transaction(_transfer(DAVE, nonce + 1))
    with pytest.raises(Web3RPCError, match="already known"):
        w3.eth.send_raw_transaction(_transfer(DAVE, nonce + 1))
    assert w3.eth.get_transaction_count(DAVE.address, "pending") == nonce
    first = w3.eth.send_raw_transaction(_transfer(DAVE, nonce))
    assert w3.eth.get_transaction_receipt(first)["status"] == 1
    assert w3.eth.get_transaction_receipt(later)["status"] == 1
    assert w3.eth.get_transaction_count(DAVE.address) == nonce + 2
    with pytest.raises(Web3RPCError, match=f"nonce too low: address {DAVE.address}"):
        w3.eth.send_raw_transaction(_transfer(DAVE, nonce))


def test_json_rpc_protocol_errors(server: DevChainServer) -> None:
    url = server.url
    assert _post(url, "{not json")[1] == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32700, "message": "parse error"},
    }
    unknown = _rpc(url, "eth_noSuchMethod")
    assert unknown["id"] == 1 and unknown["error"]["code"] == -32601
    assert _post(url, '{"jsonrpc": "2.0", "id": 7}')[1]["error"]["code"] == -32600
    assert _post(url, "[]")[1]["error"]["code"] == -32600
    assert _rpc(url, "eth_getBalance", "not-an-address", "latest")["error"]["code"] == -32602
    bad_params = '{"jsonrpc": "2.0", "id": 2, "method": "eth_blockNumber", "params": {"a": 1}}'
    assert _post(url, bad_params)[1]["error"]["code"] == -32602

    batch = [
        {"jsonrpc": "2.0", "id": "a", "method": "eth_chainId", "params": []},
        {"jsonrpc": "2.0", "method": "eth_blockNumber"},  # a notification: no answer
        {"jsonrpc": "2.0", "id": "b", "method": "nope"},
        42,
    ]
    status, answers = _post(url, json.dumps(batch))
    assert status == 200
    assert answers[0] == {"jsonrpc": "2.0", "id": "a", "result": hex(CHAIN_ID)}
    assert answers[1]["id"] == "b" and answers[1]["error"]["code"] == -32601
    assert answers[2]["error"]["code"] == -32600 and len(answers) == 3
    assert _post(url, '{"jsonrpc": "2.0", "method": "eth_chainId"}') == (204, None)


def test_dev_methods_mine_and_set_balance(w3: Web3) -> None:
    url = w3.provider.endpoint_uri
    number = w3.eth.block_number
    assert "error" not in _rpc(url, "evm_mine")
    assert "error" not in _rpc(url, "anvil_mine", "0x3")
    assert w3.eth.block_number == number + 4
    assert _rpc(url, "anvil_setBalance", SOLVER, hex(12345))["result"] is True
    assert w3.eth.get_balance(SOLVER) == 12345


def _signed_transfers(chain_id: int, count: int) -> list[bytes]:
    sender = ALICE.local_account()
    return [
        bytes(
            sender.sign_transaction(
                {"to": ERIN.address, "value": 1, "gas": 21000, "nonce": n, "chainId": chain_id,
                 "maxFeePerGas": 3 * 10**9, "maxPriorityFeePerGas": 10**9}
            ).raw_transaction
        )
        for n in range(count)
    ]  # fmt: skip


def test_block_time_mines_blocks_without_traffic() -> None:
    with DevChainServer(DevChain(31338, block_time=0.2)) as running:
        w3 = Web3(Web3.HTTPProvider(running.url))
        start = w3.eth.block_number
        time.sleep(0.9)
        assert w3.eth.block_number >= start + 3
        (raw,) = _signed_transfers(31338, 1)
        tx_hash = w3.eth.send_raw_transaction(raw)
        receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=5, poll_latency=0.02)
        assert receipt["status"] == 1
        # Confirmations keep coming with nobody sending anything.
        time.sleep(0.5)
        assert w3.eth.block_number >= receipt["blockNumber"] + 2
    assert _port_closed(running.url)


def test_with_a_block_time_transactions_wait_in_the_pending_block() -> None:
    with DevChainServer(DevChain(31339, block_time=60)) as running:
        w3 = Web3(Web3.HTTPProvider(running.url))
        hashes = [w3.eth.send_raw_transaction(raw) for raw in _signed_transfers(31339, 2)]
        # The pending nonce counts both (a client can send its next one), latest does not.
        assert w3.eth.get_transaction_count(ALICE.address, "pending") == 2
        assert w3.eth.get_transaction_count(ALICE.address, "latest") == 0
        assert w3.eth.get_transaction(hashes[1])["blockNumber"] is None
        assert (
            _rpc(running.url, "eth_getTransactionReceipt", hashes[0].to_0x_hex())["result"] is None
        )
        _rpc(running.url, "evm_mine")
        receipts = [w3.eth.get_transaction_receipt(h) for h in hashes]
        assert [r["status"] for r in receipts] == [1, 1]
        assert receipts[0]["blockNumber"] == receipts[1]["blockNumber"] == 1


def test_run_devchains_deploys_funds_and_writes_the_state_file(tmp_path: Path) -> None:
    state_file = tmp_path / "state" / "devchain.json"
    chains = run_devchains((41, 42), solver_address=SOLVER, state_file=state_file)
    try:
        data = json.loads(state_file.read_text())
        assert set(data["chains"]) == {"41", "42"}
        assert data["solver"] == SOLVER
        assert data["funder"] == {"address": DEPLOYER.address, "private_key": DEPLOYER.private_key}
        source, destination = data["chains"]["41"], data["chains"]["42"]
        assert (source["role"], destination["role"]) == ("source", "destination")
        # Same deployer, same nonces: the same addresses on both chains, run after run.
        assert source["portal"] == destination["portal"]
        assert source["token"] == destination["token"]
        assert DevChainState.read(state_file).destinations[0].rpc_url == destination["rpc_url"]

        for chain_id, info in ((41, source), (42, destination)):
            w3 = Web3(Web3.HTTPProvider(info["rpc_url"]))
            assert w3.eth.chain_id == chain_id
            assert w3.eth.get_code(info["portal"]) != b""
            assert w3.eth.get_balance(SOLVER) == 1000 * 10**18
            token = w3.eth.contract(
                address=info["token"], abi=contract_artifact("TestToken")["abi"]
            )
            tokens = token.functions.balanceOf(SOLVER).call()
            assert tokens == (10**24 if chain_id == 42 else 0)
    finally:
        chains.stop()
    assert all(_port_closed(info["rpc_url"]) for info in data["chains"].values())


def _command_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", SOLVER_KEY}}
    env.pop("INTENTQUEUE_EMBEDDED_REDIS", None)
    # The command needs no Redis; a URL that is never contacted keeps settings from
    # starting the embedded one.
    env.update(
        INTENTQUEUE_VAR_DIR=str(tmp_path),
        DJANGO_SETTINGS_MODULE="project.settings",
        DEBUG="1",
        REDIS_URL="redis://127.0.0.1:1/0",
    )
    return env


def test_devchain_command_serves_until_sigterm(tmp_path: Path) -> None:
    state_file = tmp_path / "devchain.json"
    solver_key = "0x" + "42" * 32
    env = {**_command_env(tmp_path), SOLVER_KEY: solver_key}
    process = subprocess.Popen(
        [sys.executable, "manage.py", "devchain", "--port-base", "0", "--chain-ids", "31337,31338",
         "--state-file", str(state_file)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not state_file.exists():
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "no state file"
            time.sleep(0.1)
        state = DevChainState.read(state_file)
        assert state.solver == Account.from_key(solver_key).address
        assert solver_key[2:] not in state_file.read_text()  # the solver's key is never written
        for chain_id in (31337, 31338):
            assert Web3(Web3.HTTPProvider(state.chains[chain_id].rpc_url)).eth.chain_id == chain_id
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr
    lines = stdout.splitlines()
    assert lines[0].startswith("chain 31337 (source): http://127.0.0.1:")
    assert "portal=0x" in lines[1] and "token=0x" in lines[1]
    assert all(_port_closed(info.rpc_url) for info in state.chains.values())
    assert not state_file.exists()


def test_devchain_command_needs_a_solver_address(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "devchain", "--port-base", "0"],
        cwd=ROOT, env=_command_env(tmp_path), capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--solver-address" in result.stderr and SOLVER_KEY in result.stderr
