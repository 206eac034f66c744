"""Payload chaining: each payload's Next Payload field names the type of the one after it
(RFC 3830 6.1).

Used for the message body, TP Data, Ticket Data and the KEMAC's Key data sub-payloads. The
caller passes the class map of what may appear (``kms.mikey.catalog`` for a message body,
``kms.mikey.ticket`` its own for TP Data and Ticket Data), so this module depends on no
payload module but the base one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from kms.mikey.buffer import Reader, Writer
from kms.mikey.constants import PayloadType
from kms.mikey.errors import EncodeError
from kms.mikey.payloads import KeyData, Payload, Sign

#: A payload type -> class map: what may appear in one chain (the caller's knowledge; the
#: chain itself knows no payload but SIGN, which ends it, and Key data, RFC 3830 6.13).
ClassMap = Mapping[int, type[Payload]]


def decode_chain(
    r: Reader,
    first: int,
    classes: ClassMap,
    context: str,
    allowed: frozenset[int] | None = None,
) -> list[Payload]:
    """Decode payloads from ``r`` starting with type ``first`` until Next Payload = 0.

    ``classes`` maps the payload types this chain may hold to their classes; ``allowed``
    restricts them further (None: all of ``classes``). SIGN has no Next Payload field and ends
    the chain. Each payload keeps its exact bytes in ``raw``.
    """
    out: list[Payload] = []
    nxt = first
    while nxt != PayloadType.LAST:
        start = r.pos
        cls = classes.get(nxt)
        if cls is None or (allowed is not None and nxt not in allowed):
            r.payload = context
            if cls is not None:
                raise r.error(f"{cls.NAME} payload not allowed in {context}")
            if nxt in PayloadType.__members__.values():
                raise r.error(f"{PayloadType(nxt).name} payload not allowed in {context}")
            raise r.error(f"unknown payload type {nxt}")
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

_KEY_DATA: ClassMap = {PayloadType.KEY_DATA: KeyData}


def encode_key_data(keys: Iterable[KeyData]) -> bytes:
    """The KEMAC Encr data plaintext: Key data sub-payloads, NP 20 each, the last NP 0."""
    ks = list(keys)
    return encode_chain(ks, with_first_payload=False)


def decode_key_data(plaintext: bytes) -> tuple[KeyData, ...]:
    """Parse a decrypted KEMAC Encr data field as Key data sub-payloads."""
    r = Reader(plaintext, payload="Key data")
    if not plaintext:
        raise r.error("KEMAC carries no Key data")
    ps = decode_chain(r, PayloadType.KEY_DATA, _KEY_DATA, "KEMAC")
    if not r.at_end():
        raise r.error("trailing bytes after the last Key data sub-payload")
    return tuple(p for p in ps if isinstance(p, KeyData))
