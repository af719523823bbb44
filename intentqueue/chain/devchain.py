"""Embedded dev chains: py-evm (through eth-tester) served over JSON-RPC HTTP.

For a machine with only Python. An in-process ``EthereumTesterProvider`` gives every
process its own chain; worker processes, the web process and tests share a chain only when
it is served over the network. This module serves one py-evm chain per chain id with a
small stdlib HTTP server speaking JSON-RPC 2.0, so any client (``Web3(HTTPProvider(url))``,
curl, the workers) sees the same chain, much like anvil would serve it.

- :class:`DevChain` is one chain with its own chain id (``eth_chainId``, the ``CHAINID``
  opcode and EIP-155 replay protection all agree; a transaction signed for another chain id
  is rejected like geth does). Blocks are mined per transaction, or every ``block_time``
  seconds by a background thread so confirmations advance without traffic. One lock
  serialises every access to the EVM.
- :class:`DevChainServer` serves a :class:`DevChain` on ``127.0.0.1``. Methods are
  dispatched through web3's ``EthereumTesterProvider`` (so eth-tester's method coverage
  comes for free); transaction submission, fee history, errors and a few dev methods
  (``evm_mine``, ``anvil_mine``, ``anvil_setBalance``) are handled here to behave like a
  geth/anvil node: reverts are code 3 ``execution reverted`` with the revert data in
  ``data``, pool errors read ``nonce too low``, ``insufficient funds ...``, ``already
  known``, and a transaction whose nonce is ahead of the account waits in a queue until
  the gap is filled.
- :func:`deploy_dev_contracts` deploys the committed ``Portal`` and ``TestToken`` artifacts
  on any chain (this one or anvil).
- :class:`DevChainSet` / :func:`run_devchains` start a source and a destination chain,
  deploy on both, fund the solver's address and describe it all in a JSON state file.

State lives in memory only: a restart starts fresh chains at block 0. Deployment is
deterministic (the same dev account deploys with nonces 0 and 1 before anything else), so
the contract addresses are the same on every start and on both chains; balances, intents
and transactions from an earlier run are gone.

Known differences from a real node: there is no replacement of a transaction that is
already in a block or in the pending block (same nonce, higher fee), a queued (nonce-gap)
transaction is not visible through ``eth_getTransactionByHash`` until it executes, and
block timestamps advance by at least one second per block, so many blocks in quick
succession run the chain's clock ahead of the wall clock.

Speed: about 50 signed transfers per second, send and receipt, over HTTP. Most of the time
goes to recovering each transaction's sender in pure Python; with ``coincurve`` installed
(eth-keys picks it up by itself) it is about 100.
"""

from __future__ import annotations

import binascii
import contextlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

from eth_abi import decode as abi_decode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import ValidationError as EVMValidationError
from eth_utils import keccak, to_checksum_address
from web3 import Web3
from web3.types import TxParams, TxReceipt

logger = logging.getLogger(__name__)

CONTRACTS_DIR: Final = Path(__file__).resolve().parent / "contracts"
DEFAULT_CHAIN_IDS: Final = (31337, 31338)
DEFAULT_HOST: Final = "127.0.0.1"
#: Balance of each prefunded dev account (eth-tester's default).
DEV_ACCOUNT_BALANCE: Final = 1_000_000 * 10**18
#: What :class:`DevChainSet` gives the solver: ETH on every chain, tokens on destinations.
DEFAULT_SOLVER_ETH: Final = 1_000 * 10**18
DEFAULT_SOLVER_TOKENS: Final = 1_000_000 * 10**18
#: Constant fee suggestions, as eth-tester answers them (the base fee stays near 1 gwei).
GAS_PRICE: Final = 10**9
MAX_PRIORITY_FEE: Final = 10**9
#: Transactions a sender may keep waiting behind a nonce gap.
MAX_QUEUED_PER_SENDER: Final = 64
MAX_REQUEST_BYTES: Final = 16 * 1024 * 1024

# JSON-RPC 2.0 error codes, and geth's codes for execution errors.
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
SERVER_ERROR: Final = -32000
EXECUTION_REVERTED: Final = 3

ERROR_STRING_SELECTOR: Final = bytes.fromhex("08c379a0")
ROLE_SOURCE: Final = "source"
ROLE_DESTINATION: Final = "destination"


class JsonRpcError(Exception):
    """An error answered to a JSON-RPC request, shaped as a JSON-RPC 2.0 error object."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_dict(self) -> dict[str, Any]:
        """The JSON-RPC ``error`` member."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


@dataclass(frozen=True)
class DevAccount:
    """A prefunded dev account. Its key is a well-known test key: never use it elsewhere."""

    address: str
    private_key: str

    def local_account(self) -> LocalAccount:
        """The account as an eth-account signer."""
        return Account.from_key(self.private_key)


def dev_accounts(count: int = 10) -> tuple[DevAccount, ...]:
    """eth-tester's prefunded accounts: private keys 1, 2, ... ``count``."""
    accounts = []
    for number in range(1, count + 1):
        key = "0x" + number.to_bytes(32, "big").hex()
        accounts.append(DevAccount(Account.from_key(key).address, key))
    return tuple(accounts)


# --- the EVM ------------------------------------------------------------------------------


