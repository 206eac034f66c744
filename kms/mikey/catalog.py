"""Every payload class by its Next Payload type (RFC 3830 6.1 T6.1.b, RFC 6043 6.1 T6.2)."""

from __future__ import annotations

from kms.mikey.chain import ClassMap
from kms.mikey.payloads import (
    Cert,
    Chash,
    Dh,
    Error,
    GeneralExtension,
    Id,
    Kemac,
    KeyData,
    Pke,
    Rand,
    SecurityPolicy,
    Sign,
    Timestamp,
    Verification,
)
from kms.mikey.ticket import Idr, RandR, Ticket, TicketPolicy, Tr

PAYLOAD_CLASSES: ClassMap = {
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
