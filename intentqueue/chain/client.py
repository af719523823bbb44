"""A web3.py client per configured chain, and the classification of chain errors.

``get_client(chain_id)`` returns a ``ChainClient``: a ``Web3`` over ``HTTPProvider`` with
the chain's timeout, cached per process (one HTTP session, reused), plus the reads the
solver needs. Every read goes through ``rpc_errors()``, which turns whatever web3,
requests or the node raised into our taxonomy with ``classify()``.

Errors are classified by their lower-cased message, not by code: anvil, geth and the
dev chain use different codes for the same condition. ``Web3RPCError`` is not a
``ValueError`` in web3 8 and ``TransactionNotFound`` subclasses it, so lookups that may
find nothing catch ``TransactionNotFound`` first.

The reads an execution job makes on every run (nonce, balances, ``eth_call`` views,
block headers, receipts, fee data) go to the node through ``ChainClient.request()``:
raw JSON-RPC, decoded only as far as the solver needs. Through web3's method and
contract machinery each cost several times the CPU of its round trip, and a worker's
CPU is what limits how many intents it executes. Errors are the same ``Web3RPCError``
web3 raises, classified the same way.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, cast
from urllib.parse import unquote

import certifi
import requests
import urllib3
from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from web3 import Web3
from web3.contract import Contract
from web3.datastructures import AttributeDict
from web3.exceptions import (
    BadFunctionCallOutput,
    ContractLogicError,
    TimeExhausted,
    TransactionNotFound,
    Web3RPCError,
)
from web3.middleware import AttributeDictMiddleware
from web3.providers.rpc.utils import ExceptionRetryConfiguration
from web3.types import RPCResponse, TxReceipt

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


@functools.lru_cache(maxsize=4096)
def checksum(address: str) -> str:
    """``to_checksum_address``, memoised: the same few addresses are checksummed on every
    run, and each checksum is a keccak."""
    return str(to_checksum_address(address))


def selector(signature: str) -> str:
    """The 4-byte function selector of ``signature`` (``balanceOf(address)``), 0x hex."""
    return "0x" + keccak(text=signature)[:4].hex()


_BALANCE_OF: Final = selector("balanceOf(address)")
_ALLOWANCE: Final = selector("allowance(address,address)")
_FULFILLED: Final = selector("fulfilled(bytes32)")


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
            session=rpc_session(config.rpc_url),
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
        self._transport = JsonRpcTransport.for_url(config.rpc_url, config.rpc_timeout)
        self.chain_id = config.chain_id
        self.portal: Contract = self.w3.eth.contract(
            address=to_checksum_address(config.portal), abi=contract_abi("Portal")
        )
        self._tokens: dict[str, Contract] = {}
        #: ``(block number, block hash, fees)`` of the last ``fees()``: the tip is asked
        #: again only when the head block changed.
        self._fees: tuple[int, str, dict[str, int]] | None = None

    def __repr__(self) -> str:
        return f"<ChainClient {self.config!r}>"

    def token(self, address: str) -> Contract:
        """An ERC-20 contract (our ``TestToken`` ABI covers the standard calls), built
        once per address: building one parses the whole ABI."""
        contract = self._tokens.get(address)
        if contract is None:
            contract = self._tokens[address] = self.w3.eth.contract(
                address=to_checksum_address(address), abi=contract_abi("TestToken")
            )
        return contract

    # --- raw JSON-RPC ---

    def request(self, method: str, params: list[Any]) -> Any:
        """The ``result`` of one JSON-RPC call, without web3's request and result
        formatters (hex strings stay hex strings). An error answer raises
        ``Web3RPCError``, as web3 would; callers classify it."""
        response: Any
        if self._transport is not None:
            response = self._transport.call(method, params)
        else:
            response = self.w3.provider.make_request(method, params)  # type: ignore[arg-type]
        error = response.get("error")
        if error is not None:
            message = error.get("message", error) if isinstance(error, dict) else error
            raise Web3RPCError(str(message), rpc_response=cast(RPCResponse, response))
        return response.get("result")

    def call(self, to: str, data: str) -> bytes:
        """``eth_call`` of ``data`` on ``to`` at the latest block; the returned bytes.

        An empty answer is ``BadFunctionCallOutput`` (``to`` is not a contract), as
        web3's contract calls have it."""
        result = self.request("eth_call", [{"to": to, "data": data}, "latest"])
        output = bytes.fromhex(str(result or "0x")[2:])
        if not output:
            raise BadFunctionCallOutput(f"no data returned by a call to {to} (is it a contract?)")
        return output

    def _view_uint(self, to: str, data: str) -> int:
        return int(abi_decode(["uint256"], self.call(to, data))[0])

    def head(self) -> dict[str, Any]:
        """``{"number", "hash", "base_fee"}`` of the latest block (no transactions)."""
        return self.header("latest")

    def header(self, block: int | str) -> dict[str, Any]:
        """``{"number", "hash", "base_fee"}`` of block ``block`` (a number or a tag).
        ``TransientError`` when the node does not have it."""
        tag = hex(block) if isinstance(block, int) else block
        with rpc_errors("eth_getBlockByNumber"):
            found = self.request("eth_getBlockByNumber", [tag, False])
        if not found:
            raise TransientError(f"block {block} not found")
        return {
            "number": int(found["number"], 16),
            "hash": str(found["hash"]).lower(),
            "base_fee": int(found.get("baseFeePerGas") or "0x0", 16),
        }

    # --- reads ---

    def block_number(self) -> int:
        with rpc_errors("eth_blockNumber"):
            return int(self.w3.eth.block_number)

    def nonce(self, address: str, block: str = "latest") -> int:
        """Transactions sent by ``address`` as of ``block`` (``latest`` or ``pending``)."""
        with rpc_errors("eth_getTransactionCount"):
            return int(self.request("eth_getTransactionCount", [checksum(address), block]), 16)

    def balance(self, address: str) -> int:
        with rpc_errors("eth_getBalance"):
            return int(self.request("eth_getBalance", [checksum(address), "latest"]), 16)

    # The ERC-20 and portal reads below encode their calldata themselves: through a
    # web3 contract function each would cost more CPU than its round trip.

    def token_balance(self, token: str, owner: str) -> int:
        with rpc_errors(f"balanceOf on {token}"):
            data = _BALANCE_OF + abi_encode(["address"], [checksum(owner)]).hex()
            return self._view_uint(checksum(token), data)

    def allowance(self, token: str, owner: str, spender: str) -> int:
        with rpc_errors(f"allowance on {token}"):
            args = abi_encode(["address", "address"], [checksum(owner), checksum(spender)])
            return self._view_uint(checksum(token), _ALLOWANCE + args.hex())

    def has_code(self, address: str) -> bool:
        with rpc_errors("eth_getCode"):
            return bool(self.w3.eth.get_code(to_checksum_address(address)))

    def fulfilled(self, intent_hash: str) -> bytes:
        """The claimant the portal recorded for ``intent_hash``; 32 zero bytes if none."""
        with rpc_errors("Portal.fulfilled"):
            data = _FULFILLED + abi_encode(["bytes32"], [bytes.fromhex(intent_hash[2:])]).hex()
            return bytes(abi_decode(["bytes32"], self.call(self.portal.address, data))[0])

    def is_funded(self, intent_hash: str) -> bool:
        """Whether the portal (on a source chain) holds the intent's reward."""
        with rpc_errors("Portal.isIntentFunded"):
            return bool(self.portal.functions.isIntentFunded(bytes.fromhex(intent_hash[2:])).call())

    def fees(self) -> dict[str, int]:
        """EIP-1559 fees for a transaction now: twice the base fee plus the tip.

        The latest block is read every time; the node's suggested tip is asked again only
        when that block is not the one of the previous answer (same number and hash), so
        fees are never those of an older block."""
        head = self.head()
        cached = self._fees
        if cached is not None and cached[0] == head["number"] and cached[1] == head["hash"]:
            return dict(cached[2])
        with rpc_errors("eth_maxPriorityFeePerGas"):
            tip = int(self.request("eth_maxPriorityFeePerGas", []), 16)
        fees = {"maxPriorityFeePerGas": tip, "maxFeePerGas": 2 * head["base_fee"] + tip}
        self._fees = (head["number"], head["hash"], fees)
        return dict(fees)

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
            found = self.request("eth_getTransactionReceipt", [tx_hash])
        receipt = None if not found else _receipt(found)
        if receipt is None or receipt.get("blockNumber") is None:
            return None
        head = self.head()
        number = int(receipt["blockNumber"])
        if number > head["number"]:
            return None
        if number == head["number"]:
            canonical = head["hash"] == _hex(receipt["blockHash"])
        else:
            canonical = self.is_canonical(receipt)
        return (receipt, head["number"]) if canonical else None

    def is_canonical(self, receipt: TxReceipt) -> bool:
        """Whether the receipt's block is the canonical block at its height."""
        try:
            block = self.header(int(receipt["blockNumber"]))
        except TransientError as error:
            if "not found" in str(error).lower():
                return False
            raise
        return block["hash"] == _hex(receipt["blockHash"])

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
        return str(self.request("eth_sendRawTransaction", ["0x" + raw.hex()]))


