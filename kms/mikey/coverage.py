"""What a MAC or signature covers (RFC 6043 5.4, reference section 8), over exact bytes.

Every function here works on the bytes as received (``Message.wire``), never on a
re-encoding, so a peer's harmless encoding choice can never break or forge a MAC check.
"""

from __future__ import annotations

from collections.abc import Callable

from kms.mikey.constants import DataType
from kms.mikey.errors import DecodeError, EncodeError
from kms.mikey.message import Message
from kms.mikey.payloads import Sign, Verification
from kms.mikey.ticket import Ticket

MacFn = Callable[[bytes], bytes]


def _wire(msg: Message) -> bytes:
    if not msg.wire:
        raise ValueError("coverage needs a decoded message (its received bytes)")
    return msg.wire


def protected_tail(msg: Message) -> bytes:
    """The MAC or signature value carried by the message's last payload (V or SIGN)."""
    last = msg.payloads[-1] if msg.payloads else None
    if isinstance(last, Verification):
        return last.mac
    if isinstance(last, Sign):
        return last.signature
    raise DecodeError("message", len(msg.wire), "last payload is neither V nor SIGN")


def covered_prefix(msg: Message) -> bytes:
    """Message bytes from HDR up to, not including, the MAC / Signature field (RFC 3830 5.2,
    RFC 6043 5.4): the V payload's NP and Auth alg, or SIGN's type/length, are covered."""
    wire = _wire(msg)
    body = wire[: len(wire) - len(protected_tail(msg))]
    if msg.data_type == DataType.TRANSFER_INIT:
        return _without_initiator_data(msg, body)
    return body


def _without_initiator_data(msg: Message, body: bytes) -> bytes:
    """RFC 6043 5.4: the TRANSFER_INIT MAC excludes the TICKET's Initiator Data length and
    Initiator Data; the bytes before them are followed directly by the bytes after."""
    ticket = msg.first(Ticket)
    if ticket is None:
        return body
    start = msg.offset_of(ticket)
    end = start + len(ticket.raw)
    k = len(ticket.raw) - (len(ticket.without_initiator_data().encode_body()) + 1) + 2
    # ``k`` is the Initiator Data length field (2) plus Initiator Data, as received.
    return body[: end - k] + body[end:]


def initial_mac_input(msg: Message, identity_a: bytes, identity_b: bytes) -> bytes:
    """REQUEST_INIT || Id_i || Id_kms, TRANSFER_INIT' || Id_i || Id_r,
    RESOLVE_INIT || Id_r || Id_kms (identities are ID Data bytes, docs/rfc-readings.md R8)."""
    return covered_prefix(msg) + identity_a + identity_b


def response_mac_input(msg: Message, initial_wire: bytes) -> bytes:
    """Responses: the response || the complete initial message as received (RFC 6043 5.4)."""
    return covered_prefix(msg) + initial_wire


def error_mac_input(msg: Message) -> bytes:
    """Error messages: the error message alone (RFC 6043 5.4)."""
    return covered_prefix(msg)


# --- building ----------------------------------------------------------------------------


def _sealed_field_length(msg: Message) -> int:
    """The length of the MAC / signature field that ends ``msg``: its last payload must be
    a V or a SIGN (RFC 3830 6.9, 6.5)."""
    last = msg.payloads[-1] if msg.payloads else None
    if isinstance(last, Verification):
        return len(last.mac)
    if isinstance(last, Sign):
        return len(last.signature)
    raise EncodeError("last payload is neither V nor SIGN")


def seal(msg: Message, compute: MacFn, extra: bytes = b"") -> Message:
    """Fill the last payload's MAC / signature: ``compute(covered bytes || extra)``.

    The last payload must be a V (or SIGN) whose value already has its final length (zeros
    are fine): the MAC input includes length fields, so they must not change afterwards.
    Returns the decoded sealed message (with ``wire`` set).
    """
    n = _sealed_field_length(msg)
    wire = msg.encode()
    body = wire[: len(wire) - n]  # the MAC / signature field is the last n bytes
    if msg.data_type == DataType.TRANSFER_INIT and msg.first(Ticket) is not None:
        covered = _without_initiator_data(Message.decode(wire), body)
    else:
        covered = body
    value = compute(covered + extra)
    if len(value) != n:
        raise EncodeError("MAC/signature length differs from the placeholder's")
    return Message.decode(body + value)


def seal_wire(msg: Message, compute: MacFn, extra: bytes = b"") -> bytes:
    """:func:`seal` for a sender that only needs the bytes to send: the same bytes, without
    decoding them again. Not for TRANSFER_INIT with a TICKET (its coverage needs the decoded
    ticket: use :func:`seal`)."""
    n = _sealed_field_length(msg)
    if msg.data_type == DataType.TRANSFER_INIT and msg.first(Ticket) is not None:
        return seal(msg, compute, extra).wire
    wire = msg.encode()
    body = wire[: len(wire) - n]  # the MAC / signature field is the last n bytes
    value = compute(body + extra)
    if len(value) != n:
        raise EncodeError("MAC/signature length differs from the placeholder's")
    return body + value
