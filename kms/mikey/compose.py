"""Message composition rules of RFC 6043 (4.2.1-4.2.3, 5.4): order, roles, counts.

The decoder only checks that each payload *may* appear in a message type; this module checks
that a message is composed exactly as the layout table (``kms.mikey.layout``) lays it out and
returns the typed view (``kms.mikey.views``) holding each payload under its name, so that the
KMS and endpoints take payloads by name instead of scanning the message again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from kms.mikey.constants import DataType, PayloadType
from kms.mikey.errors import DecodeError
from kms.mikey.header import EmptyMap
from kms.mikey.layout import COMPOSITIONS, EMPTY_MAP_TYPES, Slot
from kms.mikey.message import Message
from kms.mikey.payloads import Payload
from kms.mikey.ticket import Idr, RandR
from kms.mikey.views import (
    VIEWS,
    RequestInitPk,
    RequestInitPsk,
    ResolveInitPk,
    ResolveInitPsk,
    View,
)

V = TypeVar("V", bound=View)


def _fits(slot: Slot, p: Payload) -> bool:
    if slot.ptype != p.TYPE:
        return False
    # IDR and RANDR carry a role (RFC 6043 6.6, 6.7); a slot with a role takes only that one.
    return slot.role is None or getattr(p, "role", None) == slot.role


def fill(payloads: Sequence[Payload], slots: Sequence[Slot]) -> dict[str, object] | str:
    """The payloads by slot name if they fit ``slots`` in order (greedy: slots are
    unambiguous), else why not."""
    found: dict[str, object] = {}
    i = 0
    for slot in slots:
        got: list[Payload] = []
        while i < len(payloads) and len(got) < slot.max and _fits(slot, payloads[i]):
            got.append(payloads[i])
            i += 1
        if len(got) < slot.min:
            what = payloads[i].NAME if i < len(payloads) else "end of message"
            return f"expected payload type {slot.ptype} at position {i + 1}, found {what}"
        found[slot.name] = tuple(got) if slot.repeated else (got[0] if got else None)
    if i != len(payloads):
        return f"unexpected {payloads[i].NAME} payload at position {i + 1}"
    return found


def compose(msg: Message) -> View:
    """The typed view of ``msg``; DecodeError unless it is composed as RFC 6043 lays out its
    data type.

    General Extension payloads are ignored wherever they stand (RFC 3830 6.15).
    """
    slots = COMPOSITIONS.get(msg.data_type)
    if slots is None:
        raise DecodeError("HDR", 1, f"data type {msg.data_type} is not a MIKEY-TICKET message")
    body = [p for p in msg.payloads if p.TYPE != PayloadType.GENERAL_EXT]
    got = fill(body, slots)
    if isinstance(got, str):
        raise DecodeError("message", 0, got)
    if msg.data_type in EMPTY_MAP_TYPES and msg.header.cs_map != EmptyMap(0):
        raise DecodeError("HDR", 8, "#CS must be 0 with the Empty map in this message")
    # The slots and the view's fields come from the same table entry (kms.mikey.layout), so
    # the keyword arguments are exactly the view's fields and of their types.
    return VIEWS[DataType(msg.data_type)](msg, **got)  # type: ignore[arg-type]


def compose_as(msg: Message, kind: type[V]) -> V:
    """:func:`compose` for a message that must be of one kind (DecodeError otherwise)."""
    if msg.data_type != kind.DATA_TYPE:
        raise DecodeError(
            "HDR", 1, f"expected {kind.DATA_TYPE.name}, got data type {msg.data_type}"
        )
    view = compose(msg)
    assert isinstance(view, kind)
    return view



#: The messages an endpoint (or a peer KMS) sends to a KMS (RFC 6043 4.2.1.1, 4.2.3.1).
RequestInit = RequestInitPsk | RequestInitPk
ResolveInit = ResolveInitPsk | ResolveInitPk
InitialMessage = RequestInitPsk | RequestInitPk | ResolveInitPsk | ResolveInitPk


def sender_of(v: InitialMessage) -> tuple[Idr | None, RandR]:
    """The sender's own IDR and RANDR: IDRi and RANDRi in a REQUEST_INIT, IDRr and RANDRr in
    a RESOLVE_INIT (RFC 6043 4.2.1.1, 4.2.3.1)."""
    if isinstance(v, RequestInitPsk | RequestInitPk):
        return v.idr_i, v.rand_i
    return v.idr_r, v.rand_r
