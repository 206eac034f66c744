"""The payload layout of every MIKEY-TICKET message (RFC 6043 4.2.1-4.2.3, 5.4): the one table.

Each message kind is an ordered tuple of slots: a payload type, its role (IDR and RANDR carry
one), how many may appear and the name the payload gets in the message's typed view. From this
table come

* the composition check (``kms.mikey.compose``: order, roles, counts),
* the payloads the decoder lets into each MIKEY-TICKET message (``TICKET_ALLOWED``, used by
  ``kms.mikey.message``), and
* the typed views (``kms.mikey.views``, generated from :data:`LAYOUTS` by
  :func:`render_views`; ``tests/mikey/test_views.py`` fails when the two differ).

Regenerate the views after editing the table::

    python -m kms.mikey.layout > kms/mikey/views.py

This module depends on the constants only, so that every other codec module may import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kms.mikey.constants import DataType, IdRole, PayloadType, RandRole

_T = PayloadType
_R = RandRole
_I = IdRole


@dataclass(frozen=True)
class Slot:
    """One position of a composition: a named payload (type and role) and how many may
    appear (1..1 required, 0..1 optional, 0..255 a list)."""

    name: str
    ptype: PayloadType
    role: int | None = None
    min: int = 1
    max: int = 1

    @property
    def repeated(self) -> bool:
        return self.max > 1


def one(name: str, t: PayloadType, role: int | None = None) -> Slot:
    return Slot(name, t, role)


def opt(name: str, t: PayloadType, role: int | None = None) -> Slot:
    return Slot(name, t, role, 0, 1)


def many(name: str, t: PayloadType, role: int | None = None, least: int = 0) -> Slot:
    return Slot(name, t, role, least, 255)


@dataclass(frozen=True)
class Layout:
    """A message kind: its data type, the name of its view class, where the RFC lays it out."""

    data_type: DataType
    view: str
    rfc: str
    slots: tuple[Slot, ...]


LAYOUTS: tuple[Layout, ...] = (
    Layout(DataType.REQUEST_INIT_PSK, "RequestInitPsk", "RFC 6043 4.2.1", (
        one("t", _T.T), one("rand_i", _T.RANDR, _R.RANDRI), opt("idr_i", _T.IDR, _I.IDRI),
        opt("idr_kms", _T.IDR, _I.IDRKMS), one("tp", _T.TP), opt("idr_psk", _T.IDR, _I.IDRPSK),
        one("v", _T.V),
    )),
    Layout(DataType.REQUEST_INIT_PK, "RequestInitPk", "RFC 6043 4.2.1", (
        one("t", _T.T), one("rand_i", _T.RANDR, _R.RANDRI), opt("idr_i", _T.IDR, _I.IDRI),
        many("certs", _T.CERT), opt("idr_kms", _T.IDR, _I.IDRKMS), one("tp", _T.TP),
        opt("chash", _T.CHASH), one("pke", _T.PKE), one("sign", _T.SIGN),
    )),
    Layout(DataType.REQUEST_RESP, "RequestResp", "RFC 6043 4.2.1", (
        one("t", _T.T), opt("idr_kms", _T.IDR, _I.IDRKMS), one("ticket", _T.TICKET),
        one("kemac", _T.KEMAC), one("v", _T.V),
    )),
    Layout(DataType.TRANSFER_INIT, "TransferInit", "RFC 6043 4.2.2, 5.2", (
        one("t", _T.T), opt("rand_i", _T.RANDR, _R.RANDRI), opt("idr_i", _T.IDR, _I.IDRI),
        opt("idr_r", _T.IDR, _I.IDRR), many("sps", _T.SP), opt("ticket", _T.TICKET),
        opt("kemac", _T.KEMAC), one("v", _T.V),
    )),
    Layout(DataType.TRANSFER_RESP, "TransferResp", "RFC 6043 4.2.2, 5.2", (
        one("t", _T.T), opt("rand_r", _T.RANDR, _R.RANDRR), opt("idr_r", _T.IDR, _I.IDRR),
        opt("rand_kms", _T.RANDR, _R.RANDRKMS), many("sps", _T.SP), opt("kemac", _T.KEMAC),
        one("v", _T.V),
    )),
    Layout(DataType.RESOLVE_INIT_PSK, "ResolveInitPsk", "RFC 6043 4.2.3", (
        one("t", _T.T), one("rand_r", _T.RANDR, _R.RANDRR), opt("idr_r", _T.IDR, _I.IDRR),
        opt("idr_kms", _T.IDR, _I.IDRKMS), one("ticket", _T.TICKET),
        opt("idr_psk", _T.IDR, _I.IDRPSK), one("v", _T.V),
    )),
    Layout(DataType.RESOLVE_INIT_PK, "ResolveInitPk", "RFC 6043 4.2.3", (
        one("t", _T.T), one("rand_r", _T.RANDR, _R.RANDRR), opt("idr_r", _T.IDR, _I.IDRR),
        many("certs", _T.CERT), opt("idr_kms", _T.IDR, _I.IDRKMS), one("ticket", _T.TICKET),
        opt("chash", _T.CHASH), one("pke", _T.PKE), one("sign", _T.SIGN),
    )),
    Layout(DataType.RESOLVE_RESP, "ResolveResp", "RFC 6043 4.2.3", (
        one("t", _T.T), opt("idr_kms", _T.IDR, _I.IDRKMS), one("kemac", _T.KEMAC),
        opt("idr_r", _T.IDR, _I.IDRR), opt("rand_kms", _T.RANDR, _R.RANDRKMS), one("v", _T.V),
    )),
    Layout(DataType.ERROR, "ErrorMessage", "RFC 6043 5.4, RFC 3830 5.1.2", (
        one("t", _T.T), many("errs", _T.ERR, least=1), many("sps", _T.SP), opt("v", _T.V),
        opt("sign", _T.SIGN),
    )),
)  # fmt: skip

#: The slots of each data type, in order.
COMPOSITIONS: dict[int, tuple[Slot, ...]] = {lay.data_type: lay.slots for lay in LAYOUTS}

#: The payload types each MIKEY-TICKET message may carry: those of its slots, plus General
#: Extensions, which may extend any message (RFC 3830 6.15). The error message is left out:
#: its decoder table is RFC 3830's, which also admits ID and IDR.
TICKET_ALLOWED: dict[int, frozenset[int]] = {
    lay.data_type: frozenset({*(s.ptype for s in lay.slots), _T.GENERAL_EXT})
    for lay in LAYOUTS
    if lay.data_type != DataType.ERROR
}

# Messages to and from the KMS handle no crypto sessions (RFC 6043 4.2.1.1, 4.2.3.1).
EMPTY_MAP_TYPES = frozenset(
    {
        DataType.REQUEST_INIT_PSK,
        DataType.REQUEST_INIT_PK,
        DataType.RESOLVE_INIT_PSK,
        DataType.RESOLVE_INIT_PK,
    }
)


# --- the typed views, rendered as source ---------------------------------------------------


def render_views(classes: Mapping[int, type]) -> str:
    """Source of ``kms.mikey.views``: one frozen dataclass per :data:`LAYOUTS` entry whose
    fields are the slots (``X`` required, ``X | None`` optional, ``tuple[X, ...]`` repeated),
    ``classes`` mapping each payload type to its class."""
    used = sorted(
        {(classes[s.ptype].__module__, classes[s.ptype].__name__) for lay in LAYOUTS
         for s in lay.slots}
    )  # fmt: skip
    modules = sorted({m for m, _ in used})
    out = [
        '"""Typed views of composed MIKEY-TICKET messages: one per message kind, its payloads by',
        "name (RFC 6043 4.2.1-4.2.3, 5.4).",
        "",
        "GENERATED from ``kms.mikey.layout.LAYOUTS`` by ``python -m kms.mikey.layout``: edit",
        "the table there, not this file. ``kms.mikey.compose.compose`` builds them.",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "from dataclasses import dataclass",
        "from typing import ClassVar, TypeAlias",
        "",
        "from kms.mikey.constants import DataType",
        "from kms.mikey.header import Header",
        "from kms.mikey.message import Message",
    ]
    for m in modules:
        names = [n for mod, n in used if mod == m]
        line = f"from {m} import {', '.join(names)}"
        if len(line) <= 100:
            out.append(line)
        else:
            out += [f"from {m} import (", *(f"    {n}," for n in names), ")"]
    for lay in LAYOUTS:
        out += [
            "",
            "",
            "@dataclass(frozen=True, slots=True)",
            f"class {lay.view}:",
            f'    """{lay.data_type.name} ({lay.rfc})."""',
            "",
            f"    DATA_TYPE: ClassVar[DataType] = DataType.{lay.data_type.name}",
            "",
            "    msg: Message",
        ]
        for s in lay.slots:
            cls = classes[s.ptype].__name__
            kind = f"tuple[{cls}, ...]" if s.repeated else cls if s.min else f"{cls} | None"
            out.append(f"    {s.name}: {kind}")
        out += [
            "",
            "    @property",
            "    def hdr(self) -> Header:",
            "        return self.msg.header",
        ]
    names = [lay.view for lay in LAYOUTS]
    out += ["", "", "#: Any composed MIKEY-TICKET message.", "View: TypeAlias = ("]
    out += [f"    {'| ' if i else ''}{n}" for i, n in enumerate(names)]
    out += [")", ""]
    out.append("VIEWS: dict[DataType, type[View]] = {")
    out += [f"    DataType.{lay.data_type.name}: {lay.view}," for lay in LAYOUTS]
    out += ["}", "", "__all__ = ["]
    out += [f'    "{n}",' for n in sorted([*names, "VIEWS", "View"])]
    out += ["]", ""]
    return "\n".join(out)


if __name__ == "__main__":
    from kms.mikey.catalog import PAYLOAD_CLASSES

    print(render_views(PAYLOAD_CLASSES), end="")
