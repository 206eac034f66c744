"""Byte-exact message tests against the hand-written fixtures in tests/vectors/messages.

Each fixture is decoded, its fields are compared with values written here from the RFC
diagrams (not with the encoder's output), and re-encoding must give the very same bytes.
"""

from __future__ import annotations

import pytest

from kms.mikey.chain import decode_key_data
from kms.mikey.constants import (
    DataType,
    EncrAlg,
    ErrorNo,
    IdRole,
    IdType,
    KeyDataType,
    MacAlg,
    PayloadType,
    ProtType,
    RandRole,
    SrtpParam,
    TsRole,
    TsType,
)
from kms.mikey.header import EmptyMap, GenericIdEntry, GenericIdMap, Header, SrtpIdEntry, SrtpIdMap
from kms.mikey.message import ALLOWED_PAYLOADS, Message
from kms.mikey.payloads import (
    Error,
    Id,
    Kemac,
    KeyData,
    KvInterval,
    KvSpi,
    PolicyParam,
    Rand,
    SecurityPolicy,
    Sign,
    Timestamp,
    Verification,
)
from kms.mikey.ticket import Idr, RandR, Ticket, TicketPolicy, TpFlag, Tr
from tests.mikey.strategies import FIXTURE_NAMES, fixture

T = PayloadType
ALICE = b"sip:alice@example.org"
BOB = b"sip:bob@example.org"
KMS = b"sip:kms@example.org"
RAND_I = bytes(range(0x10, 0x20))
RAND_R = bytes(range(0x30, 0x40))

# Payload lists written from RFC 6043 4.2 (and RFC 3830 for the plain MIKEY ones).
EXPECTED: dict[str, tuple[DataType, list[PayloadType]]] = {
    "request_init_psk": (DataType.REQUEST_INIT_PSK, [T.T, T.RANDR, T.IDR, T.IDR, T.TP, T.IDR, T.V]),
    "request_init_pk": (
        DataType.REQUEST_INIT_PK,
        [T.T, T.RANDR, T.IDR, T.CERT, T.IDR, T.TP, T.CHASH, T.PKE, T.SIGN],
    ),
    "request_resp": (DataType.REQUEST_RESP, [T.T, T.IDR, T.TICKET, T.KEMAC, T.V]),
    "transfer_init": (DataType.TRANSFER_INIT, [T.T, T.RANDR, T.IDR, T.IDR, T.SP, T.TICKET, T.V]),
    "transfer_init_initiator_data": (
        DataType.TRANSFER_INIT,
        [T.T, T.RANDR, T.IDR, T.IDR, T.TICKET, T.KEMAC, T.V],
    ),
    "transfer_resp": (
        DataType.TRANSFER_RESP,
        [T.T, T.RANDR, T.IDR, T.RANDR, T.SP, T.KEMAC, T.V],
    ),
    "resolve_init_psk": (
        DataType.RESOLVE_INIT_PSK,
        [T.T, T.RANDR, T.IDR, T.IDR, T.TICKET, T.IDR, T.V],
    ),
    "resolve_init_pk": (
        DataType.RESOLVE_INIT_PK,
        [T.T, T.RANDR, T.IDR, T.CERT, T.IDR, T.TICKET, T.CHASH, T.PKE, T.SIGN],
    ),
    "resolve_resp": (DataType.RESOLVE_RESP, [T.T, T.IDR, T.KEMAC, T.IDR, T.RANDR, T.V]),
    "error_request": (DataType.ERROR, [T.T, T.ERR, T.ERR, T.V]),
    "error_signed": (DataType.ERROR, [T.T, T.ERR, T.SIGN]),
    "error_transfer": (DataType.ERROR, [T.T, T.ERR, T.SP, T.V]),
    "psk_init": (DataType.PSK_INIT, [T.T, T.RAND, T.ID, T.SP, T.KEMAC]),
    "psk_resp": (DataType.PSK_RESP, [T.T, T.ID, T.V]),
    "pk_init": (
        DataType.PK_INIT,
        [T.T, T.RAND, T.ID, T.CERT, T.CHASH, T.SP, T.KEMAC, T.PKE, T.SIGN],
    ),
    "dh_init": (DataType.DH_INIT, [T.T, T.RAND, T.ID, T.DH, T.SIGN]),
}


def test_every_fixture_is_listed() -> None:
    assert set(FIXTURE_NAMES) == set(EXPECTED)


def test_every_rfc_6043_message_type_has_a_fixture() -> None:
    covered = {dt for dt, _ in EXPECTED.values()}
    assert set(range(DataType.REQUEST_INIT_PSK, DataType.RESOLVE_RESP + 1)) <= covered
    assert DataType.ERROR in covered


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_decodes_and_reencodes_byte_exact(name: str) -> None:
    wire = fixture(name)
    msg = Message.decode(wire)
    data_type, types = EXPECTED[name]
    assert msg.data_type == data_type
    assert [p.TYPE for p in msg.payloads] == types
    assert set(types) <= ALLOWED_PAYLOADS[data_type]
    assert msg.wire == wire
    assert msg.encode() == wire
    # offsets + raw cover the wire exactly, in order, right after the HDR
    assert b"".join(p.raw for p in msg.payloads) == wire[msg.offsets[0] :]
    assert msg.header.encode(types[0]) == wire[: msg.offsets[0]]


