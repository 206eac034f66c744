"""Hypothesis strategies for every MIKEY payload and message type, plus fixture loading.

Shared by the round-trip properties (test_codec_properties.py), the mutation tests
(test_codec_mutation.py) and the tshark cross-check. Every strategy yields values the
encoder accepts and whose decoding is canonical, so ``decode(encode(x)) == x``.
"""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import strategies as st

from kms.mikey.constants import (
    DH_VALUE_LENGTH,
    HASH_LENGTH,
    KEY_TYPES_WITH_SALT,
    MAC_LENGTH,
    TS_VALUE_LENGTH,
    DataType,
    DhGroup,
    GeneralExtType,
    HashFunc,
    KeyDataType,
    MacAlg,
    PayloadType,
    TsType,
)
from kms.mikey.header import (
    CsIdMap,
    EmptyMap,
    GenericIdEntry,
    GenericIdMap,
    Header,
    SrtpIdEntry,
    SrtpIdMap,
)
from kms.mikey.message import ALLOWED_PAYLOADS, Message
from kms.mikey.payloads import (
    Cert,
    Chash,
    Dh,
    Error,
    GeneralExtension,
    Id,
    Kemac,
    KeyData,
    KeyIdInfo,
    KvData,
    KvInterval,
    KvSpi,
    Payload,
    Pke,
    PolicyParam,
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

# --- hand-written fixtures (tests/vectors/messages) -----------------------------------

FIXTURE_DIR = Path(__file__).resolve().parent.parent / "vectors" / "messages"


def hex_text(text: str) -> bytes:
    """Bytes of a commented hex text: ``#`` starts a comment, whitespace is ignored."""
    digits = "".join(line.split("#", 1)[0] for line in text.splitlines())
    return bytes.fromhex(re.sub(r"\s+", "", digits))


def fixture(name: str) -> bytes:
    """The bytes of ``tests/vectors/messages/<name>.hex``."""
    return hex_text((FIXTURE_DIR / f"{name}.hex").read_text())


FIXTURE_NAMES: tuple[str, ...] = tuple(sorted(p.stem for p in FIXTURE_DIR.glob("*.hex")))

# --- small building blocks ------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


def blob(max_size: int = 24, min_size: int = 0) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=min_size, max_size=max_size)


mac_algs = st.sampled_from(list(MacAlg))
ts_types = st.sampled_from(list(TsType))


@st.composite
def mac_pair(draw: st.DrawFn) -> tuple[MacAlg, bytes]:
    alg = draw(mac_algs)
    n = MAC_LENGTH[alg]
    return alg, draw(blob(n, n))


@st.composite
def ts_pair(draw: st.DrawFn) -> tuple[TsType, bytes]:
    t = draw(ts_types)
    n = TS_VALUE_LENGTH[t]
    return t, draw(blob(n, n))


kv_data: st.SearchStrategy[KvData] = st.one_of(
    st.none(),
    st.builds(KvSpi, blob(8)),
    st.builds(KvInterval, blob(8), blob(8)),
)

# --- RFC 3830 payloads ----------------------------------------------------------------


@st.composite
def key_data(draw: st.DrawFn) -> KeyData:
    kt = draw(st.sampled_from(list(KeyDataType)))
    salt = draw(blob(16)) if kt in KEY_TYPES_WITH_SALT else None
    return KeyData(kt, draw(blob(32)), salt, draw(kv_data))


@st.composite
def kemac(draw: st.DrawFn) -> Kemac:
    alg, mac = draw(mac_pair())
    return Kemac(draw(u8), draw(blob(48)), alg, mac)


pke = st.builds(Pke, st.integers(0, 3), blob(40))


@st.composite
def dh(draw: st.DrawFn) -> Dh:
    g = draw(st.sampled_from(list(DhGroup)))
    n = DH_VALUE_LENGTH[g]
    return Dh(g, draw(blob(n, n)), draw(kv_data), reserved=draw(st.integers(0, 15)))


sign = st.builds(Sign, st.integers(0, 15), blob(40))


@st.composite
def timestamp(draw: st.DrawFn) -> Timestamp:
    t, v = draw(ts_pair())
    return Timestamp(t, v)


ident = st.builds(Id, u8, blob(32))
cert = st.builds(Cert, u8, blob(40))


@st.composite
def chash(draw: st.DrawFn) -> Chash:
    h = draw(st.sampled_from(list(HashFunc)))
    n = HASH_LENGTH[h]
    return Chash(h, draw(blob(n, n)))


@st.composite
def verification(draw: st.DrawFn) -> Verification:
    alg, mac = draw(mac_pair())
    return Verification(alg, mac)


policy_param = st.builds(PolicyParam, u8, blob(6))
security_policy = st.builds(SecurityPolicy, u8, u8, st.lists(policy_param, max_size=5).map(tuple))
rand = st.builds(Rand, blob(40))
error = st.builds(Error, u8, u16)


@st.composite
def general_extension(draw: st.DrawFn) -> GeneralExtension:
    t = draw(u8)
    if t == GeneralExtType.KEY_ID:
        data = KeyIdInfo(draw(u8), draw(blob(16))).encode()
    else:
        data = draw(blob(24))
    return GeneralExtension(t, data)


