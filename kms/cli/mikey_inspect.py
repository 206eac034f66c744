"""Render a decoded MIKEY message for people (an indented tree) and tools (JSON).

Pure functions: a :class:`~kms.mikey.message.Message` in, text or a JSON-ready dict out.
Payload and field names follow the RFC 3830 / RFC 6043 diagrams ("HDR", "CSB ID", "TP Data",
"Ticket Data", ...). Numbered fields show the registry name and the number, e.g.
``data type: REQUEST_INIT_PSK (11)``; bytes show as hex. Nested structures are decoded where
the codec can (KEMAC Encr data under NULL encryption, a MIKEY base ticket's Ticket Data,
Initiator Data, a Key ID extension); when they do not decode, the reason is shown instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeAlias

from kms.mikey.catalog import PAYLOAD_CLASSES
from kms.mikey.chain import decode_key_data, encode_chain
from kms.mikey.constants import (
    CertType,
    CsIdMapType,
    DataType,
    DhGroup,
    EncrAlg,
    ErrorNo,
    GeneralExtType,
    HashFunc,
    IdRole,
    IdType,
    KeyDataType,
    KvType,
    MacAlg,
    PayloadType,
    PrfFunc,
    ProtType,
    RandRole,
    SignType,
    SrtpParam,
    TicketType,
    TsRole,
    TsType,
)
from kms.mikey.errors import DecodeError
from kms.mikey.header import EmptyMap, GenericIdMap, Header, SrtpIdMap
from kms.mikey.message import Message
from kms.mikey.payloads import (
    Cert,
    Chash,
    Dh,
    Error,
    GeneralExtension,
    Id,
    Kemac,
    KeyData,
    KvData,
    KvInterval,
    KvSpi,
    Payload,
    Pke,
    Rand,
    SecurityPolicy,
    Sign,
    Timestamp,
    Verification,
)
from kms.mikey.ticket import (
    BaseTicketData,
    Idr,
    InitiatorData,
    RandR,
    Ticket,
    TicketPolicy,
    TpFlag,
    Tr,
)

JsonValue: TypeAlias = "bool | int | str | list[JsonValue] | dict[str, JsonValue] | None"

# Names as the RFC tables print them, where they differ from the enum member names.
_NAMES: dict[type[IntEnum], dict[int, str]] = {
    CsIdMapType: {0: "SRTP-ID", 1: "Empty map", 2: "GENERIC-ID"},
    EncrAlg: {0: "NULL", 1: "AES-CM-128", 2: "AES-KW-128", 3: "AES-CM-256"},
    MacAlg: {0: "NULL", 1: "HMAC-SHA-1-160", 2: "HMAC-SHA-256-256"},
    KeyDataType: {
        0: "TGK",
        1: "TGK+SALT",
        2: "TEK",
        3: "TEK+SALT",
        4: "GTGK",
        5: "GTGK+SALT",
        6: "MPK",
    },
    KvType: {0: "Null", 1: "SPI/MKI", 2: "Interval"},
    TsType: {0: "NTP-UTC", 1: "NTP", 2: "COUNTER", 3: "NTP-UTC-32"},
    IdType: {0: "NAI", 1: "URI", 2: "Byte string"},
    CertType: {0: "X.509v3", 1: "X.509v3 URL", 2: "X.509v3 Sign", 3: "X.509v3 Encr"},
    HashFunc: {0: "SHA-1", 1: "MD5", 2: "SHA-256"},
    SignType: {0: "RSA/PKCS#1/1.5", 1: "RSA/PSS"},
    DhGroup: {0: "OAKLEY 5", 1: "OAKLEY 1", 2: "OAKLEY 2"},
    PrfFunc: {0: "MIKEY-1", 1: "PRF-HMAC-SHA-256"},
    ProtType: {0: "SRTP"},
    TsRole: {1: "TRi", 2: "TRs", 3: "TRe", 4: "TRr"},
    IdRole: {1: "IDRi", 2: "IDRr", 3: "IDRkms", 4: "IDRpsk", 5: "IDRapp"},
    RandRole: {1: "RANDRi", 2: "RANDRr", 3: "RANDRkms"},
    TicketType: {1: "MIKEY base ticket", 2: "3GPP base ticket"},
    ErrorNo: {
        0: "Auth failure",
        1: "Invalid TS",
        2: "Invalid PRF",
        3: "Invalid MAC",
        4: "Invalid EA",
        5: "Invalid HA",
        6: "Invalid DH",
        7: "Invalid ID",
        8: "Invalid Cert",
        9: "Invalid SP",
        10: "Invalid SPpar",
        11: "Invalid DT",
        12: "Unspecified error",
        13: "Unsupported message type",
        14: "Invalid TICKET",
        15: "Invalid TPpar",
    },
    GeneralExtType: {0: "Vendor ID", 1: "SDP IDs", 2: "TESLA I-Key", 3: "Key ID", 4: "CSB_ID"},
    SrtpParam: {
        0: "Encryption algorithm",
        1: "Session Encr. key length",
        2: "Authentication algorithm",
        3: "Session Auth. key length",
        4: "Session Salt key length",
        5: "SRTP Pseudo Random Function",
        6: "Key derivation rate",
        7: "SRTP encryption off/on",
        8: "SRTCP encryption off/on",
        9: "sender's FEC order",
        10: "SRTP authentication off/on",
        11: "Authentication tag length",
        12: "SRTP prefix length",
    },
}


@dataclass(frozen=True)
class Node:
    """One entry of both renderings.

    ``name`` is the JSON key (an RFC field name); ``label`` overrides it in the tree (e.g.
    ``RAND (16 bytes)``). A leaf shows ``label: text`` in the tree and ``value`` in JSON; a
    leaf without ``text`` is JSON-only. With children, the JSON form is an object, or with
    ``as_list`` a list of the children's forms; a ``flat`` list has no heading in the tree.
    """

    name: str
    text: str | None = None
    value: JsonValue = None
    children: tuple[Node, ...] = ()
    as_list: bool = False
    flat: bool = False
    label: str | None = None


def _group(name: str, children: list[Node], label: str | None = None) -> Node:
    return Node(name, children=tuple(children), label=label)


def _list(name: str, children: list[Node], label: str | None = None, flat: bool = False) -> Node:
    return Node(name, children=tuple(children), as_list=True, flat=flat, label=label)


# --- leaf helpers ---------------------------------------------------------------------


def enum_name(enum: type[IntEnum], value: int) -> str | None:
    """The RFC's name for a registry value, None when the value is unknown."""
    names = _NAMES.get(enum)
    if names is not None and value in names:
        return names[value]
    try:
        return enum(value).name
    except ValueError:
        return None


