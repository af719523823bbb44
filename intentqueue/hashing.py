"""The intent hash, computed exactly as the Portal contract computes it.

``routeHash = keccak256(abi.encode(route))``, ``rewardHash = keccak256(abi.encode(reward))``
and ``intentHash = keccak256(abi.encodePacked(uint64 destination, routeHash, rewardHash))``.
Addresses are checksummed or lower-case hex strings, amounts are Python ints, byte fields
are ``0x`` hex strings.
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


def route_hash(route: Mapping[str, Any]) -> bytes:
    """keccak256 of the ABI-encoded route."""
    return keccak(encode([ROUTE_ABI], [route_tuple(route)]))


def reward_hash(reward: Mapping[str, Any]) -> bytes:
    """keccak256 of the ABI-encoded reward."""
    return keccak(encode([REWARD_ABI], [reward_tuple(reward)]))


def intent_hash(destination: int, route: Mapping[str, Any], reward: Mapping[str, Any]) -> str:
    """The intent hash as a lower-case ``0x`` hex string."""
    packed = destination.to_bytes(8, "big") + route_hash(route) + reward_hash(reward)
    return "0x" + keccak(packed).hex()
