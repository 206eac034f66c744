"""Message composition rules of RFC 6043 (4.2.x, reference 5.1): order, roles, counts.

The decoder only checks that each payload *may* appear in a message type; this module checks
that a message is composed exactly as RFC 6043 lays it out, so that the KMS and endpoints can
take payloads by position and role without guessing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kms.mikey.constants import DataType, IdRole, PayloadType, RandRole
from kms.mikey.errors import DecodeError
from kms.mikey.header import EmptyMap
from kms.mikey.message import Message
from kms.mikey.payloads import Payload
from kms.mikey.ticket import Idr, RandR

_T = PayloadType


@dataclass(frozen=True)
class Slot:
    """One position of a composition: a payload type (and role), and how many may appear."""

    ptype: int
    role: int | None = None
    min: int = 1
    max: int = 1

    def matches(self, p: Payload) -> bool:
        if self.ptype != p.TYPE:
            return False
        if self.role is None:
            return True
        return isinstance(p, Idr | RandR) and p.role == self.role


def one(t: int, role: int | None = None) -> Slot:
    return Slot(t, role)


def opt(t: int, role: int | None = None) -> Slot:
    return Slot(t, role, 0, 1)


def many(t: int, role: int | None = None) -> Slot:
    return Slot(t, role, 0, 255)


_R = RandRole
_I = IdRole

COMPOSITIONS: dict[int, tuple[Slot, ...]] = {
    DataType.REQUEST_INIT_PSK: (
        one(_T.T), one(_T.RANDR, _R.RANDRI), opt(_T.IDR, _I.IDRI), opt(_T.IDR, _I.IDRKMS),
        one(_T.TP), opt(_T.IDR, _I.IDRPSK), one(_T.V),
    ),
    DataType.REQUEST_INIT_PK: (
        one(_T.T), one(_T.RANDR, _R.RANDRI), opt(_T.IDR, _I.IDRI), many(_T.CERT),
        opt(_T.IDR, _I.IDRKMS), one(_T.TP), opt(_T.CHASH), one(_T.PKE), one(_T.SIGN),
    ),
    DataType.REQUEST_RESP: (
        one(_T.T), opt(_T.IDR, _I.IDRKMS), one(_T.TICKET), one(_T.KEMAC), one(_T.V),
    ),
    DataType.TRANSFER_INIT: (
        one(_T.T), opt(_T.RANDR, _R.RANDRI), opt(_T.IDR, _I.IDRI), opt(_T.IDR, _I.IDRR),
        many(_T.SP), opt(_T.TICKET), opt(_T.KEMAC), one(_T.V),
    ),
    DataType.TRANSFER_RESP: (
        one(_T.T), opt(_T.RANDR, _R.RANDRR), opt(_T.IDR, _I.IDRR), opt(_T.RANDR, _R.RANDRKMS),
        many(_T.SP), opt(_T.KEMAC), one(_T.V),
    ),
    DataType.RESOLVE_INIT_PSK: (
        one(_T.T), one(_T.RANDR, _R.RANDRR), opt(_T.IDR, _I.IDRR), opt(_T.IDR, _I.IDRKMS),
        one(_T.TICKET), opt(_T.IDR, _I.IDRPSK), one(_T.V),
    ),
    DataType.RESOLVE_INIT_PK: (
        one(_T.T), one(_T.RANDR, _R.RANDRR), opt(_T.IDR, _I.IDRR), many(_T.CERT),
        opt(_T.IDR, _I.IDRKMS), one(_T.TICKET), opt(_T.CHASH), one(_T.PKE), one(_T.SIGN),
    ),
    DataType.RESOLVE_RESP: (
        one(_T.T), opt(_T.IDR, _I.IDRKMS), one(_T.KEMAC), opt(_T.IDR, _I.IDRR),
        opt(_T.RANDR, _R.RANDRKMS), one(_T.V),
    ),
    DataType.ERROR: (
        one(_T.T), Slot(_T.ERR, None, 1, 255), many(_T.SP), opt(_T.V), opt(_T.SIGN),
    ),
}  # fmt: skip

# Messages to and from the KMS handle no crypto sessions (RFC 6043 4.2.1.1, 4.2.3.1).
EMPTY_MAP_TYPES = frozenset(
    {
        DataType.REQUEST_INIT_PSK,
        DataType.REQUEST_INIT_PK,
        DataType.RESOLVE_INIT_PSK,
        DataType.RESOLVE_INIT_PK,
    }
)


def match(payloads: Sequence[Payload], slots: Sequence[Slot]) -> str | None:
    """None if ``payloads`` fit ``slots`` in order (greedy: slots are unambiguous), else why."""
    i = 0
    for slot in slots:
        n = 0
        while i < len(payloads) and n < slot.max and slot.matches(payloads[i]):
            i += 1
            n += 1
        if n < slot.min:
            what = payloads[i].NAME if i < len(payloads) else "end of message"
            return f"expected payload type {slot.ptype} at position {i + 1}, found {what}"
    if i != len(payloads):
        return f"unexpected {payloads[i].NAME} payload at position {i + 1}"
    return None


def check_composition(msg: Message) -> None:
    """Raise DecodeError unless ``msg`` is composed as RFC 6043 lays out its data type.

    General Extension payloads are ignored wherever they stand (RFC 3830 6.15).
    """
    slots = COMPOSITIONS.get(msg.data_type)
    if slots is None:
        raise DecodeError("HDR", 1, f"data type {msg.data_type} is not a MIKEY-TICKET message")
    body = [p for p in msg.payloads if p.TYPE != _T.GENERAL_EXT]
    why = match(body, slots)
    if why is not None:
        raise DecodeError("message", 0, why)
    if msg.data_type in EMPTY_MAP_TYPES and msg.header.cs_map != EmptyMap(0):
        raise DecodeError("HDR", 8, "#CS must be 0 with the Empty map in this message")