#: Receipt fields read as numbers, and as bytes; the rest (logs) stays as the node sent it.
_RECEIPT_NUMBERS: Final = (
    "blockNumber", "status", "gasUsed", "cumulativeGasUsed", "effectiveGasPrice",
    "transactionIndex", "type",
)  # fmt: skip
_RECEIPT_BYTES: Final = ("blockHash", "transactionHash")


def _receipt(raw: dict[str, Any]) -> TxReceipt:
    """A receipt from its JSON: the numbers and hashes the solver reads converted as web3
    converts them, without formatting every log (most of the CPU of web3's version)."""
    receipt = dict(raw)
    for key in _RECEIPT_NUMBERS:
        if receipt.get(key) is not None:
            receipt[key] = int(receipt[key], 16)
    for key in _RECEIPT_BYTES:
        if receipt.get(key) is not None:
            receipt[key] = HexBytes(receipt[key])
    return cast(TxReceipt, AttributeDict(receipt))


def _hex(value: Any) -> str:
    """Lower-case 0x hex of bytes (or of a hex string)."""
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    return str(value).lower()


#: Environment variables ``requests`` would read on every request of a session that
#: trusts the environment.
_CA_BUNDLE_ENV: Final = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def _ca_bundle() -> str | None:
    """The CA bundle the environment names for requests (as requests reads it), if any."""
    return next((os.environ[name] for name in _CA_BUNDLE_ENV if os.environ.get(name)), None)


