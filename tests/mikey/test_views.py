"""Typed message views (kms.mikey.views) and the one layout table they come from."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kms.mikey.catalog import PAYLOAD_CLASSES
from kms.mikey.compose import compose, compose_as, sender_of
from kms.mikey.constants import DataType, IdRole, PayloadType, RandRole
from kms.mikey.errors import DecodeError
from kms.mikey.layout import COMPOSITIONS, LAYOUTS, TICKET_ALLOWED, render_views
from kms.mikey.message import ALLOWED_PAYLOADS, Message
from kms.mikey.payloads import GeneralExtension, Payload
from kms.mikey.ticket import Idr, RandR
from kms.mikey.views import (
    VIEWS,
    ErrorMessage,
    RequestInitPsk,
    RequestResp,
    ResolveInitPk,
    ResolveInitPsk,
    TransferInit,
    TransferResp,
    View,
)
from tests.mikey import strategies as s

ROOT = Path(__file__).resolve().parents[2]

# Fixture -> the view class it composes to (the RFC 3830 messages have none).
TICKET_FIXTURES = {
    "request_init_psk": RequestInitPsk,
    "request_init_pk": VIEWS[DataType.REQUEST_INIT_PK],
    "request_resp": RequestResp,
    "transfer_init": TransferInit,
    "transfer_init_initiator_data": TransferInit,
    "transfer_resp": TransferResp,
    "resolve_init_psk": ResolveInitPsk,
    "resolve_init_pk": ResolveInitPk,
    "resolve_resp": VIEWS[DataType.RESOLVE_RESP],
    "error_request": ErrorMessage,
    "error_signed": ErrorMessage,
    "error_transfer": ErrorMessage,
}


def test_committed_views_match_the_layout_table() -> None:
    # views.py is generated: editing LAYOUTS without regenerating fails here.
    committed = (ROOT / "kms" / "mikey" / "views.py").read_text(encoding="utf-8")
    assert committed == render_views(PAYLOAD_CLASSES), (
        "kms/mikey/views.py is stale: python -m kms.mikey.layout > kms/mikey/views.py"
    )


def test_one_view_per_layout_with_the_slots_as_fields() -> None:
    assert [lay.data_type for lay in LAYOUTS] == list(VIEWS)
    for lay in LAYOUTS:
        cls = VIEWS[lay.data_type]
        assert cls.__name__ == lay.view and lay.data_type == cls.DATA_TYPE
        names = [f.name for f in dataclasses.fields(cls)]
        assert names == ["msg", *(slot.name for slot in lay.slots)]


def test_allowed_payloads_of_ticket_messages_come_from_the_table() -> None:
    for lay in LAYOUTS:
        if lay.data_type == DataType.ERROR:
            continue  # RFC 3830's table (also admits ID and IDR), not the layout
        expected = {slot.ptype for slot in lay.slots} | {PayloadType.GENERAL_EXT}
        assert ALLOWED_PAYLOADS[lay.data_type] == TICKET_ALLOWED[lay.data_type] == expected
    assert {PayloadType.ID, PayloadType.IDR} <= ALLOWED_PAYLOADS[DataType.ERROR]


def _flatten(view: View) -> list[Payload]:
    out: list[Payload] = []
    for slot in COMPOSITIONS[view.DATA_TYPE]:
        value = getattr(view, slot.name)
        if isinstance(value, tuple):
            out.extend(value)
        elif value is not None:
            out.append(value)
    return out


@pytest.mark.parametrize("name", sorted(TICKET_FIXTURES))
def test_fixture_views_hold_every_payload_by_name(name: str) -> None:
    msg = Message.decode(s.fixture(name))
    view = compose(msg)
    assert type(view) is TICKET_FIXTURES[name]
    assert view.msg is msg and view.hdr is msg.header
    body = [p for p in msg.payloads if not isinstance(p, GeneralExtension)]
    # Every payload lands in exactly one named field, in message order, each by identity.
    flat = _flatten(view)
    assert len(flat) == len(body) and all(a is b for a, b in zip(flat, body, strict=True))
    for slot in COMPOSITIONS[view.DATA_TYPE]:
        value = getattr(view, slot.name)
        for p in value if isinstance(value, tuple) else [value] if value is not None else []:
            assert slot.ptype == p.TYPE
            if slot.role is not None:
                assert isinstance(p, Idr | RandR) and p.role == slot.role


def test_request_init_fields_are_typed_by_role() -> None:
    view = compose_as(Message.decode(s.fixture("request_init_psk")), RequestInitPsk)
    assert view.rand_i.role == RandRole.RANDRI
    assert view.idr_i is not None and view.idr_i.role == IdRole.IDRI
    assert view.tp.TYPE == PayloadType.TP and view.v.TYPE == PayloadType.V
    idr, rand = sender_of(view)
    assert idr is view.idr_i and rand is view.rand_i


def test_resolve_init_sender_is_the_responder() -> None:
    view = compose(Message.decode(s.fixture("resolve_init_psk")))
    assert isinstance(view, ResolveInitPsk)
    idr, rand = sender_of(view)
    assert idr is view.idr_r and rand is view.rand_r and rand.role == RandRole.RANDRR


def test_compose_as_refuses_another_kind() -> None:
    msg = Message.decode(s.fixture("request_resp"))
    with pytest.raises(DecodeError, match="expected RESOLVE_RESP"):
        compose_as(msg, VIEWS[DataType.RESOLVE_RESP])
    assert compose_as(msg, RequestResp).ticket is not None


def test_a_misplaced_payload_is_refused_with_its_position() -> None:
    msg = Message.decode(s.fixture("request_init_psk"))
    swapped = Message(msg.header, (msg.payloads[1], msg.payloads[0], *msg.payloads[2:]))
    with pytest.raises(DecodeError, match="position 1"):
        compose(swapped)


def test_rfc3830_messages_have_no_view() -> None:
    with pytest.raises(DecodeError, match="not a MIKEY-TICKET message"):
        compose(Message.decode(s.fixture("psk_init")))
