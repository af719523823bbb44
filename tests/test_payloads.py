"""Intent payloads: the hash, and a clear error naming the field for each bad input."""

from __future__ import annotations

import copy
import json

import pytest

from intentqueue.exceptions import InvalidPayloadError
from intentqueue.models import Intent
from intentqueue.payloads import MAX_PAYLOAD_BYTES, parse_intent_payload
from intentqueue.services import submit_intent
from tests.factories import make_payload

pytestmark = pytest.mark.django_db


def errors_of(payload: object) -> dict[str, str]:
    with pytest.raises(InvalidPayloadError) as caught:
        submit_intent(payload)
    assert Intent.objects.count() == 0
    return caught.value.errors


def test_submit_creates_intent_with_computed_hash() -> None:
    payload = make_payload()
    parsed = parse_intent_payload(payload)
    intent = submit_intent({**payload, "intentHash": parsed.hash})
    assert intent.hash == parsed.hash and len(intent.hash) == 66
    assert intent.status == "PENDING"
    assert intent.route_tokens == [{"token": payload["route"]["tokens"][0]["token"],
                                    "amount": "1000000"}]  # fmt: skip
    assert intent.correlation_id == "corr-1" and intent.source == "tests"


def test_submit_twice_returns_existing() -> None:
    payload = make_payload()
    first = submit_intent(payload)
    second = submit_intent(json.dumps(payload))
    assert first.pk == second.pk
    assert Intent.objects.count() == 1


def test_hash_changes_with_every_part() -> None:
    payload = make_payload()
    base = parse_intent_payload(payload).hash
    for mutate in (
        lambda p: p.__setitem__("destination", 11),
        lambda p: p["route"].__setitem__("deadline", p["route"]["deadline"] + 1),
        lambda p: p["reward"]["tokens"][0].__setitem__("amount", "1100001"),
        lambda p: p["route"]["calls"][0].__setitem__("data", "0x"),
    ):
        changed = copy.deepcopy(payload)
        mutate(changed)
        assert parse_intent_payload(changed).hash != base


def test_wrong_hash_rejected() -> None:
    errors = errors_of({**make_payload(), "intentHash": "0x" + "ab" * 32})
    assert "does not match" in errors["intentHash"]


def test_21_byte_address_rejected() -> None:
    payload = make_payload()
    payload["reward"]["creator"] = "0x" + "33" * 21
    errors = errors_of(payload)
    assert "20-byte hex address" in errors["reward.creator"]


def test_bad_checksum_rejected() -> None:
    payload = make_payload()
    payload["route"]["portal"] = "0xAbCdEf0000000000000000000000000000000000"
    assert "checksum" in errors_of(payload)["route.portal"]


@pytest.mark.parametrize(
    ("amount", "message"),
    [(-1, "at least 0"), (2**256, "at most"), (str(2**256), "at most"), (1.5, "not float"),
     ("12abc", "decimal string"), (True, "integer")],
)  # fmt: skip
def test_bad_amounts_rejected(amount: object, message: str) -> None:
    payload = make_payload()
    payload["route"]["tokens"][0]["amount"] = amount
    error = errors_of(payload)["route.tokens[0].amount"]
    assert message.replace("not float", "float") in error


def test_max_uint256_accepted() -> None:
    payload = make_payload()
    payload["reward"]["tokens"][0]["amount"] = str(2**256 - 1)
    intent = submit_intent(payload)
    intent.refresh_from_db()
    assert intent.reward_tokens[0]["amount"] == str(2**256 - 1)


def test_missing_fields_named() -> None:
    payload = make_payload()
    del payload["route"]["salt"]
    del payload["sourceChainId"]
    errors = errors_of(payload)
    assert errors["route.salt"] == "required"
    assert errors["sourceChainId"] == "required"


def test_unknown_field_named() -> None:
    assert errors_of({**make_payload(), "evil": 1})["evil"] == "unknown field"


def test_ten_megabyte_blob_rejected_before_parsing() -> None:
    blob = json.dumps({**make_payload(), "source": "x" * 10_000_000})
    errors = errors_of(blob)
    assert f"larger than {MAX_PAYLOAD_BYTES} bytes" in errors["payload"]
    payload = make_payload()
    payload["route"]["calls"][0]["data"] = "0x" + "00" * 5_000_000
    assert "larger than" in errors_of(payload)["payload"]


@pytest.mark.parametrize(
    "payload",
    ["not json", "[]", "null", json.dumps({"route": "x", "reward": [],
                                           "sourceChainId": 0, "destination": -5})],
)  # fmt: skip
def test_garbage_rejected(payload: str) -> None:
    assert errors_of(payload)


def test_chain_ids_and_deadlines_checked() -> None:
    payload = make_payload(sourceChainId=0, destination=2**64)
    payload["route"]["deadline"] = 2**63
    errors = errors_of(payload)
    assert "at least 1" in errors["sourceChainId"]
    assert "at most" in errors["destination"]
    assert "at most" in errors["route.deadline"]


def test_too_many_tokens_rejected() -> None:
    payload = make_payload()
    payload["reward"]["tokens"] = [{"token": "0x" + "22" * 20, "amount": 1}] * 21
    assert "at most 20" in errors_of(payload)["reward.tokens"]


def test_all_errors_reported_together() -> None:
    payload = make_payload(destination="ten")
    payload["route"]["salt"] = "0x12"
    errors = errors_of(payload)
    assert set(errors) == {"destination", "route.salt"}