def _enum(name: str, enum: type[IntEnum], value: int) -> Node:
    label = enum_name(enum, value)
    text = f"{label} ({value})" if label else f"unknown ({value})"
    return Node(name, text, {"value": int(value), "name": label})


def _int(name: str, value: int) -> Node:
    return Node(name, str(value), value)


def _hex32(name: str, value: int) -> Node:
    return Node(name, f"0x{value:08x}", f"{value:08x}")


def _bytes(name: str, data: bytes, *, text: bool = False) -> Node:
    """Bytes as hex; identities also as text when printable."""
    shown = data.hex() if data else "(empty)"
    if text and data and all(0x20 <= b < 0x7F for b in data):
        shown = f'{data.hex()} ("{data.decode("ascii")}")'
    return Node(name, shown, data.hex(), label=f"{name} ({len(data)} bytes)")


def _flag(name: str, value: bool) -> Node:
    return Node(name, "1" if value else "0", value)


def _error(name: str, err: DecodeError) -> Node:
    return Node(name, f"not decodable: {err}", {"error": str(err)})


def _next(t: int, name: str = "next payload") -> Node:
    label = (
        "Last payload"
        if t == PayloadType.LAST
        else (PAYLOAD_CLASSES[t].NAME if t in PAYLOAD_CLASSES else None)
    )
    text = f"{label} ({t})" if label else f"unknown ({t})"
    return Node(name, text, {"value": t, "name": label})


# --- payloads -------------------------------------------------------------------------


def _kv(kv: KvData) -> list[Node]:
    if isinstance(kv, KvSpi):
        return [_int("SPI length", len(kv.spi)), _bytes("SPI", kv.spi)]
    if isinstance(kv, KvInterval):
        return [
            _int("VF length", len(kv.valid_from)),
            _bytes("Valid From", kv.valid_from),
            _int("VT length", len(kv.valid_to)),
            _bytes("Valid To", kv.valid_to),
        ]
    return []


