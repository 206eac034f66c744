"""Typed views of composed MIKEY-TICKET messages: one per message kind, its payloads by
name (RFC 6043 4.2.1-4.2.3, 5.4).

GENERATED from ``kms.mikey.layout.LAYOUTS`` by ``python -m kms.mikey.layout``: edit
the table there, not this file. ``kms.mikey.compose.compose`` builds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from kms.mikey.constants import DataType
from kms.mikey.header import Header
from kms.mikey.message import Message
from kms.mikey.payloads import (
    Cert,
    Chash,
    Error,
    Kemac,
    Pke,
    SecurityPolicy,
    Sign,
    Timestamp,
    Verification,
)
from kms.mikey.ticket import Idr, RandR, Ticket, TicketPolicy


@dataclass(frozen=True, slots=True)
class RequestInitPsk:
    """REQUEST_INIT_PSK (RFC 6043 4.2.1)."""

    DATA_TYPE: ClassVar[DataType] = DataType.REQUEST_INIT_PSK

    msg: Message
    t: Timestamp
    rand_i: RandR
    idr_i: Idr | None
    idr_kms: Idr | None
    tp: TicketPolicy
    idr_psk: Idr | None
    v: Verification

    @property
    def hdr(self) -> Header:
        return self.msg.header


@dataclass(frozen=True, slots=True)
class RequestInitPk:
    """REQUEST_INIT_PK (RFC 6043 4.2.1)."""

    DATA_TYPE: ClassVar[DataType] = DataType.REQUEST_INIT_PK

    msg: Message
    t: Timestamp
    rand_i: RandR
    idr_i: Idr | None
    certs: tuple[Cert, ...]
    idr_kms: Idr | None
    tp: TicketPolicy
    chash: Chash | None
    pke: Pke
    sign: Sign

    @property
    def hdr(self) -> Header:
        return self.msg.header


@dataclass(frozen=True, slots=True)
class RequestResp:
    """REQUEST_RESP (RFC 6043 4.2.1)."""

    DATA_TYPE: ClassVar[DataType] = DataType.REQUEST_RESP

    msg: Message
    t: Timestamp
    idr_kms: Idr | None
    ticket: Ticket
    kemac: Kemac
    v: Verification

    @property
    def hdr(self) -> Header:
        return self.msg.header


@dataclass(frozen=True, slots=True)
class TransferInit:
    """TRANSFER_INIT (RFC 6043 4.2.2, 5.2)."""

    DATA_TYPE: ClassVar[DataType] = DataType.TRANSFER_INIT

    msg: Message
    t: Timestamp
    rand_i: RandR | None
    idr_i: Idr | None
    idr_r: Idr | None
    sps: tuple[SecurityPolicy, ...]
    ticket: Ticket | None
    kemac: Kemac | None
    v: Verification

    @property
    def hdr(self) -> Header:
        return self.msg.header


@dataclass(frozen=True, slots=True)
class TransferResp:
    """TRANSFER_RESP (RFC 6043 4.2.2, 5.2)."""

    DATA_TYPE: ClassVar[DataType] = DataType.TRANSFER_RESP

    msg: Message
    t: Timestamp
    rand_r: RandR | None
    idr_r: Idr | None
    rand_kms: RandR | None
    sps: tuple[SecurityPolicy, ...]
    kemac: Kemac | None
    v: Verification

    @property
    def hdr(self) -> Header:
        return self.msg.header


@dataclass(frozen=True, slots=True)
class ResolveInitPsk:
    """RESOLVE_INIT_PSK (RFC 6043 4.2.3)."""

    DATA_TYPE: ClassVar[DataType] = DataType.RESOLVE_INIT_PSK

    msg: Message
    t: Timestamp
    rand_r: RandR
    idr_r: Idr | None
    idr_kms: Idr | None
    ticket: Ticket
    idr_psk: Idr | None
    v: Verification

    @property
    def hdr(self) -> Header:
        return self.msg.header


@dataclass(frozen=True, slots=True)
class ResolveInitPk:
    """RESOLVE_INIT_PK (RFC 6043 4.2.3)."""

    DATA_TYPE: ClassVar[DataType] = DataType.RESOLVE_INIT_PK

    msg: Message
    t: Timestamp
    rand_r: RandR
    idr_r: Idr | None
    certs: tuple[Cert, ...]
    idr_kms: Idr | None
    ticket: Ticket
    chash: Chash | None
    pke: Pke
    sign: Sign

    @property
    def hdr(self) -> Header:
        return self.msg.header


@dataclass(frozen=True, slots=True)
class ResolveResp:
    """RESOLVE_RESP (RFC 6043 4.2.3)."""

    DATA_TYPE: ClassVar[DataType] = DataType.RESOLVE_RESP

    msg: Message
    t: Timestamp
    idr_kms: Idr | None
    kemac: Kemac
    idr_r: Idr | None
    rand_kms: RandR | None
    v: Verification

    @property
    def hdr(self) -> Header:
        return self.msg.header


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    """ERROR (RFC 6043 5.4, RFC 3830 5.1.2)."""

    DATA_TYPE: ClassVar[DataType] = DataType.ERROR

    msg: Message
    t: Timestamp
    errs: tuple[Error, ...]
    sps: tuple[SecurityPolicy, ...]
    v: Verification | None
    sign: Sign | None

    @property
    def hdr(self) -> Header:
        return self.msg.header


#: Any composed MIKEY-TICKET message.
View: TypeAlias = (
    RequestInitPsk
    | RequestInitPk
    | RequestResp
    | TransferInit
    | TransferResp
    | ResolveInitPsk
    | ResolveInitPk
    | ResolveResp
    | ErrorMessage
)

VIEWS: dict[DataType, type[View]] = {
    DataType.REQUEST_INIT_PSK: RequestInitPsk,
    DataType.REQUEST_INIT_PK: RequestInitPk,
    DataType.REQUEST_RESP: RequestResp,
    DataType.TRANSFER_INIT: TransferInit,
    DataType.TRANSFER_RESP: TransferResp,
    DataType.RESOLVE_INIT_PSK: ResolveInitPsk,
    DataType.RESOLVE_INIT_PK: ResolveInitPk,
    DataType.RESOLVE_RESP: ResolveResp,
    DataType.ERROR: ErrorMessage,
}

__all__ = [
    "ErrorMessage",
    "RequestInitPk",
    "RequestInitPsk",
    "RequestResp",
    "ResolveInitPk",
    "ResolveInitPsk",
    "ResolveResp",
    "TransferInit",
    "TransferResp",
    "VIEWS",
    "View",
]