def _backend_class() -> type:
    """A ``PyEVMBackend`` whose chain has a chosen chain id.

    eth-tester builds its py-evm chain class inside ``setup_tester_chain`` with a fixed
    ``chain_id``; py-evm reads the id from the chain class whenever it builds a VM (that is
    what ``CHAINID`` returns and what eth-tester signs typed transactions with). So after
    eth-tester sets the chain up, the chain is rebuilt on the same database from a subclass
    that only overrides ``chain_id``.
    """
    from eth.exceptions import HeaderNotFound
    from eth.vm.spoof import SpoofTransaction
    from eth_tester import PyEVMBackend
    from eth_tester.backends.pyevm.main import _execute_and_revert_transaction
    from eth_tester.backends.pyevm.serializers import (
        serialize_transaction,
        serialize_transaction_receipt,
    )
    from eth_tester.exceptions import TransactionFailed, TransactionNotFound

    class ChainIdBackend(PyEVMBackend):
        chain: Any  # py-evm's MiningChain

        def __init__(self, chain_id: int, num_accounts: int) -> None:
            self._chain_id = chain_id
            # Lookups by transaction hash: eth-tester scans every block from the head
            # down and recovers the sender's public key (~6 ms in pure Python) on each
            # receipt; receipts are what clients poll most.
            self._tx_blocks: dict[bytes, int] = {}
            self._senders: dict[bytes, bytes] = {}
            self._prepared: tuple[bytes, Any] | None = None
            genesis_state = PyEVMBackend.generate_genesis_state(num_accounts=num_accounts)
            super().__init__(genesis_state=genesis_state)

        def prepare(self, raw: bytes, transaction: Any) -> None:
            """Reuse ``transaction`` (decoded from ``raw``, sender known) on the next send."""
            self._prepared = (raw, transaction)
            self._senders[transaction.hash] = transaction.sender

        def send_raw_transaction(self, raw_transaction: bytes) -> bytes:
            prepared, self._prepared = self._prepared, None
            if prepared is None or prepared[0] != bytes(raw_transaction):
                return super().send_raw_transaction(raw_transaction)
            transaction = prepared[1]
            self.chain.apply_transaction(transaction)
            return bytes(transaction.hash)

        def mine_blocks(self, num_blocks: int = 1, coinbase: bytes = b"\0" * 20) -> Any:
            hashes = super().mine_blocks(num_blocks, coinbase)
            for block_hash in hashes:
                block = self.chain.get_block_by_hash(block_hash)
                for transaction in block.transactions:
                    self._tx_blocks[transaction.hash] = block.number
            return hashes

        def _locate(self, tx_hash: bytes) -> tuple[Any, Any, int, bool]:
            candidates = [self.chain.get_block()]
            number = self._tx_blocks.get(tx_hash)
            if number is not None:
                with contextlib.suppress(HeaderNotFound):
                    candidates.append(self.chain.get_canonical_block_by_number(number))
            for position, block in enumerate(candidates):
                for index, transaction in enumerate(block.transactions):
                    if transaction.hash == tx_hash:
                        sender = self._senders.get(tx_hash)
                        if sender is not None:  # fills the cached_property
                            transaction.__dict__["sender"] = sender
                        return block, transaction, index, position == 0
            raise TransactionNotFound(f"No transaction found for hash: 0x{tx_hash.hex()}")

        def get_transaction_by_hash(self, transaction_hash: bytes) -> dict[str, Any]:
            block, transaction, index, is_pending = self._locate(transaction_hash)
            return serialize_transaction(block, transaction, index, is_pending)

        def get_transaction_receipt(self, transaction_hash: bytes) -> dict[str, Any]:
            block, transaction, index, is_pending = self._locate(transaction_hash)
            receipts = block.get_receipts(self.chain.chaindb)
            return serialize_transaction_receipt(
                block, receipts, transaction, index, is_pending, self.chain.get_vm()
            )

        def reset_to_genesis(self, *args: Any, **kwargs: Any) -> None:
            super().reset_to_genesis(*args, **kwargs)
            base = type(self.chain)
            chain_class = type(f"DevChain{self._chain_id}", (base,), {"chain_id": self._chain_id})
            self.chain = chain_class(self.chain.chaindb.db)

        def call(self, transaction: dict[str, Any], block_number: Any = "latest") -> bytes:
            # eth-tester's call, except that the VM error stays attached as the cause: its
            # own version renders revert data into a string that loses the raw bytes.
            transaction = dict(transaction)
            transaction.setdefault("gas", self._max_available_gas())
            unsigned = self._get_normalized_and_unsigned_evm_transaction(transaction, block_number)
            spoofed = SpoofTransaction(unsigned, from_=transaction["from"])
            computation = _execute_and_revert_transaction(self.chain, spoofed, block_number)
            if computation.is_error:
                raise TransactionFailed(str(computation.error)) from computation.error
            return bytes(computation.output)

    return ChainIdBackend


def _tester_class() -> type:
    """An ``EthereumTester`` that keeps unmined transactions in py-evm's pending block.

    eth-tester's own no-auto-mine mode applies each transaction, reads it back and reverts
    the state, replaying everything at mining time; then the pending nonce never advances
    and a second transaction from the same sender replaces the first. Here a transaction is
    applied to py-evm's pending block and stays there until the block is mined, as a node's
    pending block behaves.
    """
    from eth_tester import EthereumTester

    send_raw = EthereumTester.send_raw_transaction.__wrapped__
    send = EthereumTester.send_transaction.__wrapped__

    class DevTester(EthereumTester):
        def send_raw_transaction(self, raw_transaction_hex: str) -> str:
            tx_hash: str = send_raw(self, raw_transaction_hex)
            if self.auto_mine_transactions:
                self.mine_block()
            return tx_hash

        def send_transaction(self, transaction: dict[str, Any]) -> str:
            tx_hash: str = send(self, transaction)
            if self.auto_mine_transactions:
                self.mine_block()
            return tx_hash

    return DevTester


