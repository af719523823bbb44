"""A web3.py client per configured chain, and the classification of chain errors.

``get_client(chain_id)`` returns a ``ChainClient``: a ``Web3`` over ``HTTPProvider`` with
the chain's timeout, cached per process (one HTTP session, reused), plus the reads the
solver needs. Every read goes through ``rpc_errors()``, which turns whatever web3,
requests or the node raised into our taxonomy with ``classify()``.

Errors are classified by their lower-cased message, not by code: anvil, geth and the
dev chain use different codes for the same condition. ``Web3RPCError`` is not a
``ValueError`` in web3 8 and ``TransactionNotFound`` subclasses it, so lookups that may
find nothing catch ``TransactionNotFound`` first.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import requests
from eth_utils import keccak, to_checksum_address
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import (
    BadFunctionCallOutput,
    ContractLogicError,
    TimeExhausted,
    TransactionNotFound,
    Web3RPCError,
)
from web3.middleware import AttributeDictMiddleware
from web3.providers.rpc.utils import ExceptionRetryConfiguration
from web3.types import TxReceipt

from intentqueue.chain.config import ChainConfig, get_chain
from intentqueue.exceptions import (
    InsufficientBalanceError,
    IntentQueueError,
    NetworkError,
    PermanentError,
    TransactionFailedError,
    TransientError,
)

CONTRACTS_DIR: Final = Path(__file__).resolve().parent / "contracts"
UINT256_MAX: Final = 2**256 - 1
ZERO_BYTES32: Final = b"\x00" * 32


class NonceConflictError(TransientError):
    """The node refused a transaction because its nonce is used or the same transaction
    is known already. The sender settles these by the transaction's hash; one that
    escapes is retried with backoff."""

    error_type = "nonce_conflict"


class FeeTooLowError(TransientError):
    """The node refused a transaction's fees (below the base fee, or an underpriced
    replacement)."""

    error_type = "fee_too_low"


# --- classification ---------------------------------------------------------------------

_NETWORK = (
    "connection refused", "connection reset", "connection aborted", "connectionerror",
    "max retries exceeded", "remote end closed", "broken pipe", "failed to establish",
    "name or service not known", "temporary failure in name resolution", "timed out",
    "timeout", "connection closed", "eof occurred",
)  # fmt: skip
_NONCE = (
    "nonce too low", "already known", "already imported", "known transaction",
    "nonce has already been used", "replacement transaction underpriced",
)  # fmt: skip
_FEE = ("max fee per gas less than block base fee", "transaction underpriced", "fee cap")
_FAILED = (
    "execution reverted", "revert", "invalid chain id", "intrinsic gas", "exceeds block gas",
    "gas limit reached", "invalid sender", "out of gas", "invalid opcode",
)  # fmt: skip


def _message(error: BaseException) -> str:
    if isinstance(error, Web3RPCError) and isinstance(error.rpc_response, dict):
        detail = error.rpc_response.get("error")
        if isinstance(detail, dict) and detail.get("message"):
            return f"{detail['message']} {error}".lower()
    return f"{type(error).__name__} {error}".lower()


def classify(error: BaseException) -> IntentQueueError:
    """The taxonomy error for ``error`` raised by web3, requests or the node.

    | message contains                                  | error                      |
    |---------------------------------------------------|----------------------------|
    | connection refused/reset, timed out               | ``NetworkError``           |
    | insufficient funds                                | ``InsufficientBalanceError`` |
    | nonce too low, already known, replacement ...     | ``NonceConflictError``     |
    | below base fee, underpriced                       | ``FeeTooLowError``         |
    | revert, invalid chain id, intrinsic gas, ...      | ``TransactionFailedError`` |
    | anything else (5xx, unknown block, ...)           | ``TransientError``         |
    """
    if isinstance(error, IntentQueueError):
        return error
    text = _message(error)
    if isinstance(error, ContractLogicError):
        return TransactionFailedError(f"execution reverted: {describe_revert(error)}")
    if isinstance(error, BadFunctionCallOutput):
        return PermanentError(f"unreadable contract answer (is the address a contract?): {error}")
    if isinstance(error, requests.ConnectionError | requests.Timeout | ConnectionError):
        return NetworkError(f"RPC unreachable: {_short(error)}")
    if isinstance(error, TimeExhausted):
        return TransientError(str(error))
    if "insufficient funds" in text:
        return InsufficientBalanceError(_short(error))
    if any(marker in text for marker in _NONCE):
        return NonceConflictError(_short(error))
    if any(marker in text for marker in _FEE):
        return FeeTooLowError(_short(error))
    if any(marker in text for marker in _FAILED):
        return TransactionFailedError(_short(error))
    if any(marker in text for marker in _NETWORK):
        return NetworkError(f"RPC unreachable: {_short(error)}")
    return TransientError(_short(error))


def _short(error: BaseException) -> str:
    if isinstance(error, Web3RPCError) and isinstance(error.rpc_response, dict):
        detail = error.rpc_response.get("error")
        if isinstance(detail, dict) and detail.get("message"):
            return str(detail["message"])[:500]
    text = str(error) or type(error).__name__
    # requests quotes the URL's path ("Max retries exceeded with url: /v2/<api key>"):
    # keep RPC credentials out of messages that end up on the intent's timeline.
    return _URL_PATH.sub(r"\1<path>", text)[:500]


_URL_PATH = re.compile(r"(with url: )\S+")


@contextlib.contextmanager
def rpc_errors(what: str = "") -> Iterator[None]:
    """Raise whatever the block raises as the taxonomy error ``classify()`` picks."""
    try:
        yield
    except IntentQueueError:
        raise
    except Exception as error:
        classified = classify(error)
        if what:
            classified.args = (f"{what}: {classified}",)
        raise classified from error


# --- contract errors --------------------------------------------------------------------


@functools.cache
def contract_abi(name: str) -> list[dict[str, Any]]:
    """The committed ABI of contract ``name`` (``Portal``, ``TestToken``)."""
    artifact = json.loads((CONTRACTS_DIR / f"{name}.json").read_text())
    return list(artifact["abi"])


@functools.cache
def _error_selectors() -> dict[str, str]:
    """4-byte selectors of the custom errors of our contracts, to their signatures."""
    selectors = {"0x08c379a0": "Error(string)", "0x4e487b71": "Panic(uint256)"}
    for name in ("Portal", "TestToken"):
        for item in contract_abi(name):
            if item.get("type") == "error":
                signature = f"{item['name']}({','.join(i['type'] for i in item['inputs'])})"
                selectors["0x" + keccak(text=signature)[:4].hex()] = signature
    return selectors


def revert_selector(error: BaseException) -> str | None:
    """The custom error's signature in a revert (``IntentAlreadyFulfilled(bytes32)``)."""
    data = getattr(error, "data", None)
    if isinstance(data, str) and data.startswith("0x") and len(data) >= 10:
        return _error_selectors().get(data[:10].lower())
    return None


