"""The direct ABI encodings of route and reward equal eth_abi's, for any content."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from intentqueue.hashing import encode_reward, encode_route, encode_with_eth_abi

addresses = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())
uint256 = st.integers(min_value=0, max_value=2**256 - 1)
uint64 = st.integers(min_value=0, max_value=2**64 - 1)
tokens = st.lists(st.fixed_dictionaries({"token": addresses, "amount": uint256}), max_size=4)
calls = st.lists(
    st.fixed_dictionaries(
        {
            "target": addresses,
            "data": st.binary(max_size=100).map(lambda b: "0x" + b.hex()),
            "value": uint256,
        }
    ),
    max_size=4,
)
routes = st.fixed_dictionaries(
    {
        "salt": st.binary(min_size=32, max_size=32).map(lambda b: "0x" + b.hex()),
        "deadline": uint64, "portal": addresses, "native_amount": uint256,
        "tokens": tokens, "calls": calls,
    }
)  # fmt: skip
rewards = st.fixed_dictionaries(
    {
        "deadline": uint64, "creator": addresses, "prover": addresses,
        "native_amount": uint256, "tokens": tokens,
    }
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(route=routes, reward=rewards)
def test_direct_encoding_equals_eth_abi(route: dict[str, Any], reward: dict[str, Any]) -> None:
    reference_route, reference_reward = encode_with_eth_abi(route, reward)
    assert encode_route(route) == reference_route
    assert encode_reward(reward) == reference_reward
