"""A whole MIKEY message: HDR followed by a payload chain (RFC 3830 5, 6; RFC 6043 4.2).

``Message.decode`` is the codec's entry point for untrusted bytes: it raises only
:class:`DecodeError`, never yields a half-parsed message, and keeps the exact bytes so that
MACs and signatures are verified over what was received.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from kms.mikey.buffer import Reader
from kms.mikey.catalog import PAYLOAD_CLASSES
from kms.mikey.chain import decode_chain, encode_chain, first_type
from kms.mikey.constants import DataType, PayloadType
from kms.mikey.errors import DecodeError
from kms.mikey.header import Header
from kms.mikey.layout import TICKET_ALLOWED
from kms.mikey.payloads import Payload

P = TypeVar("P", bound=Payload)

_T = PayloadType
_EXT = _T.GENERAL_EXT

# Which payloads each message type may carry (RFC 3830 5.2-5.3, RFC 4650 3, RFC 4738 3).
# General Extensions may extend any message (RFC 3830 6.15). The MIKEY-TICKET messages
# (RFC 6043 4.2, 5.2) take theirs from the one layout table.
ALLOWED_PAYLOADS: dict[int, frozenset[int]] = {
    DataType.PSK_INIT: frozenset({_T.T, _T.RAND, _T.ID, _T.SP, _T.KEMAC, _EXT}),
    DataType.PSK_RESP: frozenset({_T.T, _T.ID, _T.V, _EXT}),
    DataType.PK_INIT: frozenset(
        {_T.T, _T.RAND, _T.ID, _T.CERT, _T.SP, _T.KEMAC, _T.CHASH, _T.PKE, _T.SIGN, _EXT}
    ),
    DataType.PK_RESP: frozenset({_T.T, _T.ID, _T.V, _EXT}),
    DataType.DH_INIT: frozenset({_T.T, _T.RAND, _T.ID, _T.CERT, _T.SP, _T.DH, _T.SIGN, _EXT}),
    DataType.DH_RESP: frozenset({_T.T, _T.ID, _T.CERT, _T.SP, _T.DH, _T.SIGN, _EXT}),
    DataType.ERROR: frozenset({_T.T, _T.ERR, _T.V, _T.SIGN, _T.SP, _T.ID, _T.IDR, _EXT}),
    DataType.DHHMAC_INIT: frozenset({_T.T, _T.RAND, _T.ID, _T.CERT, _T.SP, _T.DH, _T.KEMAC, _EXT}),
    DataType.DHHMAC_RESP: frozenset({_T.T, _T.ID, _T.CERT, _T.DH, _T.KEMAC, _EXT}),
    DataType.RSA_R_INIT: frozenset({_T.T, _T.RAND, _T.ID, _T.CERT, _T.SP, _T.SIGN, _EXT}),
    DataType.RSA_R_RESP: frozenset(
        {_T.T, _T.RAND, _T.ID, _T.CERT, _T.SP, _T.KEMAC, _T.PKE, _T.SIGN, _EXT}
    ),
    **TICKET_ALLOWED,
}


@dataclass(frozen=True)
class Message:
    """HDR plus payloads. ``wire`` and ``offsets`` are set by :meth:`decode` (the exact bytes
    received and where each payload starts); they do not take part in equality."""

    header: Header
    payloads: tuple[Payload, ...] = ()
    wire: bytes = field(default=b"", compare=False, repr=False)
    offsets: tuple[int, ...] = field(default=(), compare=False, repr=False)

    @property
    def data_type(self) -> int:
        return self.header.data_type

    def encode(self) -> bytes:
        return self.header.encode(first_type(self.payloads)) + encode_chain(
            self.payloads, with_first_payload=False
        )

    @classmethod
    def decode(cls, data: bytes) -> Message:
        """Decode a complete message; raise DecodeError for anything malformed."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("Message.decode takes bytes")
        data = bytes(data)
        r = Reader(data)
        header, first = Header.decode(r)
        allowed = ALLOWED_PAYLOADS.get(header.data_type, frozenset())
        try:
            name = DataType(header.data_type).name
        except ValueError:  # pragma: no cover - Header.decode only returns known types
            name = str(header.data_type)
        payloads = decode_chain(r, first, PAYLOAD_CLASSES, name, allowed)
        if not r.at_end():
            r.payload = payloads[-1].NAME if payloads else "HDR"
            raise r.error(f"{r.remaining()} trailing byte(s) after the last payload")
        offsets = []
        pos = len(data) - sum(len(p.raw) for p in payloads)
        for p in payloads:
            offsets.append(pos)
            pos += len(p.raw)
        return cls(header, tuple(payloads), data, tuple(offsets))

    # --- access ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Payload]:
        return iter(self.payloads)

    def all(self, cls: type[P]) -> list[P]:
        return [p for p in self.payloads if isinstance(p, cls)]

    def first(self, cls: type[P]) -> P | None:
        for p in self.payloads:
            if isinstance(p, cls):
                return p
        return None

    def one(self, cls: type[P]) -> P:
        """The single payload of a type; DecodeError if absent or repeated."""
        found = self.all(cls)
        if len(found) != 1:
            what = "missing" if not found else "repeated"
            raise DecodeError(cls.NAME, 0, f"{what} {cls.NAME} payload")
        return found[0]

    def offset_of(self, payload: Payload) -> int:
        """Offset of a decoded payload in ``wire`` (by identity)."""
        for p, off in zip(self.payloads, self.offsets, strict=True):
            if p is payload:
                return off
        raise ValueError("payload is not part of this decoded message")


def decode(data: bytes) -> Message:
    """Decode one MIKEY message (the codec's entry point)."""
    return Message.decode(data)
