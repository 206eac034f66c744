"""Mutation tests: whatever the bytes, the decoder raises DecodeError and nothing else.

Valid messages (the hand-written fixtures and strategy-generated ones) are truncated at every
length, extended, and have bytes flipped or replaced; arbitrary bytes are fed on their own and
behind a valid HDR. A successful decode must re-encode to the very bytes decoded (no
half-parsed message). The same holds for Ticket.base_ticket() and decode_key_data().
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms.mikey.chain import decode_key_data, encode_key_data
from kms.mikey.coverage import covered_prefix
from kms.mikey.errors import DecodeError
from kms.mikey.message import Message
from kms.mikey.payloads import KeyData, Sign, Verification
from kms.mikey.ticket import BaseTicketData, Ticket
from tests.mikey import strategies as s

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIXTURES = {name: s.fixture(name) for name in s.FIXTURE_NAMES}
# Byte values written over each position: bit flips at both ends and the extremes.
MUTATIONS = (lambda b: b ^ 0x01, lambda b: b ^ 0x80, lambda b: 0x00, lambda b: 0xFF)


def outcome(data: bytes) -> Message | None:
    """Decode; None on DecodeError. Any other exception fails the test. A decoded message
    re-encodes to exactly ``data``, and everything derived from it fails only cleanly."""
    try:
        msg = Message.decode(data)
    except DecodeError as exc:
        check_error(exc, data)
        return None
    assert msg.encode() == data
    assert msg.wire == data
    for ticket in msg.all(Ticket):
        ticket_outcome(ticket)
    if msg.payloads and isinstance(msg.payloads[-1], Verification | Sign):
        assert data.startswith(covered_prefix(msg)[:10])
    return msg


def check_error(err: DecodeError, data: bytes) -> None:
    """Offsets are absolute positions in the message; the text names payload and offset."""
    assert 0 <= err.offset <= len(data), err
    assert str(err) == f"{err.payload} at offset {err.offset}: {err.reason}"


def ticket_outcome(ticket: Ticket) -> None:
    try:
        bt = ticket.base_ticket()
    except DecodeError:
        return
    assert bt.encode() == ticket.ticket_data
    assert ticket.mac_input()


def mutants(data: bytes) -> list[bytes]:
    out = []
    for i in range(len(data)):
        for f in MUTATIONS:
            v = f(data[i])
            if v != data[i]:
                out.append(data[:i] + bytes([v]) + data[i + 1 :])
    return out


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_proper_prefix_is_a_decode_error(name: str) -> None:
    data = FIXTURES[name]
    for n in range(len(data)):
        with pytest.raises(DecodeError):
            Message.decode(data[:n])


@pytest.mark.parametrize("name", sorted(FIXTURES))
@pytest.mark.parametrize("tail", [b"\x00", b"\x05\x00", bytes(range(7))])
def test_appended_bytes_are_a_decode_error(name: str, tail: bytes) -> None:
    with pytest.raises(DecodeError, match="trailing"):
        Message.decode(FIXTURES[name] + tail)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_byte_mutations_decode_cleanly_or_fail_with_decode_error(name: str) -> None:
    data = FIXTURES[name]
    results = [outcome(m) for m in mutants(data)]
    # Both outcomes must occur: some mutations hit free-form bytes, some hit structure.
    assert any(r is None for r in results)
    assert any(r is not None for r in results)


def test_mutated_ticket_data_raises_only_decode_error() -> None:
    ticket = Message.decode(FIXTURES["request_resp"]).one(Ticket)
    td = ticket.ticket_data
    assert BaseTicketData.decode(td).encode() == td
    for n in range(len(td)):
        with pytest.raises(DecodeError):
            BaseTicketData.decode(td[:n])
    for m in mutants(td):
        mutated = Ticket(ticket.policy, m, None)
        try:
            bt = mutated.base_ticket()
        except DecodeError:
            continue
        assert bt.encode() == m


def test_mutated_key_data_raises_only_decode_error() -> None:
    plain = bytes.fromhex(
        "14 31 0010 000102030405060708090a0b0c0d0e0f 000e 101112131415161718191a1b1c1d"
        " 04 00000001 00 02 0002 abcd 01 00 01 ff"
    )
    keys = decode_key_data(plain)
    assert len(keys) == 2
    for n in range(len(plain)):
        with pytest.raises(DecodeError):
            decode_key_data(plain[:n])
    for m in mutants(plain):
        try:
            got = decode_key_data(m)
        except DecodeError:
            continue
        assert encode_key_data(got) == m


@SETTINGS
@given(s.messages, st.data())
def test_generated_messages_mutated(msg: Message, data: st.DataObject) -> None:
    wire = msg.encode()
    assert outcome(wire) == msg
    cut = data.draw(st.integers(0, len(wire) - 1))
    with pytest.raises(DecodeError):
        Message.decode(wire[:cut])
    pos = data.draw(st.integers(0, len(wire) - 1))
    value = data.draw(st.integers(0, 255))
    outcome(wire[:pos] + bytes([value]) + wire[pos + 1 :])
    outcome(wire[:pos] + wire[pos + 1 :])  # a byte deleted
    outcome(wire[:pos] + bytes([value]) + wire[pos:])  # a byte inserted
    with pytest.raises(DecodeError):
        Message.decode(wire + data.draw(st.binary(min_size=1, max_size=8)))


@SETTINGS
@given(s.ticket(), st.integers(0, 10_000), st.integers(0, 255))
def test_generated_ticket_data_mutated(ticket: Ticket, pos: int, value: int) -> None:
    td = ticket.ticket_data
    if td:
        pos %= len(td)
        td = td[:pos] + bytes([value]) + td[pos + 1 :]
    ticket_outcome(Ticket(ticket.policy, td, ticket.initiator_data))


@SETTINGS
@given(st.lists(s.key_data(), min_size=1, max_size=3), st.integers(0, 10_000), st.integers(0, 255))
def test_generated_key_data_mutated(keys: list[KeyData], pos: int, value: int) -> None:
    plain = encode_key_data(keys)
    pos %= len(plain)
    m = plain[:pos] + bytes([value]) + plain[pos + 1 :]
    try:
        got = decode_key_data(m)
    except DecodeError:
        return
    assert encode_key_data(got) == m


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    outcome(data)


# HDR prefixes: version 1, every data type with a varied map type; the rest is random.
hdr_prefix = st.builds(
    lambda dt, vp, m: bytes([1, dt, 0, vp]) + b"\x12\x34\x56\x78" + m,
    st.integers(0, 18),
    st.integers(0, 255),
    st.sampled_from([b"\x00\x01", b"\x00\x00", b"\x01\x00", b"\x01\x02", b"\x02\x02"]),
)


@settings(max_examples=300, deadline=None)
@given(hdr_prefix, st.integers(0, 21), st.binary(max_size=200))
def test_arbitrary_bytes_behind_a_valid_hdr(prefix: bytes, first: int, rest: bytes) -> None:
    data = bytearray(prefix + rest)
    data[2] = first  # the HDR's next payload names a (mostly) known payload type
    outcome(bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120))
def test_arbitrary_base_ticket_and_key_data(data: bytes) -> None:
    try:
        bt = BaseTicketData.decode(data)
    except DecodeError:
        pass
    else:
        assert bt.encode() == data
    try:
        keys = decode_key_data(data)
    except DecodeError:
        pass
    else:
        assert encode_key_data(keys) == data
