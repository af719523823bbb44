"""The intent hash, computed exactly as the Portal contract computes it.

``routeHash = keccak256(abi.encode(route))``, ``rewardHash = keccak256(abi.encode(reward))``
and ``intentHash = keccak256(abi.encodePacked(uint64 destination, routeHash, rewardHash))``.
Addresses are checksummed or lower-case hex strings, amounts are Python ints, byte fields
are ``0x`` hex strings.

The two structs have fixed shapes, so they are ABI-encoded here directly: eth_abi's
generic encoder cost about 0.3 ms an intent, most of the ingest budget. The tests check
these encodings against eth_abi (``ROUTE_ABI``/``REWARD_ABI``) and the compiled contract.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from eth_abi import encode
from eth_utils import keccak, to_bytes

ROUTE_ABI = "(bytes32,uint64,address,uint256,(address,uint256)[],(address,bytes,uint256)[])"
REWARD_ABI = "(uint64,address,address,uint256,(address,uint256)[])"


def _token_tuples(tokens: Sequence[Mapping[str, Any]]) -> list[tuple[str, int]]:
    return [(t["token"], int(t["amount"])) for t in tokens]


def route_tuple(route: Mapping[str, Any]) -> tuple[Any, ...]:
    """The route as the ABI tuple ``ROUTE_ABI`` describes."""
    return (
        to_bytes(hexstr=route["salt"]),
        int(route["deadline"]),
        route["portal"],
        int(route["native_amount"]),
        _token_tuples(route["tokens"]),
        [(c["target"], to_bytes(hexstr=c["data"]), int(c["value"])) for c in route["calls"]],
    )


def reward_tuple(reward: Mapping[str, Any]) -> tuple[Any, ...]:
    """The reward as the ABI tuple ``REWARD_ABI`` describes."""
    return (
        int(reward["deadline"]),
        reward["creator"],
        reward["prover"],
        int(reward["native_amount"]),
        _token_tuples(reward["tokens"]),
    )


def _word(value: int) -> bytes:
    return value.to_bytes(32, "big")


def _address(value: str) -> bytes:
    return bytes(12) + bytes.fromhex(value[2:])


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 32)


def _token_array(tokens: Sequence[Mapping[str, Any]]) -> bytes:
    parts = [_word(len(tokens))]
    for t in tokens:
        parts += [_address(t["token"]), _word(int(t["amount"]))]
    return b"".join(parts)


def _call_array(calls: Sequence[Mapping[str, Any]]) -> bytes:
    encoded = []
    for c in calls:
        data = bytes.fromhex(c["data"][2:])
        head = _address(c["target"]) + _word(96) + _word(int(c["value"]))
        encoded.append(head + _word(len(data)) + _padded(data))
    offsets, position = [], 32 * len(calls)
    for element in encoded:
        offsets.append(_word(position))
        position += len(element)
    return _word(len(calls)) + b"".join(offsets) + b"".join(encoded)


def encode_route(route: Mapping[str, Any]) -> bytes:
    """``abi.encode(route)``: the ``ROUTE_ABI`` tuple as a single dynamic argument."""
    tokens = _token_array(route["tokens"])
    head = (
        bytes.fromhex(route["salt"][2:]) + _word(int(route["deadline"]))
        + _address(route["portal"]) + _word(int(route["native_amount"]))
        + _word(6 * 32) + _word(6 * 32 + len(tokens))
    )  # fmt: skip
    return _word(32) + head + tokens + _call_array(route["calls"])


def encode_reward(reward: Mapping[str, Any]) -> bytes:
    """``abi.encode(reward)``: the ``REWARD_ABI`` tuple as a single dynamic argument."""
    head = (
        _word(int(reward["deadline"])) + _address(reward["creator"])
        + _address(reward["prover"]) + _word(int(reward["native_amount"])) + _word(5 * 32)
    )  # fmt: skip
    return _word(32) + head + _token_array(reward["tokens"])


def route_hash(route: Mapping[str, Any]) -> bytes:
    """keccak256 of the ABI-encoded route."""
    return keccak(encode_route(route))


def reward_hash(reward: Mapping[str, Any]) -> bytes:
    """keccak256 of the ABI-encoded reward."""
    return keccak(encode_reward(reward))


def encode_with_eth_abi(route: Mapping[str, Any], reward: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """The same encodings through eth_abi's generic encoder (the reference for tests)."""
    return encode([ROUTE_ABI], [route_tuple(route)]), encode([REWARD_ABI], [reward_tuple(reward)])


def intent_hash(destination: int, route: Mapping[str, Any], reward: Mapping[str, Any]) -> str:
    """The intent hash as a lower-case ``0x`` hex string."""
    packed = destination.to_bytes(8, "big") + route_hash(route) + reward_hash(reward)
    return "0x" + keccak(packed).hex()