def _key_data(k: KeyData) -> list[Node]:
    out = [
        _enum("Type", KeyDataType, k.key_type),
        _enum("KV", KvType, k.kv_type),
        _int("Key data len", len(k.key)),
        _bytes("Key data", k.key),
    ]
    if k.salt is not None:
        out += [_int("Salt len", len(k.salt)), _bytes("Salt data", k.salt)]
    return out + _kv(k.kv)


def _kemac(p: Kemac) -> list[Node]:
    out = [_enum("Encr alg", EncrAlg, p.encr_alg), _int("Encr data len", len(p.encr_data))]
    encr = _bytes("Encr data", p.encr_data)
    if p.encr_alg == EncrAlg.NULL and p.encr_data:
        # NULL encryption: the Encr data is the Key data chain in clear
        try:
            keys = decode_key_data(p.encr_data)
        except DecodeError as e:
            out += [encr, _error("Key data", e)]
        else:
            items = _chain(keys)
            out.append(_list("Encr data", items, label=f"Encr data ({len(p.encr_data)} bytes)"))
    else:
        out.append(encr)
    return [*out, _enum("MAC alg", MacAlg, p.mac_alg), _bytes("MAC", p.mac)]


def _ts(ts_type: int, value: bytes) -> list[Node]:
    return [_enum("TS type", TsType, ts_type), _bytes("TS value", value)]


def _flags(flags: TpFlag) -> Node:
    names = [f.name for f in TpFlag if f.name is not None and flags & f]
    return Node("flags", " ".join(names) if names else "(none)", list[JsonValue](names))


def _policy_fields(p: TicketPolicy) -> list[Node]:
    first = p.payloads[0].TYPE if p.payloads else PayloadType.LAST
    tp_data = [_next(first, "First Payload"), _list("payloads", _chain(p.payloads), flat=True)]
    return [
        _enum("Ticket Type", TicketType, p.ticket_type),
        _int("Subtype", p.subtype),
        _int("Version", p.version),
        _enum("PRF Func", PrfFunc, p.prf_func),
        _flags(p.flags),
        _int("Reserved", p.reserved),
        _int("TP Data length", len(encode_chain(p.payloads, with_first_payload=True))),
        _group("TP Data", tp_data),
    ]


def _base_ticket(b: BaseTicketData) -> Node:
    thdr = _group(
        "THDR",
        [
            _next(PayloadType.T),
            _int("THDR Data length", len(b.thdr_data)),
            _bytes("THDR Data", b.thdr_data),
        ],
    )
    return _group("MIKEY base ticket", [thdr, _list("payloads", _chain(b.payloads()), flat=True)])


def _verification(v: Verification) -> list[Node]:
    return [_enum("Auth alg", MacAlg, v.mac_alg), _bytes("Ver data", v.mac)]


def _initiator_data(i: InitiatorData) -> Node:
    return _group(
        "Initiator Data",
        [
            _next(PayloadType.V, "First Payload"),
            _group("Vi", [_next(i.vi_next_payload), *_verification(i.vi)]),
            _group("Vr", [_next(PayloadType.LAST), *_verification(i.vr)]),
        ],
    )


def _ticket(t: Ticket) -> list[Node]:
    out = _policy_fields(t.policy)
    out.append(_int("Ticket Data length", len(t.ticket_data)))
    td = _bytes("Ticket Data", t.ticket_data)
    p = t.policy
    if (p.ticket_type, p.subtype, p.version) == (TicketType.MIKEY_BASE_TICKET, 1, 1):
        try:
            decoded = _base_ticket(t.base_ticket())
        except DecodeError as e:
            decoded = _error("MIKEY base ticket", e)
        td = _group("Ticket Data", [Node("hex", td.text, td.value), decoded], label=td.label)
    out.append(td)
    if t.initiator_data is None:
        out.append(_int("Initiator Data length", 0))
    else:
        out.append(_int("Initiator Data length", len(t.initiator_data.encode())))
        out.append(_initiator_data(t.initiator_data))
    return out


