"""Chain configuration, error classification against a real node, and wallets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from eth_account import Account
from web3 import Web3
from web3.exceptions import ContractLogicError, Web3RPCError

from intentqueue.chain import config as chain_config
from intentqueue.chain.client import (
    FeeTooLowError,
    NonceConflictError,
    classify,
    get_client,
)
from intentqueue.chain.config import (
    ChainNotConfigured,
    check_chains,
    get_chain,
    parse_chain,
)
from intentqueue.chain.devchain import DevChain, DevChainServer, DevChainState, dev_accounts
from intentqueue.chain.wallets import (
    KEY_ENV,
    KEY_FILE_ENV,
    BasicWallet,
    WalletNotConfigured,
    get_wallet,
)
from intentqueue.checks import check_chain_settings
from intentqueue.exceptions import (
    InsufficientBalanceError,
    NetworkError,
    PermanentError,
    TransactionFailedError,
    TransientError,
)
from tests.chainkit import free_port, reset_caches

PORTAL = "0x" + "11" * 20
PROVER = "0x" + "44" * 20
KEY = "0x" + "4f" * 32


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in (KEY_ENV, KEY_FILE_ENV, chain_config.DEVCHAIN_STATE_ENV, "CHAIN_10_RPC_URL"):
        monkeypatch.delenv(name, raising=False)
    reset_caches()
    yield
    reset_caches()


def chains(**entries: Any) -> override_settings:
    return override_settings(INTENTQUEUE={**settings.INTENTQUEUE, "chains": entries})


# --- configuration ----------------------------------------------------------------------


def test_a_chain_entry_with_defaults() -> None:
    config = parse_chain("10", {"rpc_url": "http://127.0.0.1:8545", "portal": PORTAL})
    assert config.chain_id == 10 and config.portal == Web3.to_checksum_address(PORTAL)
    assert (config.confirmations, config.tokens, config.prover) == (2, (), None)
    assert config.rpc_timeout == 10.0 and config.replace_after == 60


@pytest.mark.parametrize(
    ("key", "entry", "message"),
    [
        ("ten", {}, "INTENTQUEUE.chains.ten: the key must be a chain id"),
        ("10", {"portal": PORTAL}, "INTENTQUEUE.chains.10.rpc_url: required"),
        ("10", {"rpc_url": "ws://x", "portal": PORTAL}, "INTENTQUEUE.chains.10.rpc_url: required"),
        ("10", {"rpc_url": "http://x"}, "INTENTQUEUE.chains.10.portal: required"),
        ("10", {"rpc_url": "http://x", "portal": "0x12"}, "INTENTQUEUE.chains.10.portal: expected"),
        ("10", {"rpc_url": "http://x", "portal": PORTAL, "confirmation": 2},
         "INTENTQUEUE.chains.10.confirmation: unknown key"),
        ("10", {"rpc_url": "http://x", "portal": PORTAL, "confirmations": 0},
         "INTENTQUEUE.chains.10.confirmations: expected an integer >= 1"),
        ("10", {"rpc_url": "http://x", "portal": PORTAL, "tokens": [PORTAL, "nope"]},
         "INTENTQUEUE.chains.10.tokens.1: expected a 20-byte hex address"),
        ("10", {"rpc_url": "http://x", "portal": PORTAL, "prover": 5},
         "INTENTQUEUE.chains.10.prover: expected"),
    ],
)  # fmt: skip
def test_bad_entries_name_the_key(key: str, entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ImproperlyConfigured) as raised:
        parse_chain(key, entry)
    assert str(raised.value).startswith(message)


def test_unconfigured_chain_is_a_permanent_error_naming_the_setting() -> None:
    configured = chains(**{"1": {"rpc_url": "http://127.0.0.1:1", "portal": PORTAL}})
    with configured, pytest.raises(ChainNotConfigured) as raised:
        get_chain(10)
    assert isinstance(raised.value, PermanentError)
    assert "INTENTQUEUE['chains']['10']" in str(raised.value)
    assert "configured chains: 1" in str(raised.value)


def test_rpc_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "https://user:api-key@rpc.example/v2/abc"
    with chains(**{"10": {"portal": PORTAL, "rpc_url": "http://127.0.0.1:8545"}}):
        assert get_chain(10).rpc_url == "http://127.0.0.1:8545"
        monkeypatch.setenv("CHAIN_10_RPC_URL", secret)
        config = get_chain(10)
        assert config.rpc_url == secret
        # The URL's credentials stay out of reprs (and so out of logs and tracebacks).
        assert "api-key" not in repr(config) and "rpc.example" in repr(config)


def test_chains_from_the_devchain_state_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = {
        "chains": {
            "31337": {"rpc_url": "http://127.0.0.1:9001", "portal": PORTAL, "token": PROVER,
                      "role": "source"},
            "31338": {"rpc_url": "http://127.0.0.1:9002", "portal": PORTAL, "token": PROVER,
                      "role": "destination"},
        },
        "solver": PROVER,
        "funder": {"address": PROVER, "private_key": KEY},
    }  # fmt: skip
    path = tmp_path / "devchain.json"
    path.write_text(json.dumps(state))
    assert DevChainState.read(path).source.chain_id == 31337
    monkeypatch.setenv(chain_config.DEVCHAIN_STATE_ENV, str(path))
    with chains(**{"31338": {"confirmations": 5}}):  # settings lay over the file
        source, destination = get_chain(31337), get_chain(31338)
        assert source.rpc_url == "http://127.0.0.1:9001"
        assert destination.confirmations == 5 and destination.rpc_url.endswith(":9002")
        assert destination.tokens == (Web3.to_checksum_address(PROVER),)
        # The file changes (chains restarted on other ports): seen without a restart.
        state["chains"]["31337"]["rpc_url"] = "http://127.0.0.1:9009"
        path.write_text(json.dumps(state) + "\n")
        assert get_chain(31337).rpc_url == "http://127.0.0.1:9009"
        path.unlink()
        assert any("cannot read the dev chain state file" in p for p in check_chains())


def test_system_check_reports_broken_chains() -> None:
    with chains(**{"10": {"portal": PORTAL}}):
        errors = check_chain_settings()
    assert [e.id for e in errors] == ["intentqueue.E010"]
    assert "INTENTQUEUE.chains.10.rpc_url: required" in errors[0].msg
    with chains(**{"10": {"portal": PORTAL, "rpc_url": "http://127.0.0.1:8545"}}):
        assert check_chain_settings() == []


# --- classification of real errors ----------------------------------------------------------


@pytest.fixture(scope="module")
def node() -> Iterator[Web3]:
    with DevChainServer(DevChain(31340)) as server:
        yield Web3(Web3.HTTPProvider(server.url))


def _transfer(w3: Web3, nonce: int | None = None, **overrides: Any) -> bytes:
    account = dev_accounts()[3].local_account()
    tx = {
        "to": account.address, "value": 0, "gas": 21000, "chainId": w3.eth.chain_id,
        "nonce": w3.eth.get_transaction_count(account.address) if nonce is None else nonce,
        "maxFeePerGas": 3 * 10**9, "maxPriorityFeePerGas": 10**9, **overrides,
    }  # fmt: skip
    return bytes(account.sign_transaction(tx).raw_transaction)


def _raised(action: Any) -> BaseException:
    try:
        action()
    except Exception as error:
        return error
    raise AssertionError("nothing raised")


def test_connection_refused_is_a_network_error_without_the_urls_secrets() -> None:
    w3 = Web3(Web3.HTTPProvider(f"http://127.0.0.1:{free_port()}/v2/secret-api-key"))
    error = _raised(lambda: w3.eth.block_number)
    assert isinstance(error, requests.ConnectionError) and "secret-api-key" in str(error)
    classified = classify(error)
    assert isinstance(classified, NetworkError) and "secret-api-key" not in str(classified)


def test_node_errors_are_classified_by_message(node: Web3) -> None:
    def send(raw: bytes) -> Any:
        return lambda: node.eth.send_raw_transaction(raw)

    insufficient = _raised(send(_transfer(node, value=10**30)))
    assert isinstance(insufficient, Web3RPCError)
    assert isinstance(classify(insufficient), InsufficientBalanceError)
    assert isinstance(classify(_raised(send(_transfer(node, chainId=1)))), TransactionFailedError)
    assert isinstance(classify(_raised(send(_transfer(node, gas=20000)))), TransactionFailedError)
    raw = _transfer(node)
    node.eth.send_raw_transaction(raw)
    nonce_too_low = classify(_raised(send(raw)))
    assert isinstance(nonce_too_low, NonceConflictError) and "nonce too low" in str(nonce_too_low)
    # a nonce-gap transaction sent twice: "already known"
    ahead = _transfer(node, nonce=node.eth.get_transaction_count(dev_accounts()[3].address) + 5)
    node.eth.send_raw_transaction(ahead)
    known = classify(_raised(send(ahead)))
    assert isinstance(known, NonceConflictError) and "already known" in str(known)
    low_fee = classify(_raised(send(_transfer(node, maxFeePerGas=1, maxPriorityFeePerGas=1))))
    assert isinstance(low_fee, FeeTooLowError)


def test_reverts_are_failed_transactions_with_the_custom_error(node: Web3) -> None:
    from intentqueue.chain.client import contract_abi

    token = node.eth.contract(address="0x" + "00" * 19 + "01", abi=contract_abi("TestToken"))
    # a call to an address without code: nothing to decode, the address is wrong for good
    assert isinstance(classify(_raised(token.functions.decimals().call)), PermanentError)
    from intentqueue.chain.devchain import deploy_dev_contracts

    addresses = deploy_dev_contracts(node, dev_accounts()[0].local_account())
    token = node.eth.contract(address=addresses["token"], abi=contract_abi("TestToken"))
    call = token.functions.transferFrom(dev_accounts()[1].address, dev_accounts()[2].address, 5)
    revert = _raised(lambda: call.call({"from": dev_accounts()[2].address}))
    assert isinstance(revert, ContractLogicError)
    failed = classify(revert)
    assert isinstance(failed, TransactionFailedError)
    assert "InsufficientAllowance(address,uint256,uint256)" in str(failed)


def test_unknown_errors_are_transient() -> None:
    error = classify(RuntimeError("header not found"))
    assert type(error) is TransientError


def test_client_reads_through_the_configured_timeout(node: Web3) -> None:
    url = node.provider.endpoint_uri  # type: ignore[attr-defined]
    with chains(**{"31340": {"rpc_url": url, "portal": PORTAL, "rpc_timeout": 3}}):
        client = get_client(31340)
        assert get_client("31340") is client  # one client per process and chain
        assert client.w3.provider._request_kwargs == {"timeout": 3.0}  # type: ignore[attr-defined]
        assert client.block_number() >= 0
    closed = chains(**{"31340": {"rpc_url": f"http://127.0.0.1:{free_port()}", "portal": PORTAL}})
    with closed, pytest.raises(NetworkError, match="eth_blockNumber: RPC unreachable"):
        get_client(31340).block_number()


# --- wallets ------------------------------------------------------------------------------


def test_basic_wallet_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    wallet = get_wallet()
    assert isinstance(wallet, BasicWallet) and wallet.wallet_type == "basic"
    assert wallet.address == Account.from_key(KEY).address
    assert get_wallet("basic") is wallet
    assert wallet.claimant == bytes(12) + bytes.fromhex(wallet.address[2:])
    for shown in (repr(wallet), str(wallet), repr(vars(wallet))):
        assert KEY[2:] not in shown.lower()
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(wallet)


def test_basic_wallet_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "solver.key"
    key_file.write_text(KEY + "\n")
    monkeypatch.setenv(KEY_FILE_ENV, str(key_file))
    assert get_wallet().address == Account.from_key(KEY).address


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "the 'basic' wallet has no key: set SOLVER_PRIVATE_KEY or SOLVER_PRIVATE_KEY_FILE"),
        ({KEY_ENV: KEY, KEY_FILE_ENV: "/x"}, "set only one of"),
        ({KEY_ENV: KEY[:-2] + "zz"}, "SOLVER_PRIVATE_KEY is not a valid private key"),
        ({KEY_FILE_ENV: "/nonexistent/key"}, "cannot read SOLVER_PRIVATE_KEY_FILE"),
    ],
)
def test_unusable_keys_are_permanent_errors_that_never_show_the_key(
    env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(WalletNotConfigured) as raised:
        get_wallet()
    assert isinstance(raised.value, PermanentError)
    assert message in str(raised.value)
    assert KEY[4:-4] not in str(raised.value) and raised.value.__cause__ is None


def test_an_unconfigured_wallet_type_has_no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(WalletNotConfigured) as raised:
        get_wallet("kernel")
    assert str(raised.value).startswith(
        "wallet type 'kernel' is not configured (configured: basic)"
    )
    wallets = {"basic": {"class": "intentqueue.chain.wallets.BasicWallet"},
               "broken": {"class": "intentqueue.models.Intent"}}  # fmt: skip
    configured = override_settings(INTENTQUEUE={**settings.INTENTQUEUE, "wallets": wallets})
    with configured, pytest.raises(WalletNotConfigured, match=r"broken\.class: not a subclass"):
        get_wallet("broken")