# --- RFC 6043 payloads ----------------------------------------------------------------


@st.composite
def tr(draw: st.DrawFn) -> Tr:
    t, v = draw(ts_pair())
    return Tr(draw(u8), t, v)


idr = st.builds(Idr, u8, u8, blob(32))
rand_r = st.builds(RandR, u8, blob(32))
tp_flags = st.integers(0, 0xFFF).map(lambda b: TpFlag(b << 5))

tp_data_payload: st.SearchStrategy[Payload] = st.one_of(idr, tr(), kemac())


@st.composite
def ticket_policy(draw: st.DrawFn) -> TicketPolicy:
    return TicketPolicy(
        ticket_type=draw(u16),
        subtype=draw(u8),
        version=draw(u8),
        prf_func=draw(st.integers(0, 0x7F)),
        flags=draw(tp_flags),
        payloads=tuple(draw(st.lists(tp_data_payload, max_size=4))),
        reserved=draw(st.integers(0, 0x1F)),
    )


@st.composite
def base_ticket_data(draw: st.DrawFn) -> BaseTicketData:
    psk = draw(st.none() | st.builds(Idr, st.just(4), u8, blob(16)))
    return BaseTicketData(
        draw(timestamp()), draw(rand), draw(kemac()), draw(verification()), psk, draw(blob(8))
    )


@st.composite
def initiator_data(draw: st.DrawFn) -> InitiatorData:
    return InitiatorData(
        draw(verification()),
        draw(verification()),
        draw(st.sampled_from([PayloadType.V, PayloadType.LAST])),
    )


@st.composite
def ticket(draw: st.DrawFn) -> Ticket:
    policy = draw(ticket_policy())
    if draw(st.booleans()):
        # A real MIKEY base ticket so that Ticket.base_ticket() has something to decode.
        policy = TicketPolicy(1, 1, 1, policy.prf_func, policy.flags, policy.payloads)
        td = draw(base_ticket_data()).encode()
    else:
        td = draw(blob(40))
        if (policy.ticket_type, policy.subtype, policy.version) == (1, 1, 1):
            # Arbitrary bytes are not a base ticket: do not label them as one.
            policy = TicketPolicy(1, 1, 2, policy.prf_func, policy.flags, policy.payloads)
    return Ticket(policy, td, draw(st.none() | initiator_data()))


# One strategy per payload type (every value of PayloadType except LAST).
PAYLOADS: dict[PayloadType, st.SearchStrategy[Payload]] = {
    PayloadType.KEMAC: kemac(),
    PayloadType.PKE: pke,
    PayloadType.DH: dh(),
    PayloadType.SIGN: sign,
    PayloadType.T: timestamp(),
    PayloadType.ID: ident,
    PayloadType.CERT: cert,
    PayloadType.CHASH: chash(),
    PayloadType.V: verification(),
    PayloadType.SP: security_policy,
    PayloadType.RAND: rand,
    PayloadType.ERR: error,
    PayloadType.TR: tr(),
    PayloadType.IDR: idr,
    PayloadType.RANDR: rand_r,
    PayloadType.TP: ticket_policy(),
    PayloadType.TICKET: ticket(),
    PayloadType.KEY_DATA: key_data(),
    PayloadType.GENERAL_EXT: general_extension(),
}

# --- HDR and messages -----------------------------------------------------------------

srtp_map = st.builds(
    SrtpIdMap, st.lists(st.builds(SrtpIdEntry, u8, u32, u32), max_size=4).map(tuple)
)
empty_map = st.builds(EmptyMap, u8)
generic_entry = st.builds(
    GenericIdEntry,
    u8,
    u8,
    st.booleans(),
    st.lists(u8, max_size=4).map(tuple),
    blob(10),
    blob(6),
)
generic_map = st.builds(GenericIdMap, st.lists(generic_entry, max_size=3).map(tuple))
cs_maps: st.SearchStrategy[CsIdMap] = st.one_of(srtp_map, empty_map, generic_map)


def header(data_type: st.SearchStrategy[int] | None = None) -> st.SearchStrategy[Header]:
    return st.builds(
        Header,
        data_type if data_type is not None else st.sampled_from(list(DataType)),
        u32,
        cs_maps,
        st.booleans(),
        st.integers(0, 0x7F),
    )


@st.composite
def message(draw: st.DrawFn, data_type: int | None = None) -> Message:
    """A message of ``data_type`` (any type if None) whose payloads are drawn from the types
    that message may carry; SIGN only in last position (it has no Next Payload field)."""
    dt = draw(st.sampled_from(list(DataType))) if data_type is None else DataType(data_type)
    allowed = sorted(ALLOWED_PAYLOADS[dt] - {PayloadType.SIGN})
    body = draw(
        st.lists(st.sampled_from(allowed).flatmap(lambda t: PAYLOADS[PayloadType(t)]), max_size=6)
    )
    if PayloadType.SIGN in ALLOWED_PAYLOADS[dt] and draw(st.booleans()):
        body.append(draw(sign))
    return Message(draw(header(st.just(int(dt)))), tuple(body))


messages: st.SearchStrategy[Message] = message()