class JsonRpcTransport:
    """JSON-RPC over a kept-alive urllib3 pool, for ``ChainClient.request``.

    A call through web3's provider (requests, its session, adapters and cookie handling)
    costs about 0.37 ms of CPU, this one about 0.15: with a dozen calls per intent, that
    is a tenth of an execution's CPU. It behaves like the provider: two retries with
    backoff after a timeout or an HTTP error status, and failures raised as requests'
    exceptions (``Timeout``, ``ConnectionError``, ``HTTPError``), so they are classified
    the same way. Not used when a proxy or ``.netrc`` applies to the URL (``for_url``).
    """

    RETRIES = 2
    BACKOFF_SECONDS = 0.1

    def __init__(self, url: str, timeout: float, ca_bundle: str | None = None) -> None:
        parsed = urllib3.util.parse_url(url)
        self._headers = {"Content-Type": "application/json"}
        if parsed.auth:  # user:password in the URL, as requests would send it
            self._headers.update(urllib3.make_headers(basic_auth=unquote(parsed.auth)))
            url = parsed._replace(auth=None).url
        self._url = url
        self._pool = urllib3.PoolManager(
            num_pools=1, maxsize=8, retries=False,
            timeout=urllib3.Timeout(total=timeout), ca_certs=ca_bundle or certifi.where(),
        )  # fmt: skip
        self._ids = itertools.count(1)

    @classmethod
    def for_url(cls, url: str, timeout: float) -> JsonRpcTransport | None:
        """The transport for ``url``, or None when the environment gives it a proxy or
        ``.netrc`` credentials (web3's session handles those)."""
        if requests.utils.get_environ_proxies(url) or requests.utils.get_netrc_auth(url):
            return None
        return cls(url, timeout, _ca_bundle())

    def call(self, method: str, params: list[Any]) -> dict[str, Any]:
        """The decoded JSON-RPC response (``result`` or ``error``) of one call."""
        body = json.dumps(
            {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        ).encode()
        for attempt in range(self.RETRIES + 1):
            try:
                response = self._pool.request("POST", self._url, body=body, headers=self._headers)
            except urllib3.exceptions.NewConnectionError as error:  # a TimeoutError subclass
                raise requests.ConnectionError(f"RPC connection failed: {error}") from error
            except urllib3.exceptions.TimeoutError as error:
                failure: requests.RequestException = requests.Timeout(f"RPC timed out: {error}")
            except urllib3.exceptions.HTTPError as error:
                raise requests.ConnectionError(f"RPC connection failed: {error}") from error
            else:
                if response.status < 400:
                    return cast(dict[str, Any], json.loads(response.data))
                failure = requests.HTTPError(f"{response.status} {response.reason} from the RPC")
            if attempt == self.RETRIES:
                raise failure
            time.sleep(self.BACKOFF_SECONDS * 2**attempt)
        raise AssertionError("unreachable")


def rpc_session(url: str) -> requests.Session:
    """An HTTP session for ``url`` that reads the environment once, here.

    A session trusting the environment looks up proxies (``HTTPS_PROXY``, ``NO_PROXY``,
    ...), the CA bundle and ``.netrc`` again on every request, which costs more CPU than
    the JSON-RPC call itself. The same settings, resolved now, are set on the session,
    so a proxy or CA bundle from the environment is still used; a change to them takes
    effect with the next client (``clear_clients()``, or a new process).
    """
    session = requests.Session()
    session.trust_env = False
    session.proxies.update(requests.utils.get_environ_proxies(url))
    bundle = _ca_bundle()
    if bundle:
        session.verify = bundle
    auth = requests.utils.get_netrc_auth(url)
    if auth:
        session.auth = auth
    return session


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