def describe_revert(error: BaseException) -> str:
    """A readable reason for a revert: the custom error's name, or the node's message."""
    signature = revert_selector(error)
    if signature is not None:
        return signature
    message = getattr(error, "message", None) or str(error)
    return str(message)[:300]


# --- the client -------------------------------------------------------------------------


class ChainClient:
    """Reads of one chain through web3.py; errors come out classified."""

    def __init__(self, config: ChainConfig) -> None:
        self.config = config
        provider = Web3.HTTPProvider(
            config.rpc_url,
            request_kwargs={"timeout": config.rpc_timeout},
            # web3 would retry a timeout five times with backoff; one retry is enough,
            # and a broadcast retried after a timeout is settled by its hash anyway.
            exception_retry_configuration=ExceptionRetryConfiguration(
                errors=(requests.HTTPError, requests.Timeout), retries=2, backoff_factor=0.1
            ),
        )
        # Only the AttributeDict middleware: web3's validation middleware asks the node for
        # its chain id before every call (a third of the round trips of a job), and
        # nothing here sends by ENS name or lets web3 price gas.
        self.w3 = Web3(provider, middleware=[AttributeDictMiddleware])
        self.chain_id = config.chain_id
        self.portal: Contract = self.w3.eth.contract(
            address=to_checksum_address(config.portal), abi=contract_abi("Portal")
        )

    def __repr__(self) -> str:
        return f"<ChainClient {self.config!r}>"

    def token(self, address: str) -> Contract:
        """An ERC-20 contract (our ``TestToken`` ABI covers the standard calls)."""
        return self.w3.eth.contract(
            address=to_checksum_address(address), abi=contract_abi("TestToken")
        )

    # --- reads ---

    def block_number(self) -> int:
        with rpc_errors("eth_blockNumber"):
            return int(self.w3.eth.block_number)

    def nonce(self, address: str, block: str = "latest") -> int:
        """Transactions sent by ``address`` as of ``block`` (``latest`` or ``pending``)."""
        with rpc_errors("eth_getTransactionCount"):
            return int(self.w3.eth.get_transaction_count(to_checksum_address(address), block))  # type: ignore[arg-type]

    def balance(self, address: str) -> int:
        with rpc_errors("eth_getBalance"):
            return int(self.w3.eth.get_balance(to_checksum_address(address)))

    def token_balance(self, token: str, owner: str) -> int:
        with rpc_errors(f"balanceOf on {token}"):
            return int(self.token(token).functions.balanceOf(to_checksum_address(owner)).call())

    def allowance(self, token: str, owner: str, spender: str) -> int:
        with rpc_errors(f"allowance on {token}"):
            contract = self.token(token)
            return int(
                contract.functions.allowance(
                    to_checksum_address(owner), to_checksum_address(spender)
                ).call()
            )

    def has_code(self, address: str) -> bool:
        with rpc_errors("eth_getCode"):
            return bool(self.w3.eth.get_code(to_checksum_address(address)))

    def fulfilled(self, intent_hash: str) -> bytes:
        """The claimant the portal recorded for ``intent_hash``; 32 zero bytes if none."""
        with rpc_errors("Portal.fulfilled"):
            return bytes(self.portal.functions.fulfilled(bytes.fromhex(intent_hash[2:])).call())

    def is_funded(self, intent_hash: str) -> bool:
        """Whether the portal (on a source chain) holds the intent's reward."""
        with rpc_errors("Portal.isIntentFunded"):
            return bool(self.portal.functions.isIntentFunded(bytes.fromhex(intent_hash[2:])).call())

    def fees(self) -> dict[str, int]:
        """EIP-1559 fees for a transaction now: twice the base fee plus the tip."""
        with rpc_errors("fee data"):
            base_fee = int(self.w3.eth.get_block("latest").get("baseFeePerGas") or 0)
            tip = int(self.w3.eth.max_priority_fee)
        return {"maxPriorityFeePerGas": tip, "maxFeePerGas": 2 * base_fee + tip}

    def receipt(self, tx_hash: str) -> TxReceipt | None:
        """The receipt of ``tx_hash`` if it is in a block of the canonical chain."""
        found = self.mined(tx_hash)
        return None if found is None else found[0]

    def mined(self, tx_hash: str) -> tuple[TxReceipt, int] | None:
        """``(receipt, head block number)`` if ``tx_hash`` is in a canonical block.

        A receipt whose block is no longer canonical (the node answered from a stale
        view, or a reorg) counts as not mined.
        """
        with rpc_errors("eth_getTransactionReceipt"):
            try:
                receipt = self.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
            except TransactionNotFound:
                return None
        if receipt is None or receipt.get("blockNumber") is None:
            return None
        with rpc_errors("eth_getBlockByNumber"):
            head = self.w3.eth.get_block("latest")
        number = int(receipt["blockNumber"])
        if number > int(head["number"]):
            return None
        if number == int(head["number"]):
            canonical = bytes(head["hash"]) == bytes(receipt["blockHash"])
        else:
            canonical = self.is_canonical(receipt)
        return (receipt, int(head["number"])) if canonical else None

    def is_canonical(self, receipt: TxReceipt) -> bool:
        """Whether the receipt's block is the canonical block at its height."""
        with rpc_errors("eth_getBlockByNumber"):
            try:
                block = self.w3.eth.get_block(receipt["blockNumber"])
            except Web3RPCError as error:
                if "not found" in str(error).lower():
                    return False
                raise
        return bytes(block["hash"]) == bytes(receipt["blockHash"])

    def is_known(self, tx_hash: str) -> bool:
        """Whether the node knows ``tx_hash`` (in its pool or in a block)."""
        with rpc_errors("eth_getTransactionByHash"):
            try:
                return self.w3.eth.get_transaction(tx_hash) is not None  # type: ignore[arg-type]
            except TransactionNotFound:
                return False

    def fulfilled_event(self, intent_hash: str, claimant: bytes) -> dict[str, Any] | None:
        """The ``IntentFulfilled`` log of ``intent_hash`` within ``log_lookback`` blocks:
        ``{"tx_hash", "block", "block_hash"}``, or ``None``."""
        topic0 = "0x" + keccak(text="IntentFulfilled(bytes32,bytes32)").hex()
        with rpc_errors("eth_getLogs"):
            head = int(self.w3.eth.block_number)
            logs = self.w3.eth.get_logs(
                {
                    "address": self.portal.address,
                    "fromBlock": max(0, head - self.config.log_lookback),
                    "toBlock": head,
                    "topics": [topic0, intent_hash, "0x" + claimant.hex()],
                }
            )
        for log in reversed(logs):
            if log.get("removed"):
                continue
            return {
                "tx_hash": log["transactionHash"].to_0x_hex(),
                "block": int(log["blockNumber"]),
                "block_hash": log["blockHash"].to_0x_hex(),
            }
        return None

    def send_raw(self, raw: bytes) -> str:
        """Broadcast signed bytes; node errors come out raw (the sender classifies)."""
        return str(self.w3.eth.send_raw_transaction(raw).to_0x_hex())


_clients: dict[ChainConfig, ChainClient] = {}
_lock = threading.Lock()


def get_client(chain_id: int | str) -> ChainClient:
    """The process's client of ``chain_id`` (``ChainNotConfigured`` if it has none)."""
    config = get_chain(chain_id)
    client = _clients.get(config)
    if client is None:
        with _lock:
            client = _clients.get(config)
            if client is None:
                client = _clients[config] = ChainClient(config)
    return client


def clear_clients() -> None:
    """Forget every cached client."""
    with _lock:
        _clients.clear()