def _general_ext(p: GeneralExtension) -> list[Node]:
    out = [
        _enum("Type", GeneralExtType, p.ext_type),
        _int("Length", len(p.data)),
        _bytes("Data", p.data, text=True),
    ]
    if p.ext_type == GeneralExtType.KEY_ID:
        try:
            kid = p.key_id
        except DecodeError as e:
            out.append(_error("Key ID information", e))
        else:
            assert kid is not None
            out.append(
                _group(
                    "Key ID information",
                    [
                        _int("Key ID Type", kid.key_id_type),
                        _int("Key ID len", len(kid.key_id)),
                        _bytes("Key ID", kid.key_id),
                    ],
                )
            )
    return out


def _security_policy(p: SecurityPolicy) -> list[Node]:
    params = [
        _group(
            "param",
            [
                _enum("Type", SrtpParam, x.param_type)
                if p.prot_type == ProtType.SRTP
                else _int("Type", x.param_type),
                _int("Length", len(x.value)),
                _bytes("Value", x.value),
            ],
        )
        for x in p.params
    ]
    return [
        _int("Policy no", p.policy_no),
        _enum("Prot type", ProtType, p.prot_type),
        _int("Policy param length", sum(2 + len(x.value) for x in p.params)),
        _list("Policy param", params),
    ]


def _dh(p: Dh) -> list[Node]:
    kv_type = (
        KvType.NULL
        if p.kv is None
        else (KvType.SPI if isinstance(p.kv, KvSpi) else KvType.INTERVAL)
    )
    return [
        _enum("DH-Group", DhGroup, p.group),
        _bytes("DH-value", p.value),
        _int("Reserv", p.reserved),
        _enum("KV", KvType, kv_type),
        *_kv(p.kv),
    ]


def _fields(p: Payload) -> list[Node]:  # one branch per payload type
    if isinstance(p, Kemac):
        return _kemac(p)
    if isinstance(p, Timestamp):
        return _ts(p.ts_type, p.value)
    if isinstance(p, Rand):
        return [_int("RAND len", len(p.value)), _bytes("RAND", p.value)]
    if isinstance(p, Id):
        return [
            _enum("ID type", IdType, p.id_type),
            _int("ID len", len(p.data)),
            _bytes("ID data", p.data, text=True),
        ]
    if isinstance(p, Idr):
        return [
            _enum("ID Role", IdRole, p.role),
            _enum("ID type", IdType, p.id_type),
            _int("ID len", len(p.data)),
            _bytes("ID data", p.data, text=True),
        ]
    if isinstance(p, Tr):
        return [_enum("TS Role", TsRole, p.role), *_ts(p.ts_type, p.value)]
    if isinstance(p, RandR):
        return [
            _enum("RAND Role", RandRole, p.role),
            _int("RAND len", len(p.value)),
            _bytes("RAND", p.value),
        ]
    if isinstance(p, Verification):
        return _verification(p)
    if isinstance(p, SecurityPolicy):
        return _security_policy(p)
    if isinstance(p, Error):
        return [_enum("Error no", ErrorNo, p.error_no), _int("Reserved", p.reserved)]
    if isinstance(p, Ticket):
        return _ticket(p)
    if isinstance(p, TicketPolicy):
        return _policy_fields(p)
    if isinstance(p, Cert):
        return [
            _enum("Cert type", CertType, p.cert_type),
            _int("Cert len", len(p.data)),
            _bytes("Certificate", p.data),
        ]
    if isinstance(p, Chash):
        return [_enum("Hash func", HashFunc, p.hash_func), _bytes("Hash", p.digest)]
    if isinstance(p, Pke):
        return [_int("C", p.cache), _int("Data len", len(p.data)), _bytes("Data", p.data)]
    if isinstance(p, Sign):
        return [
            _enum("S type", SignType, p.sign_type),
            _int("Signature len", len(p.signature)),
            _bytes("Signature", p.signature),
        ]
    if isinstance(p, Dh):
        return _dh(p)
    if isinstance(p, GeneralExtension):
        return _general_ext(p)
    if isinstance(p, KeyData):
        return _key_data(p)
    return [_bytes("body", p.encode_body())]  # pragma: no cover - every type is listed


