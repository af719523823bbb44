"""Wallets: who signs the solver's transactions.

A wallet type is configured under ``INTENTQUEUE["wallets"]`` and built by dotted path::

    INTENTQUEUE = {
        "wallets": {
            "basic": {"class": "intentqueue.chain.wallets.BasicWallet"},
        },
    }

An execution job's ``walletType`` picks one (``basic`` when it names none). A type that
is not configured (``kernel`` here) is a ``PermanentError`` naming the configured ones:
there is no fallback to another wallet.

``basic`` is an externally owned account whose private key comes from the environment:
``SOLVER_PRIVATE_KEY`` (hex), ``SOLVER_PRIVATE_KEY_FILE`` (a path to a file holding it,
e.g. a mounted secret), or ``SOLVER_KEYSTORE`` (a path to an encrypted JSON keystore in
the standard geth / eth-account format) unlocked by ``SOLVER_KEYSTORE_PASSWORD`` or the
contents of ``SOLVER_KEYSTORE_PASSWORD_FILE``; exactly one of the three. A keystore that
cannot be unlocked is reported by the system check ``intentqueue.E011`` when a worker
starts, and is a ``WalletNotConfigured`` (permanent) error in a job. The key is read once
per process and kept inside the wallet object: it is never part of job data, log lines,
exception messages, reprs or the admin.
"""

from __future__ import annotations

import json
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final

from django.core.signals import setting_changed
from django.utils.module_loading import import_string
from eth_account import Account
from eth_utils import to_checksum_address

from intentqueue.conf import intentqueue_settings
from intentqueue.exceptions import PermanentError

DEFAULT_WALLET: Final = "basic"
KEY_ENV: Final = "SOLVER_PRIVATE_KEY"
KEY_FILE_ENV: Final = "SOLVER_PRIVATE_KEY_FILE"
KEYSTORE_ENV: Final = "SOLVER_KEYSTORE"
KEYSTORE_PASSWORD_ENV: Final = "SOLVER_KEYSTORE_PASSWORD"
KEYSTORE_PASSWORD_FILE_ENV: Final = "SOLVER_KEYSTORE_PASSWORD_FILE"


class WalletNotConfigured(PermanentError):
    """A wallet type with no entry, or a wallet whose key is missing or unusable."""

    error_type = "wallet_not_configured"


@dataclass(frozen=True)
class SignedTx:
    """A signed transaction: the exact bytes to broadcast and their hash."""

    raw: bytes
    tx_hash: str

    def __repr__(self) -> str:
        return f"<SignedTx {self.tx_hash}>"


class Wallet(ABC):
    """Signs transactions for one address. Subclasses implement ``address`` and ``sign``.

    The capability flags tell the execution stage what it may ask of a wallet.
    """

    #: Signs ordinary transactions sent from ``address`` itself, each with the account's
    #: next nonce (an externally owned account). The execution stage allocates nonces
    #: and keeps every signed transaction for wallets that do.
    signs_transactions: ClassVar[bool] = True
    #: Can put several calls into one transaction (approve + fulfill atomically). A
    #: wallet without it gets one transaction per call, each effectively-once.
    supports_batching: ClassVar[bool] = False

    def __init__(self, wallet_type: str, options: Mapping[str, Any]) -> None:
        self.wallet_type = wallet_type
        self.options = dict(options)

    @property
    @abstractmethod
    def address(self) -> str:
        """The checksummed address transactions come from (and the claimant)."""

    @abstractmethod
    def sign(self, transaction: Mapping[str, Any]) -> SignedTx:
        """Sign a complete transaction (nonce, fees, gas, chain id included)."""

    @property
    def claimant(self) -> bytes:
        """The 32-byte claimant the portal records for this wallet's fulfillments."""
        return bytes(12) + bytes.fromhex(self.address[2:])

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.wallet_type} {self.address}>"

    def __reduce__(self) -> Any:
        raise TypeError("wallets are not picklable")


