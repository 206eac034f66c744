"""One-pass writers for what the KMS sends: REQUEST_RESP and RESOLVE_RESP (RFC 6043 4.2.1.5,
4.2.3.5) and the KEMAC's Key data chain (RFC 3830 6.2, 6.13), straight to bytes.

The dataclass codec (``Message(...).encode()``, :func:`kms.mikey.chain.encode_key_data`)
builds a frozen object per payload and a :class:`~kms.mikey.buffer.Writer` per payload body,
and a response is then sealed over its encoding. The KMS writes a response on every
exchange, so here the same bytes are written directly from the values: byte for byte what
the dataclass codec writes (tests/mikey/test_writer.py checks both against each other, the
decoder and tshark), with the same range checks (EncodeError).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kms.mikey.constants import (
    KEY_TYPES_WITH_SALT,
    MAC_LENGTH,
    MIKEY_VERSION,
    TS_VALUE_LENGTH,
    DataType,
    IdRole,
    IdType,
    MacAlg,
    PayloadType,
    TsType,
)
from kms.mikey.errors import EncodeError
from kms.mikey.header import Header
from kms.mikey.message import Message
from kms.mikey.payloads import KeyData, KvInterval, KvSpi

_KEY_DATA = int(PayloadType.KEY_DATA)
_V = int(PayloadType.V)
_SALTED = frozenset(int(t) for t in KEY_TYPES_WITH_SALT)


def _len8(value: bytes, what: str) -> bytes:
    if len(value) > 0xFF:
        raise EncodeError(f"{what} length must fit in 8 bits, got {len(value)}")
    return bytes((len(value),)) + value


def _len16(value: bytes, what: str) -> bytes:
    n = len(value)
    if n > 0xFFFF:
        raise EncodeError(f"{what} length must fit in 16 bits, got {n}")
    return bytes((n >> 8, n & 0xFF)) + value


def _u8(value: int, what: str) -> int:
    if not 0 <= value <= 0xFF:
        raise EncodeError(f"{what} must fit in 8 bits, got {value}")
    return value


def key_data_chain(keys: Sequence[KeyData]) -> bytes:
    """The KEMAC Encr data plaintext: Key data sub-payloads, NP 20 each, the last NP 0
    (RFC 3830 6.2, 6.13; RFC 6043 6.8). The bytes of
    :func:`kms.mikey.chain.encode_key_data`."""
    out: list[bytes] = []
    last = len(keys) - 1
    for i, k in enumerate(keys):
        key_type, kv, salt = k.key_type, k.kv, k.salt
        if (key_type in _SALTED) != (salt is not None):
            raise EncodeError("Key data: a salt is present exactly for the *+SALT key types")
        if not 0 <= key_type <= 15:
            raise EncodeError("Key data type must fit in 4 bits")
        if kv is None:
            kv_type, kv_bytes = 0, b""
        elif isinstance(kv, KvSpi):
            kv_type, kv_bytes = 1, _len8(kv.spi, "SPI")
        elif isinstance(kv, KvInterval):
            kv_type = 2
            kv_bytes = _len8(kv.valid_from, "Valid From") + _len8(kv.valid_to, "Valid To")
        else:  # pragma: no cover - KvData is one of the three
            raise EncodeError("unknown KV data")
        out.append(bytes((0 if i == last else _KEY_DATA, (key_type << 4) | kv_type)))
        out.append(_len16(k.key, "Key data"))
        if salt is not None:
            out.append(_len16(salt, "Salt data"))
        out.append(kv_bytes)
    return b"".join(out)


# --- payload bodies (the bytes after a payload's Next Payload field) ----------------------


def t_body(ts_type: int, value: bytes) -> bytes:
    """T: TS type | TS value (RFC 3830 6.6, RFC 6043 6.3)."""
    if ts_type not in TS_VALUE_LENGTH or len(value) != TS_VALUE_LENGTH[TsType(ts_type)]:
        raise EncodeError("T: TS value length does not match its TS type")
    return bytes((ts_type,)) + value


def idr_body(role: int, id_type: int, data: bytes) -> bytes:
    """IDR: ID Role | ID type | ID len | ID data (RFC 6043 6.6)."""
    return bytes((_u8(role, "ID Role"), _u8(id_type, "ID type"))) + _len16(data, "ID data")


def randr_body(role: int, value: bytes) -> bytes:
    """RANDR: RAND Role | RAND len | RAND (RFC 6043 6.11)."""
    return bytes((_u8(role, "RAND Role"),)) + _len8(value, "RAND")


def kemac_body(encr_alg: int, encr_data: bytes) -> bytes:
    """KEMAC with MAC alg NULL (RFC 3830 6.2; RFC 6043 6.2: integrity comes from V)."""
    return bytes((_u8(encr_alg, "Encr alg"),)) + _len16(encr_data, "Encr data") + b"\x00"


def ticket_body(policy_body: bytes, ticket_data: bytes) -> bytes:
    """TICKET without Initiator Data (RFC 6043 6.9): TP fields | Ticket Data length |
    Ticket Data | Initiator Data length 0."""
    return policy_body + _len16(ticket_data, "Ticket Data") + b"\x00\x00"


def base_ticket_head(
    ts_type: int,
    ts_value: bytes,
    rand: bytes,
    encr_alg: int,
    encr_data: bytes,
    idr_psk: bytes | None,
    mac_alg: MacAlg,
) -> bytes:
    """Ticket Data of a MIKEY base ticket up to its MAC (RFC 6043 A.1): THDR (no THDR Data),
    T, RAND, KEMAC (MAC alg NULL), [IDRpsk, ID type byte string], and V's Next Payload and
    Auth alg; the MAC (``MAC_LENGTH[mac_alg]`` bytes) follows."""
    if mac_alg not in MAC_LENGTH or mac_alg == MacAlg.NULL:
        raise EncodeError("V: a base ticket needs a MAC algorithm")
    after_kemac = PayloadType.IDR if idr_psk is not None else _V
    out = [
        bytes((PayloadType.T, 0, 0, PayloadType.RAND)),  # THDR: NP | THDR Data length 0
        t_body(ts_type, ts_value),
        bytes((PayloadType.KEMAC,)),
        _len8(rand, "RAND"),
        bytes((after_kemac,)),
        kemac_body(encr_alg, encr_data),
    ]
    if idr_psk is not None:
        out.append(bytes((_V,)))
        out.append(idr_body(IdRole.IDRPSK, IdType.BYTE_STRING, idr_psk))
    out.append(bytes((0, mac_alg)))
    return b"".join(out)


# --- a whole response ---------------------------------------------------------------------


def response_header(request: Message, data_type: DataType, first: int) -> bytes:
    """The response's HDR (RFC 6043 4.2.1.5 / 4.2.3.5): the request's version, PRF func, CSB
    ID, #CS and CS ID map, V flag 0. The map is copied from the bytes received (they are
    what re-encoding the decoded map gives)."""
    h = request.header
    if not 0 <= h.prf_func <= 0x7F:
        raise EncodeError("HDR PRF func must fit in 7 bits")
    head = bytes((h.version, data_type, first, h.prf_func))
    wire, offsets = request.wire, request.offsets
    if wire and offsets and h.version == MIKEY_VERSION:
        return head + wire[4 : offsets[0]]  # CSB ID | #CS | map type | map info
    return Header(data_type, h.csb_id, h.cs_map, False, h.prf_func, h.version).encode(first)


def sealed_response(
    request: Message,
    data_type: DataType,
    parts: Sequence[tuple[int, bytes]],
    mac_alg: MacAlg,
    mac: Callable[[bytes], bytes],
    extra: bytes,
) -> bytes:
    """HDR, the payloads ``parts`` ((type, body), in order) and a V whose MAC is
    ``mac(covered bytes || extra)`` (RFC 6043 5.4: the response || the initial message), as
    bytes. The same bytes as building the Message with a placeholder V and sealing it
    (:func:`kms.mikey.coverage.seal_wire`)."""
    if mac_alg not in MAC_LENGTH or mac_alg == MacAlg.NULL:
        raise EncodeError("V: a response needs a MAC algorithm")
    n = MAC_LENGTH[MacAlg(mac_alg)]
    types = [t for t, _ in parts] + [_V]
    out = [response_header(request, data_type, types[0])]
    for i, (_, body) in enumerate(parts):
        out.append(bytes((types[i + 1],)))
        out.append(body)
    out.append(bytes((0, mac_alg)))  # V: Next Payload 0 (last) | Auth alg
    covered = b"".join(out)
    value = mac(covered + extra)
    if len(value) != n:
        raise EncodeError("MAC/signature length differs from the placeholder's")
    return covered + value


__all__ = [
    "base_ticket_head",
    "idr_body",
    "kemac_body",
    "key_data_chain",
    "randr_body",
    "response_header",
    "sealed_response",
    "t_body",
    "ticket_body",
]
