"""Demo intents on the dev chains: publish and fund them on the source chain, then submit
them, so a new user watches them go through both queues (``standalone --demo N``).

Each intent asks the solver to deliver test tokens to a recipient on the destination
chain, for a reward 10% larger in test tokens escrowed on the source chain by the dev
chains' funder account (a public test key).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

from eth_account import Account
from eth_utils import to_bytes, to_checksum_address
from hexbytes import HexBytes
from web3 import Web3
from web3.types import Nonce, TxParams

from intentqueue.chain.devchain import DevChainState, contract_artifact
from intentqueue.hashing import reward_tuple, route_tuple
from intentqueue.models import Intent
from intentqueue.services import submit_intents

#: Where the demo's tokens go on the destination chain.
RECIPIENT = "0x000000000000000000000000000000000000dEaD"
#: The prover the demo intents name (the dev chains accept any).
PROVER = "0x0000000000000000000000000000000000000001"
TOKEN_UNIT = 10**18


class Writer(Protocol):
    """A stream to report progress on."""

    def write(self, text: str, /) -> Any: ...


def _transfer_data(recipient: str, amount: int) -> str:
    return "0xa9059cbb" + recipient[2:].lower().rjust(64, "0") + f"{amount:064x}"


def demo_payloads(state: DevChainState, count: int, now: int) -> list[dict[str, Any]]:
    """``count`` intents in the shape ``submit_intent`` takes (amounts vary a little)."""
    source, destination = state.source, state.destinations[0]
    payloads = []
    for index in range(count):
        amount = (1 + index % 5) * TOKEN_UNIT
        payloads.append(
            {
                "sourceChainId": source.chain_id,
                "destination": destination.chain_id,
                "route": {
                    "salt": "0x" + os.urandom(32).hex(),
                    "deadline": now + 2 * 3600,
                    "portal": destination.portal,
                    "nativeAmount": "0",
                    "tokens": [{"token": destination.token, "amount": str(amount)}],
                    "calls": [
                        {
                            "target": destination.token,
                            "data": _transfer_data(RECIPIENT, amount),
                            "value": "0",
                        }
                    ],
                },
                "reward": {
                    "deadline": now + 3 * 3600,
                    "creator": state.funder.address,
                    "prover": PROVER,
                    "nativeAmount": "0",
                    "tokens": [{"token": source.token, "amount": str(amount + amount // 10)}],
                },
                "correlationId": f"demo-{index + 1}",
                "source": "demo",
                "priority": 1 if index % 4 == 0 else 10,
            }
        )
    return payloads


def _as_hashing(part: dict[str, Any], *, route: bool) -> dict[str, Any]:
    shaped = {
        "deadline": part["deadline"],
        "native_amount": int(part["nativeAmount"]),
        "tokens": part["tokens"],
    }
    if route:
        shaped.update(salt=part["salt"], portal=part["portal"], calls=part["calls"])
    else:
        shaped.update(creator=part["creator"], prover=part["prover"])
    return shaped


def publish_on_source(state: DevChainState, payloads: list[dict[str, Any]]) -> None:
    """Mint the rewards to the funder, approve the portal and ``publishAndFund`` each intent
    on the source chain; waits for the last transaction."""
    source = state.source
    w3 = Web3(Web3.HTTPProvider(source.rpc_url, request_kwargs={"timeout": 30}))
    funder = Account.from_key(state.funder.private_key)
    token = w3.eth.contract(
        address=to_checksum_address(source.token), abi=contract_artifact("TestToken")["abi"]
    )
    portal = w3.eth.contract(
        address=to_checksum_address(source.portal), abi=contract_artifact("Portal")["abi"]
    )
    total = sum(int(t["amount"]) for p in payloads for t in p["reward"]["tokens"])
    nonce = w3.eth.get_transaction_count(funder.address, "pending")
    calls = [
        token.functions.mint(funder.address, total),
        token.functions.approve(source.portal, total),
        *(
            portal.functions.publishAndFund(
                p["destination"],
                route_tuple(_as_hashing(p["route"], route=True)),
                reward_tuple(_as_hashing(p["reward"], route=False)),
            )
            for p in payloads
        ),
    ]
    last = HexBytes(b"")
    for offset, call in enumerate(calls):
        params: TxParams = {
            "from": funder.address, "nonce": Nonce(nonce + offset),
            "chainId": source.chain_id, "gas": 1_500_000,
        }  # fmt: skip
        transaction = call.build_transaction(params)
        signed = funder.sign_transaction(transaction)
        last = w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(last, timeout=120)
    if receipt["status"] != 1:
        raise RuntimeError("publishing the demo intents reverted on the source chain")


def publish_demo_intents(state_file: Path, count: int, *, out: Writer) -> list[Intent]:
    """Publish and fund ``count`` intents on the dev source chain, then submit them."""
    state = DevChainState.read(state_file)
    w3 = Web3(Web3.HTTPProvider(state.source.rpc_url))
    now = max(int(time.time()), int(w3.eth.get_block("latest")["timestamp"]))
    payloads = demo_payloads(state, count, now)
    publish_on_source(state, payloads)
    intents = submit_intents(payloads)
    portal = w3.eth.contract(
        address=to_checksum_address(state.source.portal), abi=contract_artifact("Portal")["abi"]
    )
    funded = sum(
        1 for i in intents if portal.functions.isIntentFunded(to_bytes(hexstr=i.hash)).call()
    )
    out.write(f"… {len(intents)} demo intents submitted ({funded} funded on the source chain)\n")
    return intents