class BasicWallet(Wallet):
    """An externally owned account whose key is ``SOLVER_PRIVATE_KEY``, the contents of
    the file ``SOLVER_PRIVATE_KEY_FILE``, or the key of the keystore ``SOLVER_KEYSTORE``."""

    def __init__(self, wallet_type: str, options: Mapping[str, Any]) -> None:
        super().__init__(wallet_type, options)
        if options:
            raise WalletNotConfigured(
                f"INTENTQUEUE.wallets.{wallet_type}: the basic wallet takes no options "
                f"(its key comes from {KEY_ENV}, {KEY_FILE_ENV} or {KEYSTORE_ENV})"
            )
        # Kept in a closure rather than an attribute: nothing that walks the object
        # (repr, vars(), a debugger's locals dump) shows the key.
        account = _load_account(wallet_type)
        self._address = str(account.address)
        self._sign = lambda tx: account.sign_transaction(dict(tx))

    @property
    def address(self) -> str:
        return self._address

    def sign(self, transaction: Mapping[str, Any]) -> SignedTx:
        signed = self._sign(transaction)
        return SignedTx(raw=bytes(signed.raw_transaction), tx_hash=signed.hash.to_0x_hex())


def _load_account(wallet_type: str) -> Any:
    key = os.environ.get(KEY_ENV, "").strip()
    path = os.environ.get(KEY_FILE_ENV, "").strip()
    keystore = os.environ.get(KEYSTORE_ENV, "").strip()
    if sum(map(bool, (key, path, keystore))) > 1:
        raise WalletNotConfigured(f"set only one of {KEY_ENV}, {KEY_FILE_ENV} and {KEYSTORE_ENV}")
    if keystore:
        return _load_keystore(keystore)
    source = KEY_ENV
    if path:
        source = f"{KEY_FILE_ENV} ({path})"
        try:
            key = Path(path).read_text().strip()
        except OSError as error:
            raise WalletNotConfigured(f"cannot read {source}: {error.strerror}") from None
    if not key:
        raise WalletNotConfigured(
            f"the {wallet_type!r} wallet has no key: set {KEY_ENV} or {KEY_FILE_ENV} "
            f"(or {KEYSTORE_ENV} with its password)"
        )
    try:
        return Account.from_key(key)
    except Exception:
        # The underlying message may quote the value: say only where it came from.
        raise WalletNotConfigured(
            f"{source} is not a valid private key (expected 32 bytes of hex)"
        ) from None


def _keystore_password() -> str:
    password = os.environ.get(KEYSTORE_PASSWORD_ENV, "")
    path = os.environ.get(KEYSTORE_PASSWORD_FILE_ENV, "").strip()
    if password and path:
        raise WalletNotConfigured(
            f"set only one of {KEYSTORE_PASSWORD_ENV} and {KEYSTORE_PASSWORD_FILE_ENV}"
        )
    if path:
        try:
            # A trailing newline is how files end, not part of the password.
            return Path(path).read_text().rstrip("\r\n")
        except OSError as error:
            raise WalletNotConfigured(
                f"cannot read {KEYSTORE_PASSWORD_FILE_ENV} ({path}): {error.strerror}"
            ) from None
    if not password:
        raise WalletNotConfigured(
            f"{KEYSTORE_ENV} is set but has no password: set {KEYSTORE_PASSWORD_ENV} or "
            f"{KEYSTORE_PASSWORD_FILE_ENV}"
        )
    return password