class DevChain:
    """One in-memory py-evm chain with chain id ``chain_id``, safe to use from many threads.

    :param chain_id: what ``eth_chainId`` and the ``CHAINID`` opcode return; transactions
        signed (EIP-155 / typed) for another chain id are rejected.
    :param block_time: seconds between blocks. When set, :meth:`start` runs a thread that
        mines a block every ``block_time`` seconds, with or without transactions, and a
        transaction waits in the pending block until then. When ``None``, every
        transaction is mined into its own block at once.
    :param automine: also mine each transaction at once while the block timer runs
        (anvil's ``--mixed-mining``). Defaults to ``block_time is None``.
    :param num_accounts: prefunded dev accounts (see :attr:`accounts`).
    """

    def __init__(
        self,
        chain_id: int = DEFAULT_CHAIN_IDS[0],
        *,
        block_time: float | None = None,
        automine: bool | None = None,
        num_accounts: int = 10,
    ) -> None:
        from web3 import EthereumTesterProvider
        from web3.providers.eth_tester.defaults import API_ENDPOINTS, static_return

        if block_time is not None and block_time <= 0:
            raise ValueError("block_time must be a positive number of seconds")
        self.chain_id = chain_id
        self.block_time = block_time
        self.automine = block_time is None if automine is None else automine
        self._lock = threading.RLock()
        self._backend = _backend_class()(chain_id, num_accounts)
        self._tester = _tester_class()(self._backend, auto_mine_transactions=self.automine)
        self.accounts: tuple[DevAccount, ...] = dev_accounts(num_accounts)

        endpoints = {namespace: dict(methods) for namespace, methods in API_ENDPOINTS.items()}
        endpoints["eth"]["chainId"] = static_return(chain_id)
        endpoints["eth"]["gasPrice"] = static_return(GAS_PRICE)
        endpoints["eth"]["maxPriorityFeePerGas"] = static_return(MAX_PRIORITY_FEE)
        endpoints["net"]["version"] = static_return(str(chain_id))
        endpoints["net"]["listening"] = static_return(True)
        provider = EthereumTesterProvider(self._tester, api_endpoints=endpoints)
        # No middleware of a Web3 client (validation, ENS, ...): only the provider's own
        # formatting between JSON-RPC shapes and eth-tester's Python values.
        local = Web3(provider, middleware=[])
        self._provider_request = provider.request_func(local, local.middleware_onion)
        # Transactions waiting behind a nonce gap: sender -> nonce -> (hash, raw bytes).
        self._queued: dict[bytes, dict[int, tuple[bytes, bytes]]] = {}
        self._methods: dict[str, Callable[[list[Any]], Any]] = {
            "eth_sendRawTransaction": self._send_raw_transaction,
            "eth_feeHistory": self._fee_history,
            "evm_mine": self._evm_mine,
            "anvil_mine": self._anvil_mine,
            "anvil_setBalance": self._set_balance_method,
            "hardhat_setBalance": self._set_balance_method,
        }
        self._stop_mining = threading.Event()
        self._miner: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<DevChain {self.chain_id} block_time={self.block_time}>"

    # --- lifecycle ---

    def start(self) -> None:
        """Start the block timer, if ``block_time`` is set. Idempotent."""
        if self.block_time is None or (self._miner is not None and self._miner.is_alive()):
            return
        self._stop_mining.clear()
        self._miner = threading.Thread(
            target=self._mine_periodically, name=f"devchain-{self.chain_id}-miner", daemon=True
        )
        self._miner.start()

    def stop(self) -> None:
        """Stop the block timer. The chain's state is kept while this object lives."""
        self._stop_mining.set()
        if self._miner is not None:
            self._miner.join(timeout=5)
            self._miner = None

    def _mine_periodically(self) -> None:
        assert self.block_time is not None
        next_at = time.monotonic() + self.block_time
        while not self._stop_mining.wait(max(0.0, next_at - time.monotonic())):
            next_at += self.block_time
            try:
                self.mine()
            except Exception:  # keep the clock going; the next block may succeed
                logger.exception("devchain %s: mining failed", self.chain_id)

    # --- direct API (also used by the dev-only RPC methods) ---

    @property
    def block_number(self) -> int:
        """Number of the latest mined block."""
        with self._lock:
            return int(self._tester.get_block_by_number("latest")["number"])

    def mine(self, blocks: int = 1) -> list[str]:
        """Mine ``blocks`` blocks now (the first one takes the pending transactions)."""
        with self._lock:
            hashes: list[str] = []
            for _ in range(blocks):
                self._refresh_pending_timestamp()
                hashes.extend(self._tester.mine_blocks(1))
            return hashes

    def set_balance(self, address: str, wei: int) -> None:
        """Set ``address``'s balance to ``wei`` and mine a block so ``latest`` shows it."""
        canonical = bytes.fromhex(to_checksum_address(address)[2:])
        with self._lock:
            chain = self._backend.chain
            state = chain.get_vm(chain.header).state
            state.set_balance(canonical, wei)
            state.persist()
            chain.header = chain.header.copy(state_root=state.state_root)
            self.mine()

    def request(self, method: str, params: list[Any]) -> Any:
        """Answer one JSON-RPC call: the JSON-ready result, or raise :class:`JsonRpcError`."""
        handler = self._methods.get(method)
        try:
            with self._lock:
                if handler is not None:
                    return handler(params)
                return self._via_provider(method, params)
        except JsonRpcError:
            raise
        except Exception as exc:
            raise _error_from_exception(exc, method) from exc

    def _via_provider(self, method: str, params: list[Any]) -> Any:
        if method in ("eth_call", "eth_estimateGas") and params and isinstance(params[0], dict):
            # Like geth, simulations skip the nonce check: a client may estimate its next
            # transaction while earlier ones are pending.
            params = [{k: v for k, v in params[0].items() if k != "nonce"}, *params[1:]]
            if method == "eth_estimateGas" and len(params) > 1 and params[1] == "pending":
                params = [params[0], "latest"]  # eth-tester estimates on mined blocks only
        elif method == "eth_getLogs" and params and isinstance(params[0], dict):
            params = [self._logs_filter(params[0]), *params[1:]]
        response = self._provider_request(method, params)
        error = response.get("error")
        if error is not None:
            if error.get("code") == METHOD_NOT_FOUND:
                raise JsonRpcError(
                    METHOD_NOT_FOUND, f"the method {method} does not exist/is not available"
                )
            raise JsonRpcError(int(error.get("code", SERVER_ERROR)), str(error.get("message")))
        result = response.get("result")
        if method in _BLOCK_METHODS and isinstance(result, dict):
            result = _with_remapped_transactions(result)
        return _to_json(result)

    def _logs_filter(self, query: dict[str, Any]) -> dict[str, Any]:
        # eth-tester filters by block range only: turn EIP-234's blockHash into a range.
        if "blockHash" not in query:
            return query
        query = dict(query)
        block = self._tester.get_block_by_hash(query.pop("blockHash"))
        query["fromBlock"] = query["toBlock"] = block["number"]
        return query

    # --- transactions ---

    def _refresh_pending_timestamp(self) -> None:
        # py-evm stamps the pending block when the previous block is mined; after an idle
        # spell that is in the past. Restamp it while no transaction has run on it yet.
        chain = self._backend.chain
        if chain.get_block().transactions:
            return
        parent = chain.get_canonical_head()
        now = int(time.time())
        timestamp = max(now, parent.timestamp + 1)
        if chain.header.timestamp < timestamp:
            chain.set_header_timestamp(timestamp)

    def _send_raw_transaction(self, params: list[Any]) -> str:
        if len(params) != 1 or not isinstance(params[0], str):
            raise JsonRpcError(INVALID_PARAMS, "invalid params: expected [raw transaction hex]")
        try:
            raw = bytes.fromhex(params[0].removeprefix("0x"))
        except ValueError as exc:
            raise JsonRpcError(INVALID_PARAMS, f"invalid params: {exc}") from None
        if not raw:
            raise JsonRpcError(INVALID_PARAMS, "invalid params: empty transaction")
        if raw[0] == 3:
            raise JsonRpcError(SERVER_ERROR, "transaction type not supported")
        chain = self._backend.chain
        try:
            tx = chain.get_vm().get_transaction_builder().decode(raw)
        except Exception as exc:
            raise JsonRpcError(INVALID_PARAMS, f"invalid transaction: {exc}") from None
        tx_chain_id = tx.chain_id
        if tx_chain_id is not None and tx_chain_id != self.chain_id:
            raise JsonRpcError(
                SERVER_ERROR,
                f"invalid chain id for signer: have {tx_chain_id} want {self.chain_id}",
            )
        try:
            sender: bytes = tx.sender
        except Exception:
            raise JsonRpcError(SERVER_ERROR, "invalid sender") from None
        if tx.gas < tx.intrinsic_gas:
            raise JsonRpcError(
                SERVER_ERROR, f"intrinsic gas too low: have {tx.gas}, want {tx.intrinsic_gas}"
            )
        tx_hash = keccak(raw)
        expected = chain.get_vm().state.get_nonce(sender)
        queued = self._queued.get(sender, {})
        if tx_hash in {h for h, _ in queued.values()} or any(
            t.hash == tx_hash for t in chain.get_block().transactions
        ):
            raise JsonRpcError(SERVER_ERROR, "already known")
        if tx.nonce < expected:
            raise JsonRpcError(
                SERVER_ERROR,
                f"nonce too low: address {to_checksum_address(sender)}, "
                f"tx: {tx.nonce} state: {expected}",
            )
        if tx.nonce > expected:
            self._check_affordable(tx, sender)
            if tx.nonce not in queued and len(queued) >= MAX_QUEUED_PER_SENDER:
                raise JsonRpcError(SERVER_ERROR, "txpool is full")
            self._queued.setdefault(sender, {})[tx.nonce] = (tx_hash, raw)
            return "0x" + tx_hash.hex()
        result = self._apply_raw(raw, tx, sender)
        self._drain_queue(sender)
        return result

    def _apply_raw(self, raw: bytes, tx: Any, sender: bytes) -> str:
        self._refresh_pending_timestamp()
        self._backend.prepare(raw, tx)
        try:
            return str(self._tester.send_raw_transaction("0x" + raw.hex()))
        except EVMValidationError as exc:
            if "exceeds gas limit" in str(exc) and self._backend.chain.get_block().transactions:
                # The pending block is full: close it and start the next one.
                self.mine()
                self._backend.prepare(raw, tx)
                return str(self._tester.send_raw_transaction("0x" + raw.hex()))
            raise self._pool_error(exc, tx, sender) from exc

    def _drain_queue(self, sender: bytes) -> None:
        queued = self._queued.get(sender)
        chain = self._backend.chain
        while queued:
            nonce = chain.get_vm().state.get_nonce(sender)
            entry = queued.pop(nonce, None)
            if entry is None:
                break
            tx_hash, raw = entry
            tx = chain.get_vm().get_transaction_builder().decode(raw)
            try:
                self._apply_raw(raw, tx, sender)
            except Exception as exc:
                logger.warning(
                    "devchain %s: dropped queued transaction 0x%s: %s",
                    self.chain_id,
                    tx_hash.hex(),
                    exc,
                )
                break
        if not queued:
            self._queued.pop(sender, None)

    def _check_affordable(self, tx: Any, sender: bytes) -> None:
        balance = self._backend.chain.get_vm().state.get_balance(sender)
        if balance < _max_cost(tx):
            raise self._pool_error(EVMValidationError("does not have enough balance"), tx, sender)

    def _pool_error(self, exc: Exception, tx: Any, sender: bytes) -> JsonRpcError:
        """geth's wording for a transaction the pool refuses."""
        message = str(exc)
        address = to_checksum_address(sender)
        state = self._backend.chain.get_vm().state
        if "cannot afford" in message or "enough balance" in message:
            balance = state.get_balance(sender)
            return JsonRpcError(
                SERVER_ERROR,
                f"insufficient funds for gas * price + value: address {address} "
                f"have {balance} want {_max_cost(tx)}",
            )
        if "Invalid transaction nonce" in message:
            return JsonRpcError(
                SERVER_ERROR,
                f"nonce too low: address {address}, tx: {tx.nonce} "
                f"state: {state.get_nonce(sender)}",
            )
        if "base fee" in message:
            base_fee = state.execution_context.base_fee_per_gas
            return JsonRpcError(
                SERVER_ERROR,
                f"max fee per gas less than block base fee: address {address}, "
                f"maxFeePerGas: {_max_fee(tx)}, baseFee: {base_fee}",
            )
        if "Insufficient gas" in message:
            return JsonRpcError(
                SERVER_ERROR,
                f"intrinsic gas too low: have {tx.gas}, want {tx.intrinsic_gas}",
            )
        if "exceeds gas limit" in message:
            return JsonRpcError(SERVER_ERROR, "exceeds block gas limit")
        if "Signature" in message or "signature" in message:
            return JsonRpcError(SERVER_ERROR, "invalid sender")
        return JsonRpcError(SERVER_ERROR, message)

    # --- other methods handled here ---

    def _fee_history(self, params: list[Any]) -> dict[str, Any]:
        """``eth_feeHistory`` in geth's shape (eth-tester's is incomplete and misnumbered)."""
        if len(params) < 2:
            raise JsonRpcError(INVALID_PARAMS, "invalid params: expected [count, newestBlock]")
        count = _quantity(params[0])
        if not 1 <= count <= 1024:
            raise JsonRpcError(INVALID_PARAMS, "invalid params: block count must be 1..1024")
        percentiles = [float(p) for p in (params[2] if len(params) > 2 and params[2] else [])]
        latest = int(self._tester.get_block_by_number("latest")["number"])
        newest = params[1]
        if newest in ("latest", "pending", "safe", "finalized"):
            newest_number = latest
        elif newest == "earliest":
            newest_number = 0
        else:
            newest_number = min(_quantity(newest), latest)
        oldest = max(0, newest_number - count + 1)
        chain = self._backend.chain
        base_fees: list[str] = []
        ratios: list[float] = []
        rewards: list[list[str]] = []
        for number in range(oldest, newest_number + 1):
            block = chain.get_canonical_block_by_number(number)
            header = block.header
            base_fee = header.base_fee_per_gas
            base_fees.append(hex(base_fee))
            ratios.append(header.gas_used / header.gas_limit)
            if percentiles:
                tips = sorted(min(_tip(t), _max_fee(t) - base_fee) for t in block.transactions)
                rewards.append(
                    [
                        hex(tips[min(len(tips) - 1, int(len(tips) * p / 100))] if tips else 0)
                        for p in percentiles
                    ]
                )
        base_fees.append(hex(chain.header.base_fee_per_gas))  # the next block's
        result: dict[str, Any] = {
            "oldestBlock": hex(oldest),
            "baseFeePerGas": base_fees,
            "gasUsedRatio": ratios,
        }
        if percentiles:
            result["reward"] = rewards
        return result

    def _evm_mine(self, params: list[Any]) -> str:
        self.mine()
        return "0x0"

    def _anvil_mine(self, params: list[Any]) -> None:
        blocks = _quantity(params[0]) if params and params[0] is not None else 1
        if not 1 <= blocks <= 10_000:
            raise JsonRpcError(INVALID_PARAMS, "invalid params: block count must be 1..10000")
        self.mine(blocks)

    def _set_balance_method(self, params: list[Any]) -> bool:
        if len(params) != 2:
            raise JsonRpcError(INVALID_PARAMS, "invalid params: expected [address, balance]")
        try:
            address = to_checksum_address(params[0])
        except (TypeError, ValueError) as exc:
            raise JsonRpcError(INVALID_PARAMS, f"invalid params: {exc}") from None
        self.set_balance(address, _quantity(params[1]))
        return True


