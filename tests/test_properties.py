"""Property-based tests of intent payloads.

Valid payloads are generated as numbers and bytes and written in every accepted form
(checksummed, lower- and upper-case addresses; amounts as ints, decimal and hex strings;
upper- and lower-case hex), so the hash must not depend on the form and a round trip
through ``submit_intent`` must store every uint256 exactly. Corrupted payloads (a field
dropped, renamed or given a bad value; garbage text, bytes, sizes and nesting) must all
raise ``InvalidPayloadError`` naming the field, create nothing, and raise nothing else.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from django.db import transaction
from eth_utils import to_checksum_address
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from intentqueue.exceptions import InvalidPayloadError
from intentqueue.models import Intent
from intentqueue.payloads import (
    MAX_CALL_DATA_BYTES,
    MAX_CHAIN_ID,
    MAX_DEADLINE,
    MAX_ITEMS,
    MAX_PAYLOAD_BYTES,
    UINT256_MAX,
    parse_intent_payload,
)
from intentqueue.services import submit_intent
from tests.factories import transfer_data

pytestmark = pytest.mark.django_db

PROPERTIES = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
HASH = re.compile(r"^0x[0-9a-f]{64}$")
#: A field path as the parser writes it: ``route.tokens[1].amount``.
PATH = re.compile(r"^[A-Za-z_]\w*(\[\d+\])?(\.\w+(\[\d+\])?)*$")

# --- valid payloads: values, and the ways a client may write them ---------------------

uint256s = st.one_of(
    st.integers(0, UINT256_MAX),
    st.sampled_from([0, 1, 2**64, 2**128, UINT256_MAX - 1, UINT256_MAX]),
)
chain_ids = st.one_of(st.integers(1, MAX_CHAIN_ID), st.sampled_from([1, 10, MAX_CHAIN_ID]))
deadlines = st.one_of(st.integers(1, MAX_DEADLINE), st.sampled_from([1, MAX_DEADLINE]))
addresses = st.binary(min_size=20, max_size=20)
words = st.binary(min_size=32, max_size=32)


def write_address(raw: bytes, form: str) -> str:
    text = "0x" + raw.hex()
    if form == "checksum":
        return str(to_checksum_address(text))
    return text if form == "lower" else "0x" + raw.hex().upper()


def write_uint(value: int, form: str) -> int | str:
    if form == "int":
        return value
    if form == "decimal":
        return str(value)
    return f"0x{value:x}" if form == "hex" else f"0x{value:X}"


def write_hex(raw: bytes, form: str) -> str:
    return "0x" + (raw.hex() if form == "lower" else raw.hex().upper())


@dataclass(frozen=True)
class Writer:
    """Writes each value of a payload in a form drawn for it (or the canonical form)."""

    draw: Any = None

    def _form(self, forms: list[str]) -> str:
        return forms[0] if self.draw is None else self.draw(st.sampled_from(forms))

    def address(self, raw: bytes) -> str:
        return write_address(raw, self._form(["checksum", "lower", "upper"]))

    def uint(self, value: int) -> int | str:
        return write_uint(value, self._form(["int", "decimal", "hex", "HEX"]))

    def hex(self, raw: bytes) -> str:
        return write_hex(raw, self._form(["lower", "upper"]))


@dataclass(frozen=True)
class Values:
    """The numbers and bytes of one intent; ``write`` renders them as a JSON payload."""

    source: int
    destination: int
    salt: bytes
    route_deadline: int
    portal: bytes
    route_native: int
    route_tokens: list[tuple[bytes, int]]
    calls: list[tuple[bytes, bytes, int]]
    reward_deadline: int
    creator: bytes
    prover: bytes
    reward_native: int
    reward_tokens: list[tuple[bytes, int]]
    extra: dict[str, Any]

    def write(self, w: Writer) -> dict[str, Any]:
        def tokens(items: list[tuple[bytes, int]]) -> list[dict[str, Any]]:
            return [{"token": w.address(t), "amount": w.uint(a)} for t, a in items]

        return {
            "sourceChainId": w.uint(self.source),
            "destination": w.uint(self.destination),
            "route": {
                "salt": w.hex(self.salt),
                "deadline": w.uint(self.route_deadline),
                "portal": w.address(self.portal),
                "nativeAmount": w.uint(self.route_native),
                "tokens": tokens(self.route_tokens),
                "calls": [
                    {"target": w.address(t), "data": w.hex(d), "value": w.uint(v)}
                    for t, d, v in self.calls
                ],
            },
            "reward": {
                "deadline": w.uint(self.reward_deadline),
                "creator": w.address(self.creator),
                "prover": w.address(self.prover),
                "nativeAmount": w.uint(self.reward_native),
                "tokens": tokens(self.reward_tokens),
            },
            **self.extra,
        }


call_data = st.one_of(
    st.builds(
        lambda to, amount: bytes.fromhex(transfer_data("0x" + to.hex(), amount)[2:]),
        addresses, uint256s,
    ),
    st.binary(max_size=200),
)  # fmt: skip
token_lists = st.lists(st.tuples(addresses, uint256s), max_size=3)
#: Any text a database stores: no NUL, no lone surrogates.
storable = st.characters(exclude_characters="\x00", exclude_categories=["Cs"])
text_fields = st.fixed_dictionaries(
    {},
    optional={
        "strategy": st.text(storable, min_size=1, max_size=64),
        "correlationId": st.text(storable, max_size=128),
        "source": st.text(storable, max_size=64),
        "priority": st.integers(1, 10),
    },
)
values = st.builds(
    Values,
    source=chain_ids, destination=chain_ids, salt=words, route_deadline=deadlines,
    portal=addresses, route_native=uint256s, route_tokens=token_lists,
    calls=st.lists(st.tuples(addresses, call_data, uint256s), max_size=3),
    reward_deadline=deadlines, creator=addresses, prover=addresses, reward_native=uint256s,
    reward_tokens=token_lists, extra=text_fields,
)  # fmt: skip


@st.composite
def written(draw: Any) -> tuple[Values, dict[str, Any]]:
    """Intent values and a payload writing them in randomly drawn forms."""
    intent = draw(values)
    return intent, intent.write(Writer(draw))


@contextmanager
def rolled_back() -> Iterator[None]:
    """Run one example in a transaction that is rolled back (examples share the test)."""
    with transaction.atomic():
        try:
            yield
        finally:
            transaction.set_rollback(True)


# --- valid payloads -----------------------------------------------------------------------


@PROPERTIES
@given(written())
def test_valid_payloads_parse_with_a_hash_independent_of_how_they_are_written(
    case: tuple[Values, dict[str, Any]],
) -> None:
    intent, payload = case
    parsed = parse_intent_payload(payload)
    assert HASH.match(parsed.hash)
    canonical = parse_intent_payload(intent.write(Writer()))
    assert parsed.hash == canonical.hash
    assert parse_intent_payload(payload).hash == parsed.hash  # stable
    text = json.dumps(payload)
    assert parse_intent_payload(text).hash == parsed.hash
    assert parse_intent_payload(text.encode()).hash == parsed.hash
    # The client may send the hash, in either case; it must be the computed one.
    assert parse_intent_payload({**payload, "intentHash": parsed.hash.upper().replace("0X", "0x")})
    other = "0x" + ("0" if parsed.hash[2] != "0" else "1") + parsed.hash[3:]
    with pytest.raises(InvalidPayloadError) as caught:
        parse_intent_payload({**payload, "intentHash": other})
    assert "does not match" in caught.value.errors["intentHash"]


@PROPERTIES
@given(written())
def test_submit_intent_stores_exact_amounts(case: tuple[Values, dict[str, Any]]) -> None:
    intent, payload = case
    with rolled_back():
        stored = submit_intent(payload)
        stored.refresh_from_db()
        assert stored.hash == parse_intent_payload(payload).hash
        assert (stored.source_chain_id, stored.destination_chain_id) == (
            intent.source, intent.destination,
        )  # fmt: skip
        assert (stored.route_deadline, stored.reward_deadline) == (
            intent.route_deadline, intent.reward_deadline,
        )  # fmt: skip
        # The exact integer, never a float's approximation, on every database.
        for kept, sent in (
            (stored.route_native_amount, intent.route_native),
            (stored.reward_native_amount, intent.reward_native),
        ):
            assert kept == sent and isinstance(kept, int)

        def tokens(items: list[tuple[bytes, int]]) -> list[dict[str, str]]:
            return [{"token": write_address(t, "checksum"), "amount": str(a)} for t, a in items]

        assert stored.route_tokens == tokens(intent.route_tokens)
        assert stored.reward_tokens == tokens(intent.reward_tokens)
        assert [c["value"] for c in stored.route_calls] == [str(v) for *_, v in intent.calls]
        assert [c["data"] for c in stored.route_calls] == [
            "0x" + d.hex() for _, d, _ in intent.calls
        ]
        assert stored.route_salt == "0x" + intent.salt.hex()
        # The stored intent hashes to what it was accepted as, and a resubmission
        # (written differently) finds it instead of creating another.
        again = submit_intent(intent.write(Writer()))
        assert again.pk == stored.pk
        assert Intent.objects.count() == 1


@pytest.mark.parametrize("amount", [2**63, 2**128 + 1, UINT256_MAX])
def test_uint256_max_round_trips_exactly(amount: int) -> None:
    payload = Values(
        1, 10, b"\x01" * 32, 100, b"\x11" * 20, amount, [], [], 200, b"\x33" * 20,
        b"\x44" * 20, amount, [], {},
    ).write(Writer())  # fmt: skip
    stored = submit_intent(payload)
    stored.refresh_from_db()
    assert str(stored.route_native_amount) == str(stored.reward_native_amount) == str(amount)


# --- corrupted payloads -------------------------------------------------------------------

#: Values of the wrong type or out of range, by the kind of field they are put in.
NOT_A_NUMBER: list[Any] = [
    None, True, False, 1.5, 0.0, float("inf"), [], {}, "", " ", "abc", "1.5", "1e3", "-1",
    "0x", "0xg1", "\u0661\u0662", "\u00b2", "0" * 81 + "1", [1], {"n": 1},
]  # fmt: skip
BAD_VALUES: dict[str, list[Any]] = {
    "uint256": [*NOT_A_NUMBER, -1, UINT256_MAX + 1, str(UINT256_MAX + 1), hex(UINT256_MAX + 1)],
    "chain": [*NOT_A_NUMBER, 0, -1, MAX_CHAIN_ID + 1, str(MAX_CHAIN_ID + 1), 2**256],
    "deadline": [*NOT_A_NUMBER, 0, -5, MAX_DEADLINE + 1, 2**64],
    "address": [
        None, 7, True, [], {}, "", "0x", "0x" + "11" * 19, "0x" + "11" * 21, "11" * 20,
        "0x" + "zz" * 20, "0x" + "11" * 19 + "1", " 0x" + "11" * 20,
        "0xAbCdEf0000000000000000000000000000000000",  # bad EIP-55 checksum
    ],
    "bytes32": [None, 1, [], "0x", "0x" + "ab" * 31, "0x" + "ab" * 33, "ab" * 32, "0x" + "g" * 64],
    "hexdata": [
        None, 5, [], "abcd", "0x1", "0xzz", "0x" + "00" * (MAX_CALL_DATA_BYTES + 1),
    ],
    "list": [None, 1, "tokens", {}, {"0": {}}, [{}] * (MAX_ITEMS + 1)],
    "object": [None, 1, "x", [], [1, 2], True],
    "text": [1, 2.5, True, [], {}, "x" * 129],
    "priority": [0, 11, -1, True, 1.5, "high", [], {}],
}  # fmt: skip
ITEM_KINDS = {
    "tokens": {"token": "address", "amount": "uint256"},
    "calls": {"target": "address", "data": "hexdata", "value": "uint256"},
}
TOP_KINDS = {
    "sourceChainId": "chain", "destination": "chain", "route": "object", "reward": "object",
    "strategy": "text", "correlationId": "text", "source": "text", "priority": "priority",
    "intentHash": "bytes32",
}  # fmt: skip
NESTED_KINDS = {
    "route": {"salt": "bytes32", "deadline": "deadline", "portal": "address",
              "nativeAmount": "uint256", "tokens": "list", "calls": "list"},
    "reward": {"deadline": "deadline", "creator": "address", "prover": "address",
               "nativeAmount": "uint256", "tokens": "list"},
}  # fmt: skip
OPTIONAL = {"strategy", "correlationId", "source", "priority", "intentHash"}


@dataclass(frozen=True)
class Field:
    """One field of a payload: where it is, its printed path, its kind."""

    keys: tuple[str | int, ...]
    path: str
    kind: str
    required: bool


def fields_of(payload: dict[str, Any]) -> list[Field]:
    """Every field of a (valid) payload, at every level."""
    found = []
    for key, value in payload.items():
        found.append(Field((key,), key, TOP_KINDS[key], key not in OPTIONAL))
        for sub, kind in NESTED_KINDS.get(key, {}).items():
            found.append(Field((key, sub), f"{key}.{sub}", kind, True))
            if kind != "list":
                continue
            for index, item in enumerate(value[sub]):
                where = f"{key}.{sub}[{index}]"
                found.append(Field((key, sub, index), where, "object", True))
                for name, item_kind in ITEM_KINDS[sub].items():
                    assert name in item
                    found.append(Field((key, sub, index, name), f"{where}.{name}", item_kind, True))
    return found


def parent_of(payload: Any, keys: tuple[str | int, ...]) -> Any:
    for key in keys[:-1]:
        payload = payload[key]
    return payload


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@dataclass(frozen=True)
class Corruption:
    """A corrupted payload and the error it must cause."""

    payload: Any
    path: str  # the field that was broken
    action: str  # drop, rename, retype or nest
    required: bool
    renamed_to: str = ""


@st.composite
def corrupted(draw: Any) -> Corruption:
    _, payload = draw(written())
    if draw(st.booleans()):  # a client that sends the (correct) hash too
        payload["intentHash"] = parse_intent_payload(payload).hash
    field = draw(st.sampled_from(fields_of(payload)))
    broken = copy.deepcopy(payload)
    parent, key = parent_of(broken, field.keys), field.keys[-1]
    action = draw(st.sampled_from(["drop", "rename", "retype", "retype", "retype", "nest"]))
    # Dropping or renaming a list item leaves a shorter, still valid list.
    assume(action not in ("drop", "rename") or isinstance(key, str))
    depth = draw(st.one_of(st.integers(2, 50), st.integers(900, 3000)))
    renamed_to = ""
    if action == "drop":
        assume(field.required)
        del parent[key]
    elif action == "rename":
        new_key = f"{key}{draw(st.sampled_from(['_', 'X', 's', '2']))}"
        parent[new_key] = parent.pop(key)
        renamed_to = field.path[: -len(str(key))] + new_key
    elif action == "retype":
        parent[key] = draw(st.sampled_from(BAD_VALUES[field.kind]))
    else:
        parent[key] = "__nested__"
    form = draw(st.sampled_from(["dict", "text", "bytes"]))
    if form == "dict":
        if action == "nest":
            parent[key] = nested(depth)
        return Corruption(broken, field.path, action, field.required, renamed_to)
    # As text, nesting deeper than Python's json module can write or read.
    text = json.dumps(broken).replace('"__nested__"', "[" * depth + "1" + "]" * depth)
    sent = text if form == "text" else text.encode()
    return Corruption(sent, field.path, action, field.required, renamed_to)


def rejected(payload: Any) -> dict[str, str]:
    """The errors ``submit_intent`` raises for ``payload``; checks nothing was created."""
    before = Intent.objects.count()
    with rolled_back():
        with pytest.raises(InvalidPayloadError) as caught:
            submit_intent(payload)
        assert Intent.objects.count() == before
    errors = caught.value.errors
    assert errors and isinstance(errors, dict)
    for path, message in errors.items():
        assert isinstance(path, str), path
        assert isinstance(message, str) and message.strip(), (path, message)
    assert str(caught.value).startswith("invalid intent payload: ")
    return errors


def names(errors: dict[str, str], path: str) -> bool:
    """Whether an error is about ``path`` (or something inside it, or the whole payload)."""
    return any(
        key in (path, "payload") or key.startswith((f"{path}.", f"{path}[")) for key in errors
    )


@PROPERTIES
@given(corrupted())
def test_corrupted_payloads_are_rejected_naming_the_field(case: Corruption) -> None:
    errors = rejected(case.payload)
    assert all(key == "payload" or PATH.match(key) for key in errors), errors
    if case.action == "nest":
        assert names(errors, case.path), (case.path, errors)
    elif case.action == "drop":
        assert errors.get(case.path) == "required", (case.path, errors)
    elif case.action == "rename":
        assert errors.get(case.renamed_to) == "unknown field", (case.renamed_to, errors)
        if case.required:
            assert errors.get(case.path) == "required", (case.path, errors)
    else:
        assert case.path in errors, (case.path, errors)


@settings(PROPERTIES, max_examples=15)
@given(
    written(),
    st.sampled_from(["text", "list", "keys"]),
    st.sampled_from([MAX_PAYLOAD_BYTES + 1, 1_000_000, 5_000_000]),
)
def test_huge_payloads_are_rejected_before_parsing(
    case: tuple[Values, dict[str, Any]], how: str, size: int
) -> None:
    _, payload = case
    if how == "text":
        payload["source"] = "x" * size
    elif how == "list":
        payload["route"]["tokens"] = [{"token": "0x" + "22" * 20, "amount": 1}] * (size // 40)
    else:
        payload["reward"].update({f"k{n}": n for n in range(size // 10)})
    for form in (payload, json.dumps(payload)):
        assert "larger than" in rejected(form)["payload"]


def invalid_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@PROPERTIES
@given(
    st.one_of(
        st.text(max_size=300),  # mostly not JSON; when it is, not an intent
        st.binary(max_size=300).filter(invalid_utf8),
        json_values,
        json_values.map(json.dumps),
        st.integers(2, 30_000).map(lambda d: "[" * d + "]" * d),
        st.integers(2, 6_000).map(lambda d: '{"route":' * d + "1" + "}" * d),
        st.integers(2, 6_000).map(lambda d: {"route": nested(d)}),
        st.sampled_from(["", " ", "null", "[]", "{}", "\x00", "\ufeff{}", "NaN", "1e999"]),
    )
)
def test_garbage_is_rejected_as_invalid_payload(payload: Any) -> None:
    errors = rejected(payload)
    if isinstance(payload, str) and _not_json(payload):
        assert re.match("not valid JSON|larger than", errors["payload"]), errors


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return True
    return False


@pytest.mark.parametrize("bad", ["\x00", "a\x00b", "\ud800", "x\udfff"])
@pytest.mark.parametrize("field", ["strategy", "correlationId", "source"])
def test_text_a_database_cannot_store_is_rejected(field: str, bad: str) -> None:
    """NUL (PostgreSQL refuses it) and lone surrogates (not encodable) in stored text."""
    payload = {**Values(
        1, 10, b"\x01" * 32, 100, b"\x11" * 20, 0, [], [], 200, b"\x33" * 20, b"\x44" * 20, 0,
        [], {},
    ).write(Writer()), field: bad}  # fmt: skip
    assert field in rejected(payload)
    assert field in rejected(json.dumps(payload))
