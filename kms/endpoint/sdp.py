"""MIKEY in SDP (RFC 4567 3.1): ``a=key-mgmt:mikey <base64 of the MIKEY message>``, so that
TRANSFER_INIT / TRANSFER_RESP can ride in SIP/SDP offers and answers (RFC 6043 7)."""

from __future__ import annotations

import base64
import binascii

from kms.endpoint.session import EndpointError

KEY_MGMT_PREFIX = "a=key-mgmt:"
PROTOCOL_ID = "mikey"


def key_mgmt_attribute(message: bytes) -> str:
    """The SDP attribute line carrying ``message`` (no line terminator)."""
    return f"{KEY_MGMT_PREFIX}{PROTOCOL_ID} {base64.b64encode(message).decode('ascii')}"


def parse_key_mgmt(sdp: str) -> list[bytes]:
    """All MIKEY messages in an SDP body (session- or media-level key-mgmt attributes).

    Attributes of other key management protocols are ignored (RFC 4567 3.1); malformed
    base64 in a mikey attribute is an error, never silently skipped.
    """
    found = []
    for raw in sdp.splitlines():
        line = raw.strip()
        if not line.startswith(KEY_MGMT_PREFIX):
            continue
        prot, _, data = line[len(KEY_MGMT_PREFIX) :].partition(" ")
        if prot.lower() != PROTOCOL_ID:
            continue
        try:
            found.append(base64.b64decode(data.strip(), validate=True))
        except (binascii.Error, ValueError):
            raise EndpointError("malformed base64 in a=key-mgmt:mikey") from None
    return found


def add_key_mgmt(sdp: str, message: bytes) -> str:
    """Insert the key-mgmt attribute at session level: before the first m= line (RFC 4566
    5: session attributes precede media descriptions), or at the end if there is none."""
    lines = sdp.replace("\r\n", "\n").rstrip("\n").split("\n")
    attr = key_mgmt_attribute(message)
    idx = next((i for i, ln in enumerate(lines) if ln.startswith("m=")), len(lines))
    lines.insert(idx, attr)
    return "\r\n".join(lines) + "\r\n"