def _quantity(value: Any) -> int:
    """A JSON-RPC quantity (hex string or, leniently, an integer)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.startswith(("0x", "0X")):
            return int(value, 16)
        raise TypeError
    except (TypeError, ValueError):
        raise JsonRpcError(INVALID_PARAMS, f"invalid params: not a quantity: {value!r}") from None


def _max_fee(tx: Any) -> int:
    return int(getattr(tx, "max_fee_per_gas", None) or tx.gas_price)


def _tip(tx: Any) -> int:
    return int(getattr(tx, "max_priority_fee_per_gas", None) or tx.gas_price)


def _max_cost(tx: Any) -> int:
    return int(tx.gas * _max_fee(tx) + tx.value)


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def _revert_error(data: bytes) -> JsonRpcError:
    """geth's answer to a call that reverted with ``data``."""
    message = "execution reverted"
    if data[:4] == ERROR_STRING_SELECTOR:
        try:
            (reason,) = abi_decode(["string"], data[4:])
            message = f"execution reverted: {reason}"
        except Exception:  # malformed Error(string): keep the bare message
            logger.debug("undecodable Error(string) revert data")
    return JsonRpcError(EXECUTION_REVERTED, message, "0x" + data.hex())


def _error_from_exception(exc: Exception, method: str) -> JsonRpcError:
    """Translate what eth-tester / py-evm raised into a node's JSON-RPC error."""
    from eth.exceptions import Revert, VMError
    from eth_tester.exceptions import BlockNotFound, FilterNotFound, TransactionFailed
    from eth_tester.exceptions import ValidationError as TesterValidationError

    for link in _exception_chain(exc):
        if isinstance(link, Revert):
            data = link.args[0] if link.args and isinstance(link.args[0], bytes) else b""
            return _revert_error(data)
    for link in _exception_chain(exc):
        if isinstance(link, VMError):
            return JsonRpcError(SERVER_ERROR, str(link) or type(link).__name__)
    if isinstance(exc, TransactionFailed):
        return JsonRpcError(SERVER_ERROR, str(exc))
    if isinstance(exc, EVMValidationError):
        return JsonRpcError(SERVER_ERROR, str(exc))
    if isinstance(exc, BlockNotFound):
        return JsonRpcError(SERVER_ERROR, "header not found")
    if isinstance(exc, FilterNotFound):
        return JsonRpcError(SERVER_ERROR, "filter not found")
    if isinstance(
        exc, TesterValidationError | TypeError | ValueError | KeyError | IndexError | binascii.Error
    ):
        return JsonRpcError(INVALID_PARAMS, f"invalid params: {exc}")
    logger.exception("devchain: %s failed", method)
    return JsonRpcError(INTERNAL_ERROR, f"internal error: {exc}")


