"""Chain configuration: ``INTENTQUEUE["chains"]``, read and validated.

Each chain is keyed by its chain id as a decimal string::

    INTENTQUEUE = {
        "chains": {
            "10": {
                "rpc_url": "https://...",          # JSON-RPC over HTTP(S); required
                "portal": "0x...",                 # the Portal contract; required
                "confirmations": 2,                # blocks, the transaction's own included
                "tokens": ["0x..."],               # route tokens filled here; empty: any
                "prover": "0x...",                 # the only prover accepted; unset: any
                "rpc_timeout": 10,                 # seconds per RPC request
                "replace_after": 60,               # seconds before a stuck tx gets a fee bump
                "pending_timeout": 600,            # seconds a tx may stay unmined per attempt
                "log_lookback": 50000,             # blocks searched for an IntentFulfilled event
            },
        },
    }

Two more sources feed it:

- ``CHAIN_<id>_RPC_URL`` in the environment replaces the ``rpc_url`` of chain ``<id>``
  (URLs often carry an API key; they belong in the environment, not in settings files);
- ``INTENTQUEUE_DEVCHAIN_STATE=<path>`` names the state file written by
  ``manage.py devchain``: its chains (RPC URL, portal, test token) are configured first,
  and entries of ``INTENTQUEUE["chains"]`` are laid over them key by key.

``get_chain(chain_id)`` returns one validated ``ChainConfig`` (and raises
``ChainNotConfigured``, a permanent error, for a chain that has no entry);
``check_chains()`` lists every problem for the system check.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from eth_utils import is_hex_address, to_checksum_address

from intentqueue.conf import intentqueue_settings
from intentqueue.exceptions import PermanentError

#: Environment variable naming the dev chain state file.
DEVCHAIN_STATE_ENV: Final = "INTENTQUEUE_DEVCHAIN_STATE"
#: ``CHAIN_<id>_RPC_URL`` overrides the RPC URL of a chain.
RPC_URL_ENV: Final = "CHAIN_{}_RPC_URL"

DEFAULT_CONFIRMATIONS: Final = 2
DEFAULT_RPC_TIMEOUT: Final = 10.0
DEFAULT_REPLACE_AFTER: Final = 60
DEFAULT_PENDING_TIMEOUT: Final = 600
DEFAULT_LOG_LOOKBACK: Final = 50_000

#: Every key a chain entry may have.
CHAIN_KEYS: Final = frozenset(
    {
        "rpc_url", "portal", "confirmations", "tokens", "prover", "rpc_timeout",
        "replace_after", "pending_timeout", "log_lookback",
    }
)  # fmt: skip


class ChainNotConfigured(PermanentError):
    """An intent names a chain that has no entry in ``INTENTQUEUE["chains"]``."""

    error_type = "chain_not_configured"


@dataclass(frozen=True)
class ChainConfig:
    """One configured chain. Addresses are checksummed."""

    chain_id: int
    rpc_url: str
    portal: str
    #: Blocks on the canonical chain, the transaction's own included, before a
    #: transaction counts as final.
    confirmations: int = DEFAULT_CONFIRMATIONS
    #: Route tokens the solver fills on this chain; empty means any token.
    tokens: tuple[str, ...] = ()
    #: The prover intents to this chain must name; ``None`` accepts any.
    prover: str | None = None
    rpc_timeout: float = DEFAULT_RPC_TIMEOUT
    replace_after: int = DEFAULT_REPLACE_AFTER
    pending_timeout: int = DEFAULT_PENDING_TIMEOUT
    log_lookback: int = DEFAULT_LOG_LOOKBACK

    @property
    def settings_path(self) -> str:
        """Where this chain is configured, for messages."""
        return f"INTENTQUEUE.chains.{self.chain_id}"

    def __repr__(self) -> str:  # the URL may carry an API key: show the host only
        host = self.rpc_url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
        return f"<ChainConfig {self.chain_id} {host} portal={self.portal}>"


# --- parsing ---------------------------------------------------------------------------


def _address(value: Any, where: str) -> str:
    if not isinstance(value, str) or not is_hex_address(value):
        raise ImproperlyConfigured(f"{where}: expected a 20-byte hex address, got {value!r}")
    return str(to_checksum_address(value))


def _number(value: Any, where: str, *, minimum: float, integer: bool = True) -> Any:
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if number is None or (integer and not isinstance(number, int)) or number < minimum:
        kind = "an integer" if integer else "a number"
        raise ImproperlyConfigured(f"{where}: expected {kind} >= {minimum}, got {value!r}")
    return value


def parse_chain(key: str, entry: Any) -> ChainConfig:
    """A ``ChainConfig`` from one entry; ``ImproperlyConfigured`` names the bad key."""
    where = f"INTENTQUEUE.chains.{key}"
    if not (isinstance(key, str) and key.isdigit() and key.isascii() and int(key) > 0):
        raise ImproperlyConfigured(f"{where}: the key must be a chain id (a decimal string)")
    if not isinstance(entry, Mapping):
        raise ImproperlyConfigured(f"{where}: expected a dict, got {entry!r}")
    for name in entry:
        if name not in CHAIN_KEYS:
            allowed = ", ".join(sorted(CHAIN_KEYS))
            raise ImproperlyConfigured(f"{where}.{name}: unknown key (allowed: {allowed})")
    rpc_url = entry.get("rpc_url")
    if not isinstance(rpc_url, str) or not rpc_url.startswith(("http://", "https://")):
        raise ImproperlyConfigured(
            f"{where}.rpc_url: required, an http:// or https:// JSON-RPC URL "
            f"(or set {RPC_URL_ENV.format(key)})"
        )
    if "portal" not in entry:
        raise ImproperlyConfigured(f"{where}.portal: required, the Portal contract's address")
    tokens = entry.get("tokens") or []
    if not isinstance(tokens, list | tuple):
        raise ImproperlyConfigured(f"{where}.tokens: expected a list of addresses")
    prover = entry.get("prover")
    return ChainConfig(
        chain_id=int(key),
        rpc_url=rpc_url,
        portal=_address(entry["portal"], f"{where}.portal"),
        confirmations=_number(
            entry.get("confirmations", DEFAULT_CONFIRMATIONS), f"{where}.confirmations", minimum=1
        ),
        tokens=tuple(_address(t, f"{where}.tokens.{i}") for i, t in enumerate(tokens)),
        prover=None if prover is None else _address(prover, f"{where}.prover"),
        rpc_timeout=float(
            _number(
                entry.get("rpc_timeout", DEFAULT_RPC_TIMEOUT),
                f"{where}.rpc_timeout",
                minimum=0.1,
                integer=False,
            )
        ),
        replace_after=_number(
            entry.get("replace_after", DEFAULT_REPLACE_AFTER), f"{where}.replace_after", minimum=1
        ),
        pending_timeout=_number(
            entry.get("pending_timeout", DEFAULT_PENDING_TIMEOUT),
            f"{where}.pending_timeout",
            minimum=1,
        ),
        log_lookback=_number(
            entry.get("log_lookback", DEFAULT_LOG_LOOKBACK), f"{where}.log_lookback", minimum=1
        ),
    )


def devchain_entries(path: str | Path) -> dict[str, dict[str, Any]]:
    """Chain entries from a ``manage.py devchain`` state file."""
    try:
        from intentqueue.chain.devchain import DevChainState

        state = DevChainState.read(Path(path))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ImproperlyConfigured(
            f"{DEVCHAIN_STATE_ENV}={path}: cannot read the dev chain state file ({error})"
        ) from error
    return {
        str(chain_id): {"rpc_url": info.rpc_url, "portal": info.portal, "tokens": [info.token]}
        for chain_id, info in state.chains.items()
    }


def raw_entries() -> dict[str, dict[str, Any]]:
    """Every chain entry, merged from the state file, the settings and the environment."""
    merged: dict[str, dict[str, Any]] = {}
    state_path = os.environ.get(DEVCHAIN_STATE_ENV, "").strip()
    if state_path:
        merged.update(devchain_entries(state_path))
    for key, entry in intentqueue_settings.chains.items():
        base = merged.get(str(key), {})
        merged[str(key)] = {**base, **entry} if isinstance(entry, Mapping) else entry
    for key, entry in merged.items():
        url = os.environ.get(RPC_URL_ENV.format(key), "").strip()
        if url and isinstance(entry, Mapping):
            merged[key] = {**entry, "rpc_url": url}
    return merged


# --- access ----------------------------------------------------------------------------

_cache: dict[tuple[Any, ...], ChainConfig] = {}
_lock = threading.Lock()


def _fingerprint() -> tuple[Any, ...]:
    """What the configuration depends on besides the settings (which clear the cache)."""
    state_path = os.environ.get(DEVCHAIN_STATE_ENV, "").strip()
    mtime = None
    if state_path:
        try:
            mtime = Path(state_path).stat().st_mtime_ns
        except OSError:
            mtime = -1
    urls = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("CHAIN_")))
    return state_path, mtime, urls


def get_chain(chain_id: int | str) -> ChainConfig:
    """The configuration of ``chain_id``.

    Raises ``ChainNotConfigured`` (a ``PermanentError``) when the chain has no entry and
    ``ImproperlyConfigured`` when its entry is broken.
    """
    key = str(chain_id)
    cache_key = (key, *_fingerprint())
    config = _cache.get(cache_key)
    if config is not None:
        return config
    entries = raw_entries()
    if key not in entries:
        known = ", ".join(sorted(entries, key=lambda k: (len(k), k))) or "none"
        raise ChainNotConfigured(
            f"chain {key} is not configured: add INTENTQUEUE['chains']['{key}'] with its "
            f"rpc_url and portal (configured chains: {known})"
        )
    config = parse_chain(key, entries[key])
    with _lock:
        _cache[cache_key] = config
    return config


def configured_chain_ids() -> set[int]:
    """The ids of every configured chain (settings, state file), without validating them."""
    return {int(key) for key in raw_entries() if key.isdigit()}


def configured_chains() -> dict[int, ChainConfig]:
    """Every configured chain, validated (``ImproperlyConfigured`` on the first problem)."""
    return {int(key): get_chain(key) for key in raw_entries()}


def check_chains() -> list[str]:
    """Problems of the chains configuration, one message each (for a system check)."""
    try:
        entries = raw_entries()
    except ImproperlyConfigured as error:
        return [str(error)]
    problems = []
    for key, entry in entries.items():
        try:
            parse_chain(key, entry)
        except ImproperlyConfigured as error:
            problems.append(str(error))
    return problems


def clear_cache() -> None:
    """Forget parsed chains (the next ``get_chain()`` parses again)."""
    with _lock:
        _cache.clear()


def _setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == "INTENTQUEUE":
        clear_cache()


setting_changed.connect(_setting_changed)