def test_request_init_psk_every_field() -> None:
    msg = Message.decode(fixture("request_init_psk"))
    expected = Message(
        Header(DataType.REQUEST_INIT_PSK, 0x12345678, EmptyMap(0), v_flag=True, prf_func=0),
        (
            Timestamp(TsType.NTP_UTC_32, bytes.fromhex("ea1c2b3c")),
            RandR(RandRole.RANDRI, RAND_I),
            Idr(IdRole.IDRI, IdType.URI, ALICE),
            Idr(IdRole.IDRKMS, IdType.URI, KMS),
            TicketPolicy(
                ticket_type=1,
                subtype=1,
                version=1,
                prf_func=0,
                flags=TpFlag.F | TpFlag.H | TpFlag.L | TpFlag.N | TpFlag.O,
                payloads=(
                    Tr(TsRole.TRS, TsType.NTP_UTC_32, bytes.fromhex("ea1c2b3c")),
                    Tr(TsRole.TRE, TsType.NTP_UTC_32, bytes.fromhex("ea1d7cbc")),
                    Kemac(
                        EncrAlg.NULL,
                        bytes.fromhex("0001 0010") + bytes(16) + bytes.fromhex("04 00000000"),
                        MacAlg.NULL,
                    ),
                    Idr(IdRole.IDRR, IdType.URI, BOB),
                ),
            ),
            Idr(IdRole.IDRPSK, IdType.BYTE_STRING, b"\x01\x02\x03\x04"),
            Verification(MacAlg.HMAC_SHA_1_160, bytes(range(0xA0, 0xB4))),
        ),
    )
    assert msg == expected
    assert expected.encode() == fixture("request_init_psk")
    tp = msg.one(TicketPolicy)
    kemac = tp.payloads[2]
    assert isinstance(kemac, Kemac)
    assert decode_key_data(kemac.encr_data) == (
        KeyData(KeyDataType.TGK, bytes(16), None, KvSpi(bytes(4))),
    )


def test_request_init_pk_fields() -> None:
    msg = Message.decode(fixture("request_init_pk"))
    tp = msg.one(TicketPolicy)
    assert tp.prf_func == 1
    assert tp.flags == TpFlag.H | TpFlag.L
    assert msg.header.v_flag
    sign = msg.payloads[-1]
    assert sign == Sign(0, bytes(range(1, 9)))


def ticket_of(name: str) -> Ticket:
    return Message.decode(fixture(name)).one(Ticket)


@pytest.mark.parametrize(
    "name", ["request_resp", "transfer_init", "resolve_init_psk", "resolve_init_pk"]
)
def test_ticket_fields_and_base_ticket(name: str) -> None:
    tk = ticket_of(name)
    assert tk.policy.flags == TpFlag.D | TpFlag.F | TpFlag.H | TpFlag.N | TpFlag.O
    assert [p.TYPE for p in tk.policy.payloads] == [T.IDR, T.IDR, T.TR, T.TR, T.IDR]
    assert tk.initiator_data is None
    assert len(tk.ticket_data) == 88
    bt = tk.base_ticket()
    assert bt.thdr_data == b""
    assert bt.t == Timestamp(TsType.NTP_UTC_32, bytes.fromhex("ea1c2b3c"))
    assert bt.rand == Rand(bytes(range(0x20, 0x30)))
    assert bt.kemac.encr_alg == EncrAlg.AES_CM_128
    assert bt.kemac.encr_data == bytes.fromhex("948e54d17b3625064f9d4476457465bf8c352df796480a57d9")
    assert bt.kemac.mac_alg == MacAlg.NULL
    assert bt.idr_psk == Idr(IdRole.IDRPSK, IdType.BYTE_STRING, b"tpk1")
    assert bt.v == Verification(MacAlg.HMAC_SHA_1_160, bytes(range(0xD0, 0xE4)))
    assert bt.encode() == tk.ticket_data
    # the ticket MAC covers TICKET from Ticket Type to the end of Ticket Data minus the MAC
    assert tk.mac_input() == tk.raw[1 : len(tk.raw) - 2 - 20]


def test_transfer_init_generic_id_s0_and_sp() -> None:
    msg = Message.decode(fixture("transfer_init"))
    assert msg.header == Header(
        DataType.TRANSFER_INIT,
        0x87654321,
        GenericIdMap(
            (
                GenericIdEntry(1, ProtType.SRTP, False, (0,), bytes.fromhex("deadbeef"), b""),
                GenericIdEntry(2, ProtType.SRTP, False, (), b"", b""),
            )
        ),
        v_flag=True,
    )
    sp = msg.one(SecurityPolicy)
    assert sp.param(SrtpParam.AUTH_TAG_LEN) == b"\x0a"
    assert len(sp.params) == 6