_BLOCK_METHODS: Final = frozenset({"eth_getBlockByNumber", "eth_getBlockByHash"})


def _with_remapped_transactions(block: dict[str, Any]) -> dict[str, Any]:
    """Full transactions of a block in JSON-RPC's key names.

    web3's formatting renames the keys of a block and of a transaction it returns on its
    own, not those of the transactions nested in a block.
    """
    from web3.providers.eth_tester.middleware import (
        transaction_result_formatter,
        transaction_result_remapper,
    )

    transactions = block.get("transactions") or []
    if not any(isinstance(tx, Mapping) for tx in transactions):
        return block
    remapped = [
        transaction_result_remapper(transaction_result_formatter(dict(tx)))
        if isinstance(tx, Mapping)
        else tx
        for tx in transactions
    ]
    return {**block, "transactions": remapped}


_RENAMED_KEYS: Final = {"y_parity": "yParity"}
_DROPPED_KEYS: Final = frozenset({"state_root"})  # pre-Byzantium receipt field, not JSON-RPC


def _to_json(value: Any, key: str | None = None) -> Any:
    """eth-tester's Python values as JSON-RPC values (integers as hex quantities)."""
    if value is None or isinstance(value, bool | str | float):
        return value
    if isinstance(value, int):
        if key == "logsBloom":
            return "0x" + value.to_bytes(256, "big").hex()
        return hex(value)
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    if isinstance(value, Mapping):
        return {
            _RENAMED_KEYS.get(k, k): _to_json(v, k)
            for k, v in value.items()
            if k not in _DROPPED_KEYS
        }
    if isinstance(value, Iterable):
        return [_to_json(item) for item in value]
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON-RPC")


