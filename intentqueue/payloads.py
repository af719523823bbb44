"""Parse and validate intent payloads in the original solver's JSON shape.

Every problem is collected under its field path (``route.tokens[1].amount``) and raised
together as one ``InvalidPayloadError``; nothing is created from a payload with errors.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

from eth_utils import to_checksum_address

from intentqueue.exceptions import InvalidPayloadError
from intentqueue.hashing import intent_hash

#: Largest payload accepted, in bytes of JSON.
MAX_PAYLOAD_BYTES = 64 * 1024
#: Most tokens in a route or a reward, and most calls in a route.
MAX_ITEMS = 20
#: Largest calldata of one call, in bytes.
MAX_CALL_DATA_BYTES = 8 * 1024
#: Deadlines are uint64 on chain, stored as signed 64-bit integers here.
MAX_DEADLINE = 2**63 - 1
#: Chain ids are uint64 in the hash but stored as signed 64-bit integers like deadlines.
MAX_CHAIN_ID = 2**63 - 1
UINT256_MAX = 2**256 - 1

_HEX = re.compile(r"^0x[0-9a-fA-F]*$")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_BYTES32 = re.compile(r"^0x[0-9a-fA-F]{64}$")
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")
_TEXT_FIELDS = {"strategy": 64, "correlationId": 128, "source": 64}
_TOP_KEYS = {"intentHash", "sourceChainId", "destination", "route", "reward", "priority"}
_TOP_KEYS |= set(_TEXT_FIELDS)
_ROUTE_KEYS = {"salt", "deadline", "portal", "nativeAmount", "tokens", "calls"}
_REWARD_KEYS = {"deadline", "creator", "prover", "nativeAmount", "tokens"}


@dataclass(frozen=True)
class IntentPayload:
    """A validated payload: checksummed addresses, int amounts, the computed hash."""

    hash: str
    source_chain_id: int
    destination_chain_id: int
    route: dict[str, Any]
    reward: dict[str, Any]
    strategy: str | None
    priority: int | None
    correlation_id: str
    source: str

    def model_fields(self) -> dict[str, Any]:
        """Keyword arguments for ``Intent(...)``."""
        route, reward = self.route, self.reward
        fields: dict[str, Any] = {
            "hash": self.hash,
            "source_chain_id": self.source_chain_id,
            "destination_chain_id": self.destination_chain_id,
            "route_salt": route["salt"],
            "route_deadline": route["deadline"],
            "route_portal": route["portal"],
            "route_native_amount": route["native_amount"],
            "route_tokens": route["tokens"],
            "route_calls": route["calls"],
            "reward_deadline": reward["deadline"],
            "reward_creator": reward["creator"],
            "reward_prover": reward["prover"],
            "reward_native_amount": reward["native_amount"],
            "reward_tokens": reward["tokens"],
            "correlation_id": self.correlation_id,
            "source": self.source,
        }
        if self.strategy:
            fields["strategy"] = self.strategy
        if self.priority is not None:
            fields["priority"] = self.priority
        return fields


class _Parser:
    """Walks a payload once, collecting errors by field path."""

    def __init__(self) -> None:
        self.errors: dict[str, str] = {}

    def fail(self, path: str, message: str) -> None:
        self.errors.setdefault(path, message)

    def mapping(self, value: Any, path: str, keys: set[str], required: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path or "payload", f"expected an object, got {_kind(value)}")
            return {}
        for key in sorted(set(value) - keys, key=str):
            self.fail(_join(path, str(key)), "unknown field")
        for key in sorted(required - set(value)):
            self.fail(_join(path, key), "required")
        return value

    def uint(self, value: Any, path: str, maximum: int, *, minimum: int = 0) -> int:
        number: int | None = None
        if isinstance(value, bool | float):
            self.fail(path, f"expected an integer or a decimal string, got {_kind(value)}")
            return 0
        if isinstance(value, int):
            number = value
        elif isinstance(value, str) and len(value) <= 80:
            text = value.strip()
            if text.isdigit() and text.isascii():
                number = int(text)
            elif _HEX.match(text) and len(text) > 2:
                number = int(text, 16)
        if number is None:
            self.fail(path, f"expected an integer or a decimal string, got {_kind(value)}")
            return 0
        if number < minimum:
            self.fail(path, f"must be at least {minimum}, got {number}")
        elif number > maximum:
            self.fail(path, f"must be at most {maximum}, got {number}")
        return number

    def address(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not _ADDRESS.match(value):
            shown = _kind(value) if not isinstance(value, str) else repr(value[:50])
            self.fail(path, f"expected a 20-byte hex address (0x + 40 hex digits), got {shown}")
            return ""
        checksummed = _checksummed(value.lower())
        mixed = value[2:] != value[2:].lower() and value[2:] != value[2:].upper()
        if mixed and value != checksummed:
            self.fail(path, f"bad EIP-55 checksum in {value}")
            return ""
        return checksummed

    def bytes32(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not _BYTES32.match(value):
            self.fail(path, "expected 32 bytes of hex (0x + 64 hex digits)")
            return ""
        return value.lower()

    def hex_data(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not _HEX.match(value) or len(value) % 2:
            self.fail(path, "expected 0x-prefixed hex bytes")
            return "0x"
        if (len(value) - 2) // 2 > MAX_CALL_DATA_BYTES:
            self.fail(path, f"longer than {MAX_CALL_DATA_BYTES} bytes")
            return "0x"
        return value.lower()

    def items(self, value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {_kind(value)}")
            return []
        if len(value) > MAX_ITEMS:
            self.fail(path, f"at most {MAX_ITEMS} entries, got {len(value)}")
            return []
        return value

    def tokens(self, value: Any, path: str) -> list[dict[str, str]]:
        parsed = []
        for index, raw in enumerate(self.items(value, path)):
            where = f"{path}[{index}]"
            item = self.mapping(raw, where, {"token", "amount"}, {"token", "amount"})
            if "token" in item and "amount" in item:
                token = self.address(item["token"], f"{where}.token")
                amount = self.uint(item["amount"], f"{where}.amount", UINT256_MAX)
                parsed.append({"token": token, "amount": str(amount)})
        return parsed

    def calls(self, value: Any, path: str) -> list[dict[str, str]]:
        parsed = []
        keys = {"target", "data", "value"}
        for index, raw in enumerate(self.items(value, path)):
            where = f"{path}[{index}]"
            item = self.mapping(raw, where, keys, keys)
            if keys <= set(item):
                parsed.append(
                    {
                        "target": self.address(item["target"], f"{where}.target"),
                        "data": self.hex_data(item["data"], f"{where}.data"),
                        "value": str(self.uint(item["value"], f"{where}.value", UINT256_MAX)),
                    }
                )
        return parsed

    def text(self, value: Any, path: str, max_length: int) -> str:
        if value is None:
            return ""
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {_kind(value)}")
            return ""
        if len(value) > max_length:
            self.fail(path, f"at most {max_length} characters, got {len(value)}")
            return ""
        if _UNSTORABLE.search(value):  # PostgreSQL refuses NUL; no database takes surrogates
            self.fail(path, "contains a NUL character or an unpaired surrogate")
            return ""
        return value

    def route(self, value: Any) -> dict[str, Any]:
        route = self.mapping(value, "route", _ROUTE_KEYS, _ROUTE_KEYS)
        if not route:
            return {}
        return {
            "salt": self.bytes32(route.get("salt"), "route.salt"),
            "deadline": self.uint(route.get("deadline"), "route.deadline", MAX_DEADLINE, minimum=1),
            "portal": self.address(route.get("portal"), "route.portal"),
            "native_amount": self.uint(
                route.get("nativeAmount"), "route.nativeAmount", UINT256_MAX
            ),
            "tokens": self.tokens(route.get("tokens"), "route.tokens"),
            "calls": self.calls(route.get("calls"), "route.calls"),
        }

    def reward(self, value: Any) -> dict[str, Any]:
        reward = self.mapping(value, "reward", _REWARD_KEYS, _REWARD_KEYS)
        if not reward:
            return {}
        return {
            "deadline": self.uint(
                reward.get("deadline"), "reward.deadline", MAX_DEADLINE, minimum=1
            ),
            "creator": self.address(reward.get("creator"), "reward.creator"),
            "prover": self.address(reward.get("prover"), "reward.prover"),
            "native_amount": self.uint(
                reward.get("nativeAmount"), "reward.nativeAmount", UINT256_MAX
            ),
            "tokens": self.tokens(reward.get("tokens"), "reward.tokens"),
        }


@functools.lru_cache(maxsize=4096)
def _checksummed(address: str) -> str:
    """EIP-55 form of a lower-case address (cached: tokens, portals and provers repeat)."""
    return str(to_checksum_address(address))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, bool | int | float):
        return f"{type(value).__name__} {value!r}"
    return type(value).__name__


def _decode(payload: Any) -> Any:
    """Accept a dict, or JSON text/bytes; enforce the size limit before parsing."""
    if isinstance(payload, bytes | bytearray | str):
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise InvalidPayloadError(
                {"payload": f"larger than {MAX_PAYLOAD_BYTES} bytes ({len(payload)} bytes)"}
            )
        try:
            return json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError) as error:  # deep nesting
            raise InvalidPayloadError({"payload": f"not valid JSON: {error}"}) from error
    try:
        size = len(json.dumps(payload, default=str))
    except (TypeError, ValueError, RecursionError) as error:
        raise InvalidPayloadError({"payload": f"not JSON-serialisable: {error}"}) from error
    if size > MAX_PAYLOAD_BYTES:
        raise InvalidPayloadError(
            {"payload": f"larger than {MAX_PAYLOAD_BYTES} bytes ({size} bytes as JSON)"}
        )
    return payload


def parse_intent_payload(payload: Any) -> IntentPayload:
    """Validate ``payload`` and compute its hash; ``InvalidPayloadError`` names each problem."""
    data = _decode(payload)
    p = _Parser()
    top = p.mapping(data, "", _TOP_KEYS, {"sourceChainId", "destination", "route", "reward"})
    source_chain = p.uint(top.get("sourceChainId"), "sourceChainId", MAX_CHAIN_ID, minimum=1)
    destination = p.uint(top.get("destination"), "destination", MAX_CHAIN_ID, minimum=1)
    route = p.route(top.get("route")) if "route" in top else {}
    reward = p.reward(top.get("reward")) if "reward" in top else {}
    texts = {key: p.text(top.get(key), key, size) for key, size in _TEXT_FIELDS.items()}
    priority = None
    if top.get("priority") is not None:
        priority = p.uint(top["priority"], "priority", 10, minimum=1)
    given_hash = p.bytes32(top["intentHash"], "intentHash") if "intentHash" in top else None
    if p.errors:
        raise InvalidPayloadError(p.errors)
    computed = intent_hash(destination, route, reward)
    if given_hash is not None and given_hash != computed:
        raise InvalidPayloadError(
            {"intentHash": f"does not match the route and reward (computed {computed})"}
        )
    return IntentPayload(
        hash=computed,
        source_chain_id=source_chain,
        destination_chain_id=destination,
        route=route,
        reward=reward,
        strategy=texts["strategy"] or None,
        priority=priority,
        correlation_id=texts["correlationId"],
        source=texts["source"],
    )