def test_transfer_init_with_initiator_data() -> None:
    msg = Message.decode(fixture("transfer_init_initiator_data"))
    tk = msg.one(Ticket)
    assert tk.policy.has(TpFlag.I)
    assert tk.policy.has(TpFlag.E)
    assert tk.policy.has(TpFlag.L)
    init = tk.initiator_data
    assert init is not None
    assert init.vi_next_payload == T.V
    v = msg.one(Verification)
    assert init.vi.mac == v.mac
    assert init.vr == Verification(MacAlg.HMAC_SHA_1_160, bytes(range(0xE0, 0xF4)))
    # without Initiator Data: same bytes up to the Initiator Data length, which becomes 0
    assert tk.raw[-47:-45] == b"\x00\x2d"
    assert tk.without_initiator_data().encode_body() == tk.raw[1:-47] + b"\x00\x00"
    assert msg.one(Kemac).encr_alg == EncrAlg.AES_CM_128


def test_transfer_resp_every_field() -> None:
    msg = Message.decode(fixture("transfer_resp"))
    assert msg == Message(
        Header(
            DataType.TRANSFER_RESP,
            0x87654321,
            GenericIdMap(
                (
                    GenericIdEntry(
                        1,
                        ProtType.SRTP,
                        True,
                        (0,),
                        bytes.fromhex("deadbeef 00000000 0001"),
                        b"\x00\x00\x00\x01",
                    ),
                )
            ),
        ),
        (
            Timestamp(TsType.NTP_UTC_32, bytes.fromhex("ea1c2b41")),
            RandR(RandRole.RANDRR, RAND_R),
            Idr(IdRole.IDRR, IdType.URI, BOB),
            RandR(RandRole.RANDRKMS, bytes(range(0x40, 0x50))),
            SecurityPolicy(0, ProtType.SRTP, (PolicyParam(SrtpParam.SRTP_ENCRYPTION, b"\x01"),)),
            Kemac(EncrAlg.AES_CM_256, bytes(25), MacAlg.NULL),
            Verification(MacAlg.HMAC_SHA_256_256, bytes(range(32))),
        ),
    )


def test_resolve_resp_counter_timestamp() -> None:
    msg = Message.decode(fixture("resolve_resp"))
    assert msg.payloads[0] == Timestamp(TsType.COUNTER, b"\x00\x00\x00\x07")
    assert msg.all(RandR) == [RandR(RandRole.RANDRKMS, bytes(range(0x50, 0x58)))]
    assert [i.role for i in msg.all(Idr)] == [IdRole.IDRKMS, IdRole.IDRR]


def test_error_messages() -> None:
    msg = Message.decode(fixture("error_request"))
    assert msg.all(Error) == [Error(ErrorNo.INVALID_TICKET), Error(ErrorNo.INVALID_TPPAR)]
    assert msg.payloads[0] == Timestamp(TsType.NTP_UTC, bytes.fromhex("e9b0c0a180000000"))
    signed = Message.decode(fixture("error_signed"))
    assert signed.all(Error) == [Error(ErrorNo.AUTH_FAILURE)]
    assert signed.payloads[-1] == Sign(0, bytes.fromhex("deadbeef"))
    transfer = Message.decode(fixture("error_transfer"))
    assert transfer.one(Error).error_no == ErrorNo.INVALID_SP
    assert transfer.one(Verification) == Verification(MacAlg.NULL, b"")


def test_psk_init_srtp_id_and_two_keys() -> None:
    msg = Message.decode(fixture("psk_init"))
    assert msg.header == Header(
        DataType.PSK_INIT,
        0xCAFEBABE,
        SrtpIdMap((SrtpIdEntry(0, 0x11111111, 0), SrtpIdEntry(0, 0x22222222, 1))),
    )
    assert msg.one(Id) == Id(IdType.URI, ALICE)
    kemac = msg.one(Kemac)
    assert (kemac.encr_alg, kemac.mac_alg) == (EncrAlg.NULL, MacAlg.HMAC_SHA_1_160)
    assert decode_key_data(kemac.encr_data) == (
        KeyData(
            KeyDataType.TEK_SALT, bytes(range(16)), bytes(range(0x10, 0x1E)), KvSpi(b"\0\0\0\1")
        ),
        KeyData(
            KeyDataType.TGK,
            bytes(range(0x20, 0x30)),
            None,
            KvInterval(bytes(6), bytes.fromhex("0000ffffffff")),
        ),
    )


def test_data_type_restricts_payloads() -> None:
    # REQUEST_INIT_PSK fixture relabelled as REQUEST_RESP (13): RANDR is not allowed there.
    wire = bytearray(fixture("request_init_psk"))
    wire[1] = DataType.REQUEST_RESP
    with pytest.raises(Exception, match="RANDR payload not allowed") as ei:
        Message.decode(bytes(wire))
    assert type(ei.value).__name__ == "DecodeError"
