"""Hypothesis round trips for every payload type and every message type (issue 2).

decode(encode(x)) == x for generated values, and encode(decode(b)) == b for their bytes.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kms.mikey.buffer import Reader
from kms.mikey.catalog import PAYLOAD_CLASSES
from kms.mikey.chain import decode_chain, decode_key_data, encode_chain, encode_key_data
from kms.mikey.constants import DataType, PayloadType
from kms.mikey.header import Header
from kms.mikey.message import Message
from kms.mikey.payloads import KeyData, Payload
from kms.mikey.ticket import BaseTicketData, InitiatorData, Ticket
from tests.mikey import strategies as s

EXAMPLES = settings(max_examples=120, deadline=None)


def roundtrip_payload(p: Payload) -> None:
    wire = encode_chain([p], with_first_payload=False)
    (back,) = decode_chain(Reader(wire), p.TYPE, PAYLOAD_CLASSES, "test")
    assert back == p
    assert back.raw == wire
    assert encode_chain([back], with_first_payload=False) == wire


def test_strategies_cover_every_payload_type() -> None:
    assert set(s.PAYLOADS) == set(PayloadType) - {PayloadType.LAST}


@pytest.mark.parametrize("ptype", sorted(s.PAYLOADS), ids=lambda t: PayloadType(t).name)
def test_payload_roundtrip(ptype: PayloadType) -> None:
    @EXAMPLES
    @given(s.PAYLOADS[ptype])
    def check(p: Payload) -> None:
        assert ptype == p.TYPE
        roundtrip_payload(p)

    check()


@pytest.mark.parametrize("dtype", list(DataType), ids=lambda t: t.name)
def test_message_roundtrip(dtype: DataType) -> None:
    @EXAMPLES
    @given(s.message(dtype))
    def check(m: Message) -> None:
        wire = m.encode()
        back = Message.decode(wire)
        assert back == m
        assert back.wire == wire
        assert back.encode() == wire
        # offsets point at each payload's raw bytes inside the wire
        for p, off in zip(back.payloads, back.offsets, strict=True):
            assert wire[off : off + len(p.raw)] == p.raw

    check()


@EXAMPLES
@given(s.header())
def test_header_roundtrip(h: Header) -> None:
    wire = h.encode(0)
    back, nxt = Header.decode(Reader(wire))
    assert (back, nxt) == (h, 0)
    assert back.encode(0) == wire


@EXAMPLES
@given(s.base_ticket_data())
def test_base_ticket_roundtrip(b: BaseTicketData) -> None:
    wire = b.encode()
    back = BaseTicketData.decode(wire)
    assert back == b
    assert back.encode() == wire


@EXAMPLES
@given(s.ticket())
def test_ticket_base_ticket_and_mac_input(t: Ticket) -> None:
    if (t.policy.ticket_type, t.policy.subtype, t.policy.version) != (1, 1, 1):
        return
    wire = encode_chain([t], with_first_payload=False)
    (back,) = decode_chain(Reader(wire), PayloadType.TICKET, PAYLOAD_CLASSES, "test")
    assert isinstance(back, Ticket)
    bt = back.base_ticket()
    # the MAC input ends exactly where the base ticket's MAC starts
    mac_input = back.mac_input()
    assert wire[1:].startswith(mac_input)
    assert wire[1 + len(mac_input) :].startswith(bt.v.mac)


@EXAMPLES
@given(s.initiator_data())
def test_initiator_data_roundtrip(i: InitiatorData) -> None:
    wire = i.encode()
    assert InitiatorData.decode(Reader(wire)) == i
    assert i.vr_mac_input() + i.vr.mac == wire


@EXAMPLES
@given(st.lists(s.key_data(), min_size=1, max_size=4))
def test_key_data_chain_roundtrip(keys: list[KeyData]) -> None:
    plain = encode_key_data(keys)
    assert list(decode_key_data(plain)) == keys
    assert encode_key_data(decode_key_data(plain)) == plain
