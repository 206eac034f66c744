"""kms.mikey.writer writes byte for byte what the dataclass codec writes: the KEMAC's Key data
chain, REQUEST_RESP / RESOLVE_RESP sealed with their V (RFC 6043 4.2.1.5, 4.2.3.5, 5.4) and
the base ticket (RFC 6043 A.1); checked against the encoder, the decoder and the hand-written
vectors (tshark: tests/mikey/test_tshark.py)."""

from __future__ import annotations

import hmac
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hsm.software import SoftwareKeyStore
from kms.keystore import KeyRef
from kms.mikey.base_ticket import issue_ticket, open_base_ticket
from kms.mikey.chain import encode_chain, encode_key_data
from kms.mikey.compose import compose_as
from kms.mikey.constants import (
    MAC_LENGTH,
    DataType,
    EncrAlg,
    IdRole,
    IdType,
    KeyDataType,
    MacAlg,
    PayloadType,
    PrfFunc,
    RandRole,
    TsType,
)
from kms.mikey.coverage import seal_wire
from kms.mikey.errors import EncodeError
from kms.mikey.header import Header
from kms.mikey.message import Message
from kms.mikey.payloads import Kemac, KeyData, KvSpi, Payload, Rand, Timestamp, Verification
from kms.mikey.protect import placeholder_v
from kms.mikey.ticket import BaseTicketData, Idr, RandR, Ticket, TicketPolicy
from kms.mikey.views import ResolveResp
from kms.mikey.writer import (
    base_ticket_head,
    idr_body,
    kemac_body,
    key_data_chain,
    randr_body,
    sealed_response,
    t_body,
    ticket_body,
)
from tests.mikey import strategies as s

AUTH_KEY = bytes(range(20))


def mac_fn(mac_alg: MacAlg) -> tuple[Callable[[bytes], bytes], str]:
    name = "sha1" if mac_alg == MacAlg.HMAC_SHA_1_160 else "sha256"

    def fn(data: bytes) -> bytes:
        return hmac.new(AUTH_KEY, data, name).digest()

    return fn, name


def codec_response(
    request: Message, data_type: DataType, payloads: tuple[Payload, ...], mac_alg: MacAlg
) -> bytes:
    """The response as the dataclass codec builds and seals it (the path the writer
    replaces): response header, payloads, placeholder V, seal over the response || request."""
    h = request.header
    header = Header(data_type, h.csb_id, h.cs_map, False, h.prf_func, h.version)
    fn, _ = mac_fn(mac_alg)
    msg = Message(header, (*payloads, placeholder_v(mac_alg)))
    return seal_wire(msg, fn, request.wire)


def body(p: Payload) -> tuple[int, bytes]:
    return int(p.TYPE), p.encode_body()


# --- the Key data chain --------------------------------------------------------------------


@given(st.lists(s.key_data(), min_size=0, max_size=5))
def test_key_data_chain_is_the_codecs(keys: list[KeyData]) -> None:
    assert key_data_chain(keys) == encode_key_data(keys) == encode_chain(
        keys, with_first_payload=False
    )


@pytest.mark.parametrize(
    "bad",
    [
        KeyData(KeyDataType.TEK_SALT, b"k", None),  # salt missing
        KeyData(KeyDataType.TEK, b"k", b"s"),  # salt where none belongs
        KeyData(KeyDataType.TEK, bytes(0x10000)),  # key longer than its 16-bit length
        KeyData(KeyDataType.TEK, b"k", None, KvSpi(bytes(256))),  # SPI over 8 bits
    ],
)
def test_key_data_chain_refuses_what_the_codec_refuses(bad: KeyData) -> None:
    with pytest.raises(EncodeError):
        encode_key_data([bad])
    with pytest.raises(EncodeError):
        key_data_chain([bad])


# --- whole responses -------------------------------------------------------------------------


def decoded_request(draw_msg: Message) -> Message:
    return Message.decode(draw_msg.encode())


@settings(max_examples=60, deadline=None)
@given(
    s.message(DataType.RESOLVE_INIT_PSK),
    s.ts_pair(),
    st.sampled_from([MacAlg.HMAC_SHA_1_160, MacAlg.HMAC_SHA_256_256]),
    s.blob(48),
    st.sampled_from([EncrAlg.AES_CM_128, EncrAlg.AES_CM_256, EncrAlg.NULL]),
    st.none() | st.tuples(s.blob(32, 1), s.blob(32, 1)),
)
def test_resolve_resp_is_the_codecs(
    req: Message,
    ts: tuple[TsType, bytes],
    mac_alg: MacAlg,
    encr: bytes,
    encr_alg: EncrAlg,
    fork: tuple[bytes, bytes] | None,
) -> None:
    request = decoded_request(req)
    payloads: list[Payload] = [
        Timestamp(*ts),
        Idr(IdRole.IDRKMS, IdType.URI, b"sip:kms.example.org"),
        Kemac(encr_alg, encr, MacAlg.NULL, b""),
    ]
    if fork is not None:
        payloads += [Idr(IdRole.IDRR, IdType.URI, fork[0]), RandR(RandRole.RANDRKMS, fork[1])]
    fn, name = mac_fn(mac_alg)
    parts = [
        (PayloadType.T, t_body(*ts)),
        (PayloadType.IDR, idr_body(IdRole.IDRKMS, IdType.URI, b"sip:kms.example.org")),
        (PayloadType.KEMAC, kemac_body(encr_alg, encr)),
    ]
    if fork is not None:
        parts += [
            (PayloadType.IDR, idr_body(IdRole.IDRR, IdType.URI, fork[0])),
            (PayloadType.RANDR, randr_body(RandRole.RANDRKMS, fork[1])),
        ]
    wire = sealed_response(request, DataType.RESOLVE_RESP, parts, mac_alg, fn, request.wire)
    assert wire == codec_response(request, DataType.RESOLVE_RESP, tuple(payloads), mac_alg)
    # and the decoder reads it back as the RESOLVE_RESP it is, its V over resp || request
    got = Message.decode(wire)
    assert got.header.csb_id == request.header.csb_id
    assert got.header.cs_map == request.header.cs_map and not got.header.v_flag
    assert got.payloads[:-1] == tuple(payloads)
    view = compose_as(got, ResolveResp)
    assert view.kemac.encr_data == encr
    mac = wire[-MAC_LENGTH[mac_alg]:]
    assert hmac.compare_digest(
        mac, hmac.new(AUTH_KEY, wire[: -len(mac)] + request.wire, name).digest()
    )


