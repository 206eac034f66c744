"""What MACs and signatures cover (RFC 6043 5.4, 5.5), on exact bytes.

Expected inputs are computed by hand from the fixture layouts (offsets counted from the
fixture comments), never through the functions under test.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import replace

import pytest

from kms.mikey.coverage import (
    covered_prefix,
    error_mac_input,
    initial_mac_input,
    protected_tail,
    response_mac_input,
    seal,
    seal_wire,
)
from kms.mikey.errors import DecodeError, EncodeError
from kms.mikey.message import Message
from kms.mikey.payloads import Sign, Verification
from kms.mikey.ticket import Ticket
from tests.mikey.strategies import fixture

ALICE = b"sip:alice@example.org"
BOB = b"sip:bob@example.org"
KMS = b"sip:kms@example.org"
KEY = bytes(range(20))


def hmac_sha1(data: bytes) -> bytes:
    return hmac.new(KEY, data, hashlib.sha1).digest()


@pytest.mark.parametrize(
    ("name", "mac_len"),
    [
        ("request_init_psk", 20),
        ("request_resp", 20),
        ("resolve_init_psk", 20),
        ("resolve_resp", 20),
        ("transfer_resp", 32),
        ("error_request", 20),
        ("error_transfer", 0),
        ("psk_resp", 20),
    ],
)
def test_covered_prefix_ends_right_before_the_mac(name: str, mac_len: int) -> None:
    wire = fixture(name)
    msg = Message.decode(wire)
    prefix = covered_prefix(msg)
    assert prefix == wire[: len(wire) - mac_len]
    assert protected_tail(msg) == wire[len(wire) - mac_len :]
    # the V payload's Next Payload (0) and Auth alg are covered
    assert prefix[-2] == 0
    assert prefix[-1] == wire[len(wire) - mac_len - 1]


@pytest.mark.parametrize(
    ("name", "sig_len"),
    [("request_init_pk", 8), ("resolve_init_pk", 16), ("error_signed", 4)],
)
def test_covered_prefix_of_signed_messages_includes_sign_header(name: str, sig_len: int) -> None:
    wire = fixture(name)
    prefix = covered_prefix(Message.decode(wire))
    assert prefix == wire[: len(wire) - sig_len]
    # SIGN's S type / Signature len bytes are the last two covered bytes
    assert prefix[-2:] == (sig_len | (wire[-sig_len - 2] & 0xF0) << 8).to_bytes(2, "big")


def test_transfer_init_coverage_excludes_initiator_data_and_its_length() -> None:
    wire = fixture("transfer_init_initiator_data")
    # Offsets from the fixture: HDR 10 + 11 (one GENERIC-ID entry) = 21, T 6 -> 27,
    # RANDRi 19 -> 46, IDRi 26 -> 72, IDRr 24 -> 96 = TICKET start; TICKET = NP 1 + header 7 +
    # TP Data len 2 + 89 + Ticket Data len 2 + 88 = 189 -> Initiator Data length at 285,
    # Initiator Data 45 bytes -> 332; KEMAC 30 -> 362; V NP and Auth alg -> 364; MAC 20 -> 384.
    assert len(wire) == 384
    assert wire[285:287] == b"\x00\x2d"
    assert wire[287] == 9  # Initiator Data's First Payload: V
    assert wire[362:364] == b"\x00\x01"
    expected = wire[:285] + wire[332:364]
    msg = Message.decode(wire)
    assert covered_prefix(msg) == expected
    assert initial_mac_input(msg, ALICE, BOB) == expected + ALICE + BOB


def test_transfer_init_coverage_without_initiator_data_drops_the_zero_length() -> None:
    wire = fixture("transfer_init")
    # HDR 10 + 11 + 6 (two GENERIC-ID entries) = 27, T -> 33, RANDRi -> 52, IDRi -> 78,
    # IDRr -> 102, SP 23 -> 125 = TICKET start; + 189 -> Initiator Data length at 314..316;
    # V: NP and Auth alg 316..318, MAC 318..338.
    assert len(wire) == 338
    assert wire[314:316] == b"\x00\x00"
    assert covered_prefix(Message.decode(wire)) == wire[:314] + wire[316:318]


def test_transfer_init_coverage_is_the_same_with_and_without_initiator_data() -> None:
    """Adding Initiator Data to the TICKET does not change what the TRANSFER_INIT MAC covers."""
    with_id = Message.decode(fixture("transfer_init_initiator_data"))
    stripped = [
        p.without_initiator_data() if isinstance(p, Ticket) else p for p in with_id.payloads
    ]
    without = Message.decode(Message(with_id.header, tuple(stripped)).encode())
    assert len(without.wire) == len(with_id.wire) - 45
    assert covered_prefix(without) == covered_prefix(with_id)


def test_seal_then_verify_request_init_psk() -> None:
    template = Message.decode(fixture("request_init_psk"))
    # a zero placeholder MAC of the final length
    zeroed = replace(template, payloads=(*template.payloads[:-1], Verification(1, bytes(20))))
    sealed = seal(zeroed, hmac_sha1, ALICE + KMS)
    wire = sealed.wire
    # hand-built MAC input: everything but the last 20 bytes, then Id_i || Id_kms
    mac_input = wire[:-20] + ALICE + KMS
    assert wire[:-20] == fixture("request_init_psk")[:-20]
    assert wire[-20:] == hmac_sha1(mac_input)
    assert hmac.compare_digest(
        protected_tail(sealed), hmac_sha1(initial_mac_input(sealed, ALICE, KMS))
    )


def test_seal_transfer_init_skips_initiator_data() -> None:
    msg = Message.decode(fixture("transfer_init_initiator_data"))
    sealed = seal(msg, hmac_sha1, ALICE + BOB)
    wire = sealed.wire
    assert wire[:364] == fixture("transfer_init_initiator_data")[:364]
    assert wire[-20:] == hmac_sha1(wire[:285] + wire[332:364] + ALICE + BOB)


def test_seal_signature_placeholder() -> None:
    msg = Message.decode(fixture("error_signed"))
    sealed = seal(msg, lambda data: hashlib.sha256(data).digest()[:4])
    assert sealed.wire[-4:] == hashlib.sha256(fixture("error_signed")[:-4]).digest()[:4]
    assert isinstance(sealed.payloads[-1], Sign)


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("request_resp", ALICE + KMS),
        ("resolve_resp", BOB + KMS),
        ("error_request", b""),
        ("transfer_init_initiator_data", ALICE + BOB),  # falls back to seal()
    ],
)
def test_seal_wire_gives_the_bytes_seal_gives(name: str, extra: bytes) -> None:
    msg = Message.decode(fixture(name))
    expected = seal(msg, hmac_sha1, extra).wire
    assert seal_wire(msg, hmac_sha1, extra) == expected
    # and independently: the MAC is the last 20 bytes, over what precedes it (not TRANSFER)
    if not name.startswith("transfer"):
        assert expected[-20:] == hmac_sha1(fixture(name)[:-20] + extra)


def test_seal_wire_refuses_what_seal_refuses() -> None:
    msg = Message.decode(fixture("request_init_psk"))
    with pytest.raises(EncodeError):
        seal_wire(msg, lambda data: bytes(32))
    bare = Message(msg.header, msg.payloads[:-1])
    with pytest.raises(EncodeError):
        seal_wire(bare, hmac_sha1)


def test_seal_refuses_a_value_of_another_length() -> None:
    msg = Message.decode(fixture("request_init_psk"))
    with pytest.raises(EncodeError):
        seal(msg, lambda data: bytes(32))


def test_response_coverage_appends_the_complete_initial_message() -> None:
    request = fixture("request_init_psk")
    response = Message.decode(fixture("request_resp"))
    assert response_mac_input(response, request) == fixture("request_resp")[:-20] + request
    # TRANSFER_RESP: the whole TRANSFER_INIT as sent, Initiator Data and MAC included
    init = fixture("transfer_init_initiator_data")
    resp = Message.decode(fixture("transfer_resp"))
    assert response_mac_input(resp, init) == fixture("transfer_resp")[:-32] + init
    sealed = seal(resp, lambda data: hmac.new(bytes(32), data, hashlib.sha256).digest(), init)
    expected = hmac.new(bytes(32), sealed.wire[:-32] + init, hashlib.sha256).digest()
    assert sealed.wire[-32:] == expected


def test_error_coverage_is_the_message_alone() -> None:
    wire = fixture("error_request")
    assert error_mac_input(Message.decode(wire)) == wire[:-20]


def test_coverage_needs_received_bytes_and_a_protected_last_payload() -> None:
    msg = Message.decode(fixture("request_init_psk"))
    with pytest.raises(ValueError, match="decoded message"):
        covered_prefix(Message(msg.header, msg.payloads))  # no wire
    with pytest.raises(DecodeError):
        covered_prefix(Message.decode(fixture("psk_init")))  # ends with KEMAC
