"""RFC 4567 key-mgmt attribute encoding and parsing."""

from __future__ import annotations

import base64

import pytest

from kms.endpoint.sdp import add_key_mgmt, key_mgmt_attribute, parse_key_mgmt
from kms.endpoint.session import EndpointError

OFFER = (
    "v=0\r\no=alice 2890844526 2890844526 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\n"
    "t=0 0\r\nm=audio 49170 RTP/SAVP 0\r\n"
)


def test_attribute_is_base64_of_the_message() -> None:
    msg = bytes(range(40))
    assert key_mgmt_attribute(msg) == "a=key-mgmt:mikey " + base64.b64encode(msg).decode()


def test_add_then_parse_round_trips_at_session_level() -> None:
    msg = b"\x01\x0e" + bytes(50)
    sdp = add_key_mgmt(OFFER, msg)
    lines = sdp.split("\r\n")
    assert lines.index("a=key-mgmt:mikey " + base64.b64encode(msg).decode()) < lines.index(
        "m=audio 49170 RTP/SAVP 0"
    )
    assert parse_key_mgmt(sdp) == [msg]


def test_other_protocols_are_ignored_and_bad_base64_is_an_error() -> None:
    assert parse_key_mgmt("a=key-mgmt:other AAAA\r\n") == []
    with pytest.raises(EndpointError):
        parse_key_mgmt("a=key-mgmt:mikey !!notbase64!!\r\n")