def _chain(payloads: Sequence[Payload], offsets: tuple[int, ...] = ()) -> list[Node]:
    out = []
    for i, p in enumerate(payloads):
        nxt = payloads[i + 1].TYPE if i + 1 < len(payloads) else PayloadType.LAST
        head = [Node("payload", None, p.NAME)]
        where = []
        if i < len(offsets):
            head.append(Node("offset", None, offsets[i]))
            where.append(f"offset {offsets[i]}")
        if p.raw:
            where.append(f"{len(p.raw)} bytes")
        if not isinstance(p, Sign):  # SIGN has no Next Payload field
            head.append(_next(nxt))
        label = f"{p.NAME} ({', '.join(where)})" if where else p.NAME
        out.append(_group(p.NAME, head + _fields(p), label=label))
    return out


# --- HDR and message --------------------------------------------------------------------


def _srtp_map(m: SrtpIdMap) -> list[Node]:
    return [
        _group(
            "SRTP-ID",
            [
                _int("CS ID", i),
                _int("Policy_no", e.policy_no),
                _hex32("SSRC", e.ssrc),
                _hex32("ROC", e.roc),
            ],
            label=f"SRTP-ID block (CS ID {i})",
        )
        for i, e in enumerate(m.entries, 1)
    ]


def _generic_map(m: GenericIdMap) -> list[Node]:
    return [
        _group(
            "GENERIC-ID",
            [
                _int("CS ID", g.cs_id),
                _enum("Prot type", ProtType, g.prot_type),
                _flag("S", g.s_flag),
                _int("#P", len(g.policy_nos)),
                Node(
                    "Policy no",
                    " ".join(map(str, g.policy_nos)) or "(none)",
                    list[JsonValue](g.policy_nos),
                ),
                _int("Session Data length", len(g.session_data)),
                _bytes("Session Data", g.session_data),
                _int("SPI length", len(g.spi)),
                _bytes("SPI", g.spi),
            ],
            label=f"GENERIC-ID block (CS ID {g.cs_id})",
        )
        for g in m.entries
    ]


def _header(h: Header, first: int) -> Node:
    m = h.cs_map
    fields = [
        _int("version", h.version),
        _enum("data type", DataType, h.data_type),
        _next(first),
        _flag("V", h.v_flag),
        _enum("PRF func", PrfFunc, h.prf_func),
        _hex32("CSB ID", h.csb_id),
        _int("#CS", h.cs_count),
        _enum("CS ID map type", CsIdMapType, m.MAP_TYPE),
    ]
    if isinstance(m, SrtpIdMap):
        fields.append(_list("CS ID map info", _srtp_map(m)))
    elif isinstance(m, GenericIdMap):
        fields.append(_list("CS ID map info", _generic_map(m)))
    else:
        assert isinstance(m, EmptyMap)
        fields.append(Node("CS ID map info", "(none)", []))
    return _group("HDR", fields)


def message_node(msg: Message) -> Node:
    """The whole message as nodes: the common form of the tree and the JSON."""
    first = msg.payloads[0].TYPE if msg.payloads else PayloadType.LAST
    size = len(msg.wire) if msg.wire else len(msg.encode())
    return _group(
        "MIKEY message",
        [
            Node("length", None, size),
            _header(msg.header, first),
            _list("payloads", _chain(msg.payloads, msg.offsets), flat=True),
        ],
        label=f"MIKEY message ({size} bytes)",
    )


def _tree_lines(n: Node, depth: int, indent: str, lines: list[str]) -> None:
    pad = indent * depth
    if not n.children:
        if n.text is not None:
            lines.append(f"{pad}{n.label or n.name}: {n.text}")
        return
    if n.flat:
        for c in n.children:
            _tree_lines(c, depth, indent, lines)
        return
    lines.append(f"{pad}{n.label or n.name}")
    for c in n.children:
        _tree_lines(c, depth + 1, indent, lines)


def render_tree(msg: Message, indent: str = "  ") -> str:
    """The indented text tree, one field per line, ending with a newline."""
    lines: list[str] = []
    _tree_lines(message_node(msg), 0, indent, lines)
    return "\n".join(lines) + "\n"


def _json(n: Node) -> JsonValue:
    if not n.children:
        return [] if n.as_list else n.value
    if n.as_list:
        return [_json(c) for c in n.children]
    return {c.name: _json(c) for c in n.children}


def to_json(msg: Message) -> dict[str, JsonValue]:
    """A JSON-ready dict with the same names as the tree; bytes as lowercase hex."""
    out = _json(message_node(msg))
    assert isinstance(out, dict)
    return out


__all__ = ["JsonValue", "Node", "enum_name", "message_node", "render_tree", "to_json"]