def _load_keystore(path: str) -> Any:
    """The account of an encrypted JSON keystore (geth / eth-account format)."""
    source = f"{KEYSTORE_ENV} ({path})"
    try:
        document = json.loads(Path(path).read_text())
    except OSError as error:
        raise WalletNotConfigured(f"cannot read {source}: {error.strerror}") from None
    except ValueError:
        raise WalletNotConfigured(f"{source} is not a JSON keystore") from None
    if not isinstance(document, dict) or not isinstance(
        document.get("crypto", document.get("Crypto")), dict
    ):
        raise WalletNotConfigured(f"{source} is not a JSON keystore (no crypto section)")
    password = _keystore_password()
    try:
        key = Account.decrypt(document, password)
    except ValueError as error:
        # eth-account says "MAC mismatch" for a wrong password; nothing secret is quoted.
        if "mac mismatch" in str(error).lower():
            raise WalletNotConfigured(
                f"{source}: wrong password (from {_password_source()})"
            ) from None
        raise WalletNotConfigured(f"{source} cannot be unlocked: unsupported keystore") from None
    except Exception:
        raise WalletNotConfigured(f"{source} cannot be unlocked: unreadable keystore") from None
    account = Account.from_key(key)
    declared = str(document.get("address") or "").lower().removeprefix("0x")
    if declared and declared != account.address.lower()[2:]:
        raise WalletNotConfigured(f"{source}: the key does not match the keystore's address")
    return account


def _password_source() -> str:
    if os.environ.get(KEYSTORE_PASSWORD_FILE_ENV, "").strip():
        return KEYSTORE_PASSWORD_FILE_ENV
    return KEYSTORE_PASSWORD_ENV


def check_keystore() -> list[str]:
    """Problems unlocking ``SOLVER_KEYSTORE`` (none when it is not set)."""
    if not os.environ.get(KEYSTORE_ENV, "").strip():
        return []
    try:
        _load_account(DEFAULT_WALLET)
    except WalletNotConfigured as error:
        return [str(error)]
    return []


# --- the registry ------------------------------------------------------------------------

_wallets: dict[str, Wallet] = {}
_lock = threading.Lock()


def wallet_types() -> list[str]:
    """The configured wallet types."""
    return list(intentqueue_settings.wallets)


def get_wallet(wallet_type: str | None = None) -> Wallet:
    """The wallet configured as ``wallet_type`` (``basic`` when ``None``), built once per
    process. ``WalletNotConfigured`` (a ``PermanentError``) when it cannot be had."""
    name = wallet_type or DEFAULT_WALLET
    wallet = _wallets.get(name)
    if wallet is not None:
        return wallet
    with _lock:
        if name not in _wallets:
            _wallets[name] = build_wallet(name)
        return _wallets[name]


def build_wallet(name: str) -> Wallet:
    """A new wallet from its configuration entry (not cached)."""
    specs = intentqueue_settings.wallets
    if name not in specs:
        configured = ", ".join(sorted(specs)) or "none"
        raise WalletNotConfigured(
            f"wallet type {name!r} is not configured (configured: {configured}); "
            f"add INTENTQUEUE['wallets'][{name!r}] to use it"
        )
    spec = specs[name]
    where = f"INTENTQUEUE.wallets.{name}"
    unknown = set(spec) - {"class", "options"}
    if unknown:
        raise WalletNotConfigured(
            f"{where}: unknown keys {sorted(unknown)} (allowed: class, options)"
        )
    try:
        cls = import_string(spec.get("class", ""))
    except ImportError as error:
        raise WalletNotConfigured(
            f"{where}.class: cannot import {spec.get('class')!r}: {error}"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Wallet)):
        raise WalletNotConfigured(
            f"{where}.class: not a subclass of intentqueue.chain.wallets.Wallet"
        )
    wallet = cls(name, spec.get("options") or {})
    if not wallet.signs_transactions:
        raise WalletNotConfigured(
            f"{where}: {cls.__name__} does not sign transactions, which the execution stage needs"
        )
    return wallet


def solver_address(wallet_type: str | None = None) -> str:
    """The address of a configured wallet (``basic`` by default): the solver's address."""
    return str(to_checksum_address(get_wallet(wallet_type).address))


def clear_cache() -> None:
    """Forget built wallets (after the key in the environment changed)."""
    with _lock:
        _wallets.clear()


def _setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == "INTENTQUEUE":
        clear_cache()


setting_changed.connect(_setting_changed)
