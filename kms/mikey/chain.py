"""Payload chaining: each payload's Next Payload field names the type of the one after it.

Used for the message body, TP Data, Ticket Data and the KEMAC's Key data sub-payloads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kms.mikey.buffer import Reader, Writer
from kms.mikey.constants import PayloadType
from kms.mikey.errors import EncodeError
from kms.mikey.payloads import (
    Cert,
    Chash,
    Dh,
    Error,
    GeneralExtension,
    Id,
    Kemac,
    KeyData,
    Payload,
    Pke,
    Rand,
    SecurityPolicy,
    Sign,
    Timestamp,
    Verification,
)
from kms.mikey.ticket import Idr, RandR, Ticket, TicketPolicy, Tr

PAYLOAD_CLASSES: dict[int, type[Payload]] = {
    cls.TYPE: cls
    for cls in (
        Kemac,
        Pke,
        Dh,
        Sign,
        Timestamp,
        Id,
        Cert,
        Chash,
        Verification,
        SecurityPolicy,
        Rand,
        Error,
        Tr,
        Idr,
        RandR,
        TicketPolicy,
        Ticket,
        KeyData,
        GeneralExtension,
    )
}


def payload_name(t: int) -> str:
    cls = PAYLOAD_CLASSES.get(t)
    return cls.NAME if cls is not None else f"payload type {t}"


def decode_chain(
    r: Reader, first: int, allowed: frozenset[int] | None, context: str
) -> list[Payload]:
    """Decode payloads from ``r`` starting with type ``first`` until Next Payload = 0.

    SIGN has no Next Payload field and ends the chain. ``allowed`` restricts the types
    (None: any known payload). Each payload keeps its exact bytes in ``raw``.
    """
    out: list[Payload] = []
    nxt = first
    while nxt != PayloadType.LAST:
        start = r.pos
        cls = PAYLOAD_CLASSES.get(nxt)
        if cls is None:
            r.payload = context
            raise r.error(f"unknown payload type {nxt}")
        if allowed is not None and nxt not in allowed:
            r.payload = context
            raise r.error(f"{cls.NAME} payload not allowed in {context}")
        r.payload = cls.NAME
        # RFC 3830 6.5: SIGN has no Next Payload field and is always last.
        following = int(PayloadType.LAST) if cls is Sign else r.pull_u8("next payload")
        p = cls.decode_body(r)
        # Frozen dataclass: ``raw`` is set once, here, to the exact bytes decoded.
        object.__setattr__(p, "raw", r.data[start : r.pos])
        out.append(p)
        nxt = following
    return out


def encode_chain(payloads: Sequence[Payload], *, with_first_payload: bool) -> bytes:
    """Encode a chain; with ``with_first_payload`` a leading First Payload byte is written
    (TP Data, Initiator Data), otherwise the caller writes the first type elsewhere."""
    w = Writer()
    if with_first_payload:
        w.push_u8(payloads[0].TYPE if payloads else PayloadType.LAST)
    for i, p in enumerate(payloads):
        following = payloads[i + 1].TYPE if i + 1 < len(payloads) else PayloadType.LAST
        if isinstance(p, Sign):
            if i + 1 != len(payloads):
                raise EncodeError("SIGN must be the last payload")
        else:
            w.push_u8(following)
        w.push_bytes(p.encode_body())
    return w.getvalue()


def first_type(payloads: Sequence[Payload]) -> int:
    return payloads[0].TYPE if payloads else PayloadType.LAST


# --- KEMAC plaintext: a chain of Key data sub-payloads (RFC 3830 6.2, 6.13) ---------------


def encode_key_data(keys: Iterable[KeyData]) -> bytes:
    """The KEMAC Encr data plaintext: Key data sub-payloads, NP 20 each, the last NP 0."""
    ks = list(keys)
    return encode_chain(ks, with_first_payload=False)


def decode_key_data(plaintext: bytes) -> tuple[KeyData, ...]:
    """Parse a decrypted KEMAC Encr data field as Key data sub-payloads."""
    r = Reader(plaintext, payload="Key data")
    if not plaintext:
        raise r.error("KEMAC carries no Key data")
    ps = decode_chain(r, PayloadType.KEY_DATA, frozenset({PayloadType.KEY_DATA}), "KEMAC")
    if not r.at_end():
        raise r.error("trailing bytes after the last Key data sub-payload")
    return tuple(p for p in ps if isinstance(p, KeyData))