@settings(max_examples=40, deadline=None)
@given(s.message(DataType.REQUEST_INIT_PSK), s.ticket(), s.blob(60))
def test_request_resp_is_the_codecs(req: Message, ticket: Ticket, encr: bytes) -> None:
    request = decoded_request(req)
    ticket = Ticket(ticket.policy, ticket.ticket_data)  # a KMS sends no Initiator Data
    t = Timestamp(TsType.NTP_UTC, bytes(range(8)))
    kms = Idr(IdRole.IDRKMS, IdType.URI, b"sip:kms")
    kemac = Kemac(EncrAlg.AES_CM_128, encr, MacAlg.NULL, b"")
    fn, _ = mac_fn(MacAlg.HMAC_SHA_1_160)
    parts = [
        body(t),
        (PayloadType.IDR, idr_body(IdRole.IDRKMS, IdType.URI, b"sip:kms")),
        (PayloadType.TICKET, ticket_body(ticket.policy.encode_body(), ticket.ticket_data)),
        (PayloadType.KEMAC, kemac_body(EncrAlg.AES_CM_128, encr)),
    ]
    wire = sealed_response(
        request, DataType.REQUEST_RESP, parts, MacAlg.HMAC_SHA_1_160, fn, request.wire
    )
    assert wire == codec_response(
        request, DataType.REQUEST_RESP, (t, kms, ticket, kemac), MacAlg.HMAC_SHA_1_160
    )
    assert Message.decode(wire).payloads[:-1] == (t, kms, ticket, kemac)


@pytest.mark.parametrize("name", ["request_resp", "resolve_resp"])
def test_the_hand_written_vectors_come_out_of_the_writer(name: str) -> None:
    """The fixtures (written by hand from the RFC diagrams) rebuilt from their values."""
    wire = s.fixture(name)
    msg = Message.decode(wire)
    v = msg.payloads[-1]
    assert isinstance(v, Verification)
    parts = [body(p) for p in msg.payloads[:-1]]
    got = sealed_response(msg, DataType(msg.data_type), parts, MacAlg(v.mac_alg),
                          lambda _data: v.mac, b"")
    assert got == wire


def test_refuses_a_response_without_mac() -> None:
    request = Message.decode(s.fixture("request_init_psk"))
    with pytest.raises(EncodeError):
        sealed_response(request, DataType.REQUEST_RESP, [], MacAlg.NULL, lambda d: b"", b"")
    with pytest.raises(EncodeError):  # a MAC of the wrong length
        sealed_response(request, DataType.REQUEST_RESP, [], MacAlg.HMAC_SHA_1_160,
                        lambda d: b"x", b"")


# --- the base ticket ------------------------------------------------------------------------


@pytest.mark.parametrize("prf", [PrfFunc.MIKEY_1, PrfFunc.PRF_HMAC_SHA_256])
def test_issued_ticket_is_what_the_codec_builds_and_opens(prf: PrfFunc) -> None:
    ks = SoftwareKeyStore()
    key = KeyRef(ks.import_secret("tpk/1", bytes(range(32))).label)
    t = Timestamp(TsType.NTP_UTC, bytes(range(8)))
    rand = bytes(range(100, 132))
    mpk = KeyData(KeyDataType.MPK, bytes(16), None, KvSpi(b"\x01\x02\x03\x04"))
    tgk = KeyData(KeyDataType.TGK, bytes(range(16)), None, KvSpi(b"\x05\x06\x07\x08"))
    policy = TicketPolicy(prf_func=prf)
    issued = issue_ticket(ks, key, b"tpk/1", policy, t, rand, mpk, [tgk])
    ticket = issued.ticket()
    assert issued.body == ticket.encode_body()
    data = ticket.base_ticket()
    # the same Ticket Data as the dataclasses encode, with the MAC over Ticket.mac_input()
    again = BaseTicketData(data.t, Rand(rand), data.kemac, data.v, data.idr_psk).encode()
    assert again == issued.ticket_data
    assert data.idr_psk == Idr(IdRole.IDRPSK, IdType.BYTE_STRING, b"tpk/1")
    mac_alg = MacAlg.HMAC_SHA_1_160 if prf == PrfFunc.MIKEY_1 else MacAlg.HMAC_SHA_256_256
    assert data.v.mac_alg == mac_alg
    head = base_ticket_head(t.ts_type, t.value, rand, data.kemac.encr_alg,
                            data.kemac.encr_data, b"tpk/1", mac_alg)
    assert issued.ticket_data == head + data.v.mac
    contents = open_base_ticket(ks, ticket, lambda tpk_id: key if tpk_id == b"tpk/1" else None)
    assert contents.mpk == mpk and contents.session_keys == (tgk,)
