"""factory-boy factories and payload builders for intents."""

from __future__ import annotations

import os
import time
from typing import Any

import factory

from intentqueue.hashing import intent_hash
from intentqueue.models import Intent

PORTAL = "0x" + "11" * 20
TOKEN = "0x" + "22" * 20
CREATOR = "0x" + "33" * 20
PROVER = "0x" + "44" * 20
RECIPIENT = "0x" + "55" * 20


def transfer_data(recipient: str, amount: int) -> str:
    """Calldata of ERC-20 ``transfer(recipient, amount)``."""
    return "0xa9059cbb" + recipient[2:].lower().rjust(64, "0") + f"{amount:064x}"


def make_payload(**overrides: Any) -> dict[str, Any]:
    """A valid payload in the original JSON shape; a fresh salt each call."""
    deadline = int(time.time()) + 3600
    payload: dict[str, Any] = {
        "sourceChainId": 1,
        "destination": 10,
        "route": {
            "salt": "0x" + os.urandom(32).hex(),
            "deadline": deadline,
            "portal": PORTAL,
            "nativeAmount": "0",
            "tokens": [{"token": TOKEN, "amount": "1000000"}],
            "calls": [{"target": TOKEN, "data": transfer_data(RECIPIENT, 1000000), "value": 0}],
        },
        "reward": {
            "deadline": deadline + 3600,
            "creator": CREATOR,
            "prover": PROVER,
            "nativeAmount": "0",
            "tokens": [{"token": TOKEN, "amount": "1100000"}],
        },
        "correlationId": "corr-1",
        "source": "tests",
    }
    for key, value in overrides.items():
        payload[key] = value
    return payload


class IntentFactory(factory.django.DjangoModelFactory):
    """An intent with a consistent hash over its route and reward."""

    class Meta:
        model = Intent

    source_chain_id = 1
    destination_chain_id = 10
    route_salt = factory.LazyFunction(lambda: "0x" + os.urandom(32).hex())
    route_deadline = factory.LazyFunction(lambda: int(time.time()) + 3600)
    route_portal = PORTAL
    route_native_amount = 0
    route_tokens = factory.LazyFunction(lambda: [{"token": TOKEN, "amount": "1000000"}])
    route_calls = factory.LazyFunction(
        lambda: [{"target": TOKEN, "data": transfer_data(RECIPIENT, 1000000), "value": "0"}]
    )
    reward_deadline = factory.LazyAttribute(lambda o: o.route_deadline + 3600)
    reward_creator = CREATOR
    reward_prover = PROVER
    reward_native_amount = 0
    reward_tokens = factory.LazyFunction(lambda: [{"token": TOKEN, "amount": "1100000"}])
    correlation_id = factory.Sequence(lambda n: f"corr-{n}")
    source = "tests"

    @factory.lazy_attribute
    def hash(self) -> str:
        route = {
            "salt": self.route_salt, "deadline": self.route_deadline, "portal": self.route_portal,
            "native_amount": self.route_native_amount, "tokens": self.route_tokens,
            "calls": self.route_calls,
        }  # fmt: skip
        reward = {
            "deadline": self.reward_deadline, "creator": self.reward_creator,
            "prover": self.reward_prover, "native_amount": self.reward_native_amount,
            "tokens": self.reward_tokens,
        }  # fmt: skip
        return intent_hash(self.destination_chain_id, route, reward)
