"""The inspector (kms.cli.mikey_inspect): tree and JSON renderings name every payload and field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings

from kms.cli.mikey_inspect import enum_name, render_tree, to_json
from kms.mikey.constants import DataType, EncrAlg, TsType
from kms.mikey.message import Message
from tests.mikey import strategies as s


def tree(name: str) -> str:
    return render_tree(Message.decode(s.fixture(name)))


def test_request_init_psk_tree_names_fields_in_rfc_words() -> None:
    text = tree("request_init_psk")
    lines = [line.strip() for line in text.splitlines()]
    assert text.splitlines()[0] == "MIKEY message (195 bytes)"
    for expected in [
        "HDR",
        "version: 1",
        "data type: REQUEST_INIT_PSK (11)",
        "next payload: T (5)",
        "V: 1",
        "PRF func: MIKEY-1 (0)",
        "CSB ID: 0x12345678",
        "#CS: 0",
        "CS ID map type: Empty map (1)",
        "T (offset 10, 6 bytes)",
        "TS type: NTP-UTC-32 (3)",
        "TS value (4 bytes): ea1c2b3c",
        "RAND Role: RANDRi (1)",
        "ID Role: IDRkms (3)",
        'ID data (19 bytes): 7369703a6b6d73406578616d706c652e6f7267 ("sip:kms@example.org")',
        "TP (offset 85, 79 bytes)",
        "Ticket Type: MIKEY base ticket (1)",
        "flags: F H L N O",
        "TP Data length: 69",
        "First Payload: TR (13)",
        "TS Role: TRs (2)",
        "Encr data (25 bytes)",
        "Type: TGK (0)",
        "KV: SPI/MKI (1)",
        "ID Role: IDRpsk (4)",
        "ID type: Byte string (2)",
        "Auth alg: HMAC-SHA-1-160 (1)",
        "Ver data (20 bytes): a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3",
    ]:
        assert expected in lines, expected
    # indentation: payloads under the message, fields under their payload
    assert "  HDR" in text.splitlines()
    assert "    data type: REQUEST_INIT_PSK (11)" in text.splitlines()


def test_ticket_data_is_shown_decoded_as_base_ticket() -> None:
    lines = [line.strip() for line in tree("transfer_init_initiator_data").splitlines()]
    i = lines.index("Ticket Data (88 bytes)")
    assert lines[i + 2] == "MIKEY base ticket"
    assert "THDR" in lines[i:]
    assert "flags: D E F H I L N O" in lines
    assert "Initiator Data length: 45" in lines
    assert "Vi" in lines and "Vr" in lines
    assert "Encr alg: AES-CM-128 (1)" in lines
    assert "Encr data (25 bytes): 0102030405060708090a0b0c0d0e0f10111213141516171819" in lines


def test_undecodable_ticket_data_and_unknown_values_are_shown_not_raised() -> None:
    wire = bytearray(s.fixture("request_resp"))
    # corrupt the base ticket's THDR next payload (Ticket Data starts after TICKET's fields)
    msg = Message.decode(bytes(wire))
    ticket_off = msg.offsets[2]
    td_off = ticket_off + 1 + 7 + 2 + 89 + 2
    assert wire[td_off] == 5  # THDR next payload: T
    wire[td_off] = 11
    text = render_tree(Message.decode(bytes(wire)))
    assert "MIKEY base ticket: not decodable: " in text
    wire2 = bytearray(s.fixture("resolve_resp"))
    kemac_off = Message.decode(bytes(wire2)).offsets[2]
    wire2[kemac_off + 1] = 0x77  # unknown Encr alg
    assert "Encr alg: unknown (119)" in render_tree(Message.decode(bytes(wire2)))


def test_rfc3830_maps_and_keys() -> None:
    lines = [line.strip() for line in tree("psk_init").splitlines()]
    assert "CS ID map type: SRTP-ID (0)" in lines
    assert "SRTP-ID block (CS ID 2)" in lines
    assert "SSRC: 0x22222222" in lines
    assert "Type: TEK+SALT (3)" in lines
    assert "Salt data (14 bytes): 101112131415161718191a1b1c1d" in lines
    assert "Valid To (6 bytes): 0000ffffffff" in lines
    assert "Type: Authentication tag length (11)" in lines
    generic = [line.strip() for line in tree("transfer_resp").splitlines()]
    assert "GENERIC-ID block (CS ID 1)" in generic
    assert "S: 1" in generic
    assert "Session Data (10 bytes): deadbeef000000000001" in generic


def test_json_has_the_same_names_and_hex_bytes() -> None:
    j: Any = to_json(Message.decode(s.fixture("request_resp")))
    assert j["length"] == 283
    assert j["HDR"]["data type"] == {"value": 13, "name": "REQUEST_RESP"}
    assert j["HDR"]["CSB ID"] == "12345678"
    assert j["HDR"]["CS ID map info"] == []
    payloads = j["payloads"]
    assert [p["payload"] for p in payloads] == ["T", "IDR", "TICKET", "KEMAC", "V"]
    ticket = payloads[2]
    assert ticket["offset"] == 40  # HDR 10 + T 6 + IDRkms 24
    assert ticket["next payload"] == {"value": 1, "name": "KEMAC"}
    assert ticket["flags"] == ["D", "F", "H", "N", "O"]
    assert ticket["TP Data"]["First Payload"] == {"value": 14, "name": "IDR"}
    base = ticket["Ticket Data"]["MIKEY base ticket"]
    assert [p["payload"] for p in base["payloads"]] == ["T", "RAND", "KEMAC", "IDR", "V"]
    assert base["THDR"]["THDR Data length"] == 0
    assert payloads[3]["Encr alg"] == {"value": 1, "name": "AES-CM-128"}
    assert payloads[4]["Ver data"] == "b0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3"


@pytest.mark.parametrize("name", s.FIXTURE_NAMES)
def test_every_fixture_renders(name: str) -> None:
    msg = Message.decode(s.fixture(name))
    text = render_tree(msg)
    assert text.endswith("\n")
    for p in msg.payloads:
        assert f"\n  {p.NAME} (offset " in text
    json.dumps(to_json(msg))  # serialisable


def test_enum_names() -> None:
    assert enum_name(DataType, 18) == "RESOLVE_RESP"
    assert enum_name(EncrAlg, 3) == "AES-CM-256"
    assert enum_name(TsType, 3) == "NTP-UTC-32"
    assert enum_name(DataType, 99) is None


@settings(max_examples=100, deadline=None)
@given(s.messages)
def test_any_message_renders(msg: Message) -> None:
    decoded = Message.decode(msg.encode())
    text = render_tree(decoded)
    assert text.startswith("MIKEY message (")
    assert text.count("\n  HDR\n") == 1
    j = to_json(decoded)
    payloads = j["payloads"]
    assert isinstance(payloads, list)
    assert len(payloads) == len(msg.payloads)
    json.dumps(j)