# --- JSON-RPC over HTTP ---------------------------------------------------------------


def _error_response(request_id: Any, error: JsonRpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": error.to_dict()}


def handle_json_rpc(chain: DevChain, body: bytes) -> bytes | None:
    """Answer a JSON-RPC 2.0 HTTP body (single call or batch); ``None`` if nothing to send."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _dump(_error_response(None, JsonRpcError(PARSE_ERROR, "parse error")))
    if isinstance(payload, list):
        if not payload:
            return _dump(_error_response(None, JsonRpcError(INVALID_REQUEST, "empty batch")))
        responses = [r for r in (_handle_call(chain, call) for call in payload) if r is not None]
        return _dump(responses) if responses else None
    response = _handle_call(chain, payload)
    return None if response is None else _dump(response)


def _handle_call(chain: DevChain, call: Any) -> dict[str, Any] | None:
    if not isinstance(call, dict):
        return _error_response(None, JsonRpcError(INVALID_REQUEST, "invalid request"))
    request_id = call.get("id")
    method = call.get("method")
    if (
        not isinstance(method, str)
        or call.get("jsonrpc", "2.0") != "2.0"
        or isinstance(request_id, bool | dict | list)
    ):
        return _error_response(request_id, JsonRpcError(INVALID_REQUEST, "invalid request"))
    params = call.get("params")
    if params is None:
        params = []
    try:
        if not isinstance(params, list):
            raise JsonRpcError(INVALID_PARAMS, "invalid params: expected an array")
        result = chain.request(method, params)
    except JsonRpcError as error:
        response = _error_response(request_id, error)
    else:
        response = {"jsonrpc": "2.0", "id": request_id, "result": result}
    return response if "id" in call else None  # no answer to a notification


def _dump(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


class _RpcHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse their connection
    # Without it the response waits for the client's delayed ACK: 40 ms per request.
    disable_nagle_algorithm = True
    server: _RpcHTTPServer

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def do_POST(self) -> None:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._reply(HTTPStatus.LENGTH_REQUIRED, b"Content-Length required\n", "text/plain")
            return
        if int(length) > MAX_REQUEST_BYTES:
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b"request too large\n", "text/plain")
            self.close_connection = True
            return
        body = self.rfile.read(int(length))
        answer = handle_json_rpc(self.server.chain, body)
        if answer is None:
            self._reply(HTTPStatus.NO_CONTENT, b"", None)
        else:
            self._reply(HTTPStatus.OK, answer, "application/json")

    def do_GET(self) -> None:
        self._reply(HTTPStatus.METHOD_NOT_ALLOWED, b"JSON-RPC: POST only\n", "text/plain")

    def _reply(self, status: HTTPStatus, body: bytes, content_type: str | None) -> None:
        self.send_response(status)
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", "POST")
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("devchain %s: " + format, self.server.chain.chain_id, *args)


class _RpcHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], chain: DevChain) -> None:
        self.chain = chain
        # Open keep-alive connections, closed on stop: their threads would serve on.
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _RpcHandler)

    def close_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class DevChainServer:
    """A JSON-RPC 2.0 HTTP server for a :class:`DevChain`, run in a background thread.

    :param chain: the chain to serve; its block timer runs while the server runs.
    :param port: TCP port; 0 picks a free one (see :attr:`url` after :meth:`start`).
    :param host: interface to listen on; the default keeps it on this machine.
    """

    def __init__(self, chain: DevChain, port: int = 0, host: str = DEFAULT_HOST) -> None:
        self.chain = chain
        self.host = host
        self.port = port
        self._server: _RpcHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The RPC URL, e.g. ``http://127.0.0.1:8545``."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> DevChainServer:
        """Bind, start serving in a background thread, start the chain's block timer."""
        if self._server is not None:
            return self
        self._server = _RpcHTTPServer((self.host, self.port), self.chain)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"devchain-{self.chain.chain_id}-http",
            daemon=True,
        )
        self._thread.start()
        self.chain.start()
        logger.info("devchain %s serving on %s", self.chain.chain_id, self.url)
        return self

    def stop(self) -> None:
        """Stop serving, close the port and stop the block timer. Idempotent."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.close_connections()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.chain.stop()

    def __enter__(self) -> DevChainServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --- contracts and funding ------------------------------------------------------------------


def contract_artifact(name: str) -> dict[str, Any]:
    """The committed ABI and creation bytecode of contract ``name`` (e.g. ``"Portal"``)."""
    artifact: dict[str, Any] = json.loads((CONTRACTS_DIR / f"{name}.json").read_text())
    return artifact


def _fees(w3: Web3) -> dict[str, int]:
    base_fee = int(w3.eth.get_block("latest").get("baseFeePerGas") or 0)
    tip = int(w3.eth.max_priority_fee)
    return {"maxPriorityFeePerGas": tip, "maxFeePerGas": 2 * base_fee + tip}


def _send_and_wait(
    w3: Web3, account: LocalAccount, transactions: Sequence[TxParams], timeout: float
) -> list[TxReceipt]:
    """Sign ``transactions`` with consecutive nonces, send them all, wait for every receipt.

    Gas is estimated for each before any is sent, so they must not depend on each other.
    """
    nonce = w3.eth.get_transaction_count(account.address, "pending")
    chain_id = w3.eth.chain_id
    fees = _fees(w3)
    hashes = []
    for offset, transaction in enumerate(transactions):
        tx: dict[str, Any] = {
            "from": account.address,
            "chainId": chain_id,
            "nonce": nonce + offset,
            **fees,
            **transaction,
        }
        if "gas" not in tx:
            tx["gas"] = int(w3.eth.estimate_gas(tx) * 1.2)  # type: ignore[arg-type]
        signed = account.sign_transaction(tx)
        hashes.append(w3.eth.send_raw_transaction(signed.raw_transaction))
    receipts = []
    for tx_hash in hashes:
        receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=timeout, poll_latency=0.05)
        if receipt["status"] != 1:
            raise RuntimeError(f"transaction {tx_hash.to_0x_hex()} reverted")
        receipts.append(receipt)
    return receipts


def deploy_dev_contracts(
    w3: Web3,
    deployer_account: LocalAccount,
    *,
    token_name: str = "Test Token",
    token_symbol: str = "TEST",
    timeout: float = 60,
) -> dict[str, str]:
    """Deploy ``Portal`` and ``TestToken`` with ``deployer_account``; their addresses.

    Returns ``{"portal": ..., "token": ...}`` (checksummed). Works on any chain ``w3`` talks
    to. The addresses depend only on the deployer and its nonce, so a fresh chain with the
    same deployer gets the same addresses.
    """
    transactions: list[TxParams] = []
    for name, args in (("Portal", ()), ("TestToken", (token_name, token_symbol))):
        artifact = contract_artifact(name)
        factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
        transactions.append({"data": factory.constructor(*args).data_in_transaction})
    receipts = _send_and_wait(w3, deployer_account, transactions, timeout)
    portal, token = (receipt["contractAddress"] for receipt in receipts)
    if portal is None or token is None:
        raise RuntimeError("a deployment receipt has no contract address")
    return {"portal": to_checksum_address(portal), "token": to_checksum_address(token)}


def fund_account(
    w3: Web3,
    funder: LocalAccount,
    recipient: str,
    *,
    wei: int = 0,
    token: str | None = None,
    token_amount: int = 0,
    timeout: float = 60,
) -> None:
    """Send ``recipient`` ``wei`` from ``funder`` and mint it ``token_amount`` of ``token``."""
    recipient = to_checksum_address(recipient)
    transactions: list[TxParams] = []
    if wei:
        transactions.append({"to": recipient, "value": wei, "gas": 21_000})  # type: ignore[typeddict-item]
    if token is not None and token_amount:
        contract = w3.eth.contract(
            address=to_checksum_address(token), abi=contract_artifact("TestToken")["abi"]
        )
        transactions.append(
            {"to": contract.address, "data": contract.encode_abi("mint", [recipient, token_amount])}
        )
    if transactions:
        _send_and_wait(w3, funder, transactions, timeout)


# --- a source and a destination chain -------------------------------------------------------


@dataclass(frozen=True)
class ChainInfo:
    """One running dev chain as the state file describes it."""

    chain_id: int
    rpc_url: str
    portal: str
    token: str
    role: str

    def to_json(self) -> dict[str, Any]:
        return {
            "rpc_url": self.rpc_url,
            "portal": self.portal,
            "token": self.token,
            "role": self.role,
        }


@dataclass(frozen=True)
class DevChainState:
    """What :class:`DevChainSet` started: chains by id, the funded solver, the funder.

    The funder is a prefunded dev account (a public test key) that tests and demos may use
    to create intents. The solver's private key is never part of it.
    """

    chains: dict[int, ChainInfo]
    solver: str
    funder: DevAccount

    @property
    def source(self) -> ChainInfo:
        return next(c for c in self.chains.values() if c.role == ROLE_SOURCE)

    @property
    def destinations(self) -> list[ChainInfo]:
        return [c for c in self.chains.values() if c.role == ROLE_DESTINATION]

    def to_json(self) -> dict[str, Any]:
        return {
            "chains": {str(chain_id): info.to_json() for chain_id, info in self.chains.items()},
            "solver": self.solver,
            "funder": {"address": self.funder.address, "private_key": self.funder.private_key},
        }

    def write(self, path: Path) -> None:
        """Write the JSON state file atomically (readers never see half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(self.to_json(), handle, indent=2)
                handle.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def read(cls, path: Path) -> DevChainState:
        """Load a state file written by :meth:`write`."""
        data = json.loads(Path(path).read_text())
        chains = {
            int(chain_id): ChainInfo(
                chain_id=int(chain_id),
                rpc_url=info["rpc_url"],
                portal=info["portal"],
                token=info["token"],
                role=info["role"],
            )
            for chain_id, info in data["chains"].items()
        }
        funder = DevAccount(data["funder"]["address"], data["funder"]["private_key"])
        return cls(chains=chains, solver=data["solver"], funder=funder)


@dataclass
class DevChainSet:
    """Dev chains with our contracts: the first chain id is the source, the rest destinations.

    :meth:`start` serves each chain over HTTP, deploys ``Portal`` and ``TestToken`` on each
    (with the first dev account, so the addresses are the same on every chain and every
    start), sends the solver ``solver_eth`` on every chain and mints it ``solver_tokens``
    test tokens on the destination chains.

    :param ports: one port per chain; ``None`` picks free ports.
    """

    solver_address: str
    chain_ids: Sequence[int] = DEFAULT_CHAIN_IDS
    ports: Sequence[int] | None = None
    block_time: float | None = None
    host: str = DEFAULT_HOST
    solver_eth: int = DEFAULT_SOLVER_ETH
    solver_tokens: int = DEFAULT_SOLVER_TOKENS
    servers: list[DevChainServer] = field(default_factory=list, init=False)
    state: DevChainState | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.solver_address = to_checksum_address(self.solver_address)
        self.chain_ids = tuple(int(c) for c in self.chain_ids)
        if len(self.chain_ids) < 2 or len(set(self.chain_ids)) != len(self.chain_ids):
            raise ValueError("need at least two distinct chain ids (a source and a destination)")
        if self.ports is not None and len(self.ports) != len(self.chain_ids):
            raise ValueError("give one port per chain id")

    def start(self) -> DevChainState:
        """Start, deploy and fund every chain; on any failure stop what was started."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> DevChainState:
        ports = list(self.ports) if self.ports is not None else [0] * len(self.chain_ids)
        for chain_id, port in zip(self.chain_ids, ports, strict=True):
            chain = DevChain(chain_id, block_time=self.block_time)
            self.servers.append(DevChainServer(chain, port=port, host=self.host).start())
        funder = self.servers[0].chain.accounts[0]
        chains: dict[int, ChainInfo] = {}
        for index, server in enumerate(self.servers):
            w3 = Web3(Web3.HTTPProvider(server.url, request_kwargs={"timeout": 30}))
            addresses = deploy_dev_contracts(w3, funder.local_account())
            role = ROLE_SOURCE if index == 0 else ROLE_DESTINATION
            fund_account(
                w3,
                funder.local_account(),
                self.solver_address,
                wei=self.solver_eth,
                token=addresses["token"] if role == ROLE_DESTINATION else None,
                token_amount=self.solver_tokens,
            )
            chains[server.chain.chain_id] = ChainInfo(
                chain_id=server.chain.chain_id,
                rpc_url=server.url,
                portal=addresses["portal"],
                token=addresses["token"],
                role=role,
            )
        self.state = DevChainState(chains=chains, solver=self.solver_address, funder=funder)
        return self.state

    def stop(self) -> None:
        """Stop every server and block timer. The chains' state is gone with them."""
        for server in self.servers:
            server.stop()
        self.servers.clear()

    def __enter__(self) -> DevChainSet:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_devchains(
    chain_ids: Sequence[int] = DEFAULT_CHAIN_IDS,
    ports: Sequence[int] | None = None,
    block_time: float | None = None,
    *,
    solver_address: str,
    state_file: Path,
    host: str = DEFAULT_HOST,
) -> DevChainSet:
    """Start a :class:`DevChainSet`, write its state to ``state_file``; the running set.

    The caller stops it with :meth:`DevChainSet.stop` (and removes the state file if it
    wants "file present" to mean "chains running").
    """
    chains = DevChainSet(
        solver_address=solver_address,
        chain_ids=chain_ids,
        ports=ports,
        block_time=block_time,
        host=host,
    )
    state = chains.start()
    try:
        state.write(state_file)
    except BaseException:
        chains.stop()
        raise
    return chains
