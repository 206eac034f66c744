"""Byte-exact payload tests written from the RFC diagrams (RFC 3830 6, RFC 6043 6 and Appendix A).

Each case is hex written by hand field by field (comments name the fields), decoded, compared
with a hand-built expected value, and re-encoded to the very same bytes. This catches an error
shared by the encoder and the decoder, which a round trip alone cannot.
"""

from __future__ import annotations

import pytest

from kms.mikey.buffer import Reader
from kms.mikey.catalog import PAYLOAD_CLASSES
from kms.mikey.chain import decode_chain, decode_key_data, encode_chain, encode_key_data
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
    ProtType,
    RandRole,
    SignType,
    SrtpParam,
    TicketType,
    TsRole,
    TsType,
)
from kms.mikey.errors import DecodeError
from kms.mikey.header import (
    EmptyMap,
    GenericIdEntry,
    GenericIdMap,
    Header,
    SrtpIdEntry,
    SrtpIdMap,
)
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
from tests.mikey.strategies import hex_text


def decode_one(data: bytes, ptype: int) -> Payload:
    """Decode one payload whose Next Payload field says Last (SIGN: no such field)."""
    r = Reader(data)
    (p,) = decode_chain(r, ptype, PAYLOAD_CLASSES, "test")
    assert r.at_end()
    return p


def check(hexstr: str, expected: Payload) -> Payload:
    """Decode the hand-written bytes, compare with the hand-built value, re-encode."""
    data = hex_text(hexstr)
    got = decode_one(data, expected.TYPE)
    assert got == expected
    assert got.raw == data
    assert encode_chain([expected], with_first_payload=False) == data
    assert encode_chain([got], with_first_payload=False) == data
    return got


K16 = bytes(range(16))
M20 = bytes(range(0x20, 0x34))
M32 = bytes(range(0x40, 0x60))

# --- KEMAC (RFC 3830 6.2) --------------------------------------------------------------


def test_kemac_null_with_key_data() -> None:
    kemac = check(
        """
        00          # next payload: Last
        00          # Encr alg NULL
        0018        # Encr data len 24
          00          # Key data: next payload Last
          21          # Type TEK (2) << 4 | KV SPI (1)
          0010 000102030405060708090a0b0c0d0e0f   # Key data len 16, Key data
          03 abcdef   # SPI length 3, SPI
        01          # MAC alg HMAC-SHA-1-160
        202122232425262728292a2b2c2d2e2f30313233   # MAC (20 bytes)
        """,
        Kemac(
            EncrAlg.NULL,
            hex_text("00 21 0010 000102030405060708090a0b0c0d0e0f 03 abcdef"),
            MacAlg.HMAC_SHA_1_160,
            M20,
        ),
    )
    assert isinstance(kemac, Kemac)
    assert decode_key_data(kemac.encr_data) == (
        KeyData(KeyDataType.TEK, K16, None, KvSpi(b"\xab\xcd\xef")),
    )


@pytest.mark.parametrize(
    ("alg_hex", "encr", "mac_hex", "mac_alg", "mac"),
    [
        ("01", EncrAlg.AES_CM_128, "00", MacAlg.NULL, b""),
        ("02", EncrAlg.AES_KW_128, "01" + M20.hex(), MacAlg.HMAC_SHA_1_160, M20),
        ("03", EncrAlg.AES_CM_256, "02" + M32.hex(), MacAlg.HMAC_SHA_256_256, M32),
        ("7f", 0x7F, "00", MacAlg.NULL, b""),  # unknown Encr alg kept (answered with an error)
    ],
)
def test_kemac_algorithms(
    alg_hex: str, encr: int, mac_hex: str, mac_alg: MacAlg, mac: bytes
) -> None:
    check(
        f"""
        00 {alg_hex}   # NP Last, Encr alg
        0005 0102030405   # Encr data len 5, Encr data (ciphertext)
        {mac_hex}      # MAC alg, MAC
        """,
        Kemac(encr, b"\x01\x02\x03\x04\x05", mac_alg, mac),
    )


def test_kemac_unknown_mac_alg_is_a_decode_error() -> None:
    with pytest.raises(DecodeError) as ei:
        decode_one(hex_text("00 00 0000 03"), PayloadType.KEMAC)
    assert ei.value.payload == "KEMAC"
    assert ei.value.offset == 4


# Every Key data type (RFC 3830 T6.13.a, RFC 6043 T6.7) with every KV type (T6.13.b).
KEY_TYPE_BITS = [(KeyDataType(t), t) for t in range(7)]
KV_CASES = [
    (KvType.NULL, "", None),
    (KvType.SPI, "04 00000001", KvSpi(b"\x00\x00\x00\x01")),
    (
        KvType.INTERVAL,
        "06 000000000001 06 0000ffffffff",
        KvInterval(bytes.fromhex("000000000001"), bytes.fromhex("0000ffffffff")),
    ),
]


@pytest.mark.parametrize(("key_type", "type_no"), KEY_TYPE_BITS, ids=lambda v: str(v))
@pytest.mark.parametrize(("kv_type", "kv_hex", "kv"), KV_CASES, ids=lambda v: str(v))
def test_kemac_key_type_and_kv(
    key_type: KeyDataType, type_no: int, kv_type: KvType, kv_hex: str, kv: KvSpi | None
) -> None:
    has_salt = type_no in (1, 3, 5)  # TGK+SALT, TEK+SALT, GTGK+SALT
    salt_hex = "000e 101112131415161718191a1b1c1d" if has_salt else ""
    key_hex = f"""
        00                  # Key data: next payload Last
        {type_no:x}{int(kv_type):x}   # Type (4 bits) | KV (4 bits), written as two nibbles
        0010 000102030405060708090a0b0c0d0e0f    # Key data len 16, Key data
        {salt_hex}          # [Salt len | Salt]
        {kv_hex}            # [KV data]
    """
    plain = hex_text(key_hex)
    expected_key = KeyData(key_type, K16, bytes(range(0x10, 0x1E)) if has_salt else None, kv)
    assert decode_key_data(plain) == (expected_key,)
    assert encode_key_data([expected_key]) == plain
    got = check(
        f"00 00 {len(plain):04x} {plain.hex()} 00",  # NP, NULL, len, Encr data, MAC alg NULL
        Kemac(EncrAlg.NULL, plain, MacAlg.NULL),
    )
    assert isinstance(got, Kemac)
    (kd,) = decode_key_data(got.encr_data)
    assert kd.key_type == type_no
    assert kd.kv_type == kv_type


def test_key_data_chain_of_two() -> None:
    plain = hex_text(
        """
        14 61 0010 000102030405060708090a0b0c0d0e0f 04 00000001   # MPK, SPI; NP Key data
        00 01 0010 000102030405060708090a0b0c0d0e0f 04 00000002   # TGK, SPI; NP Last
        """
    )
    keys = (
        KeyData(KeyDataType.MPK, K16, None, KvSpi(b"\0\0\0\1")),
        KeyData(KeyDataType.TGK, K16, None, KvSpi(b"\0\0\0\2")),
    )
    assert decode_key_data(plain) == keys
    assert encode_key_data(keys) == plain


def test_key_data_reference_vector_plaintext() -> None:
    # docs/rfc-readings.md V1: MPK, KV=SPI, SPI 00000001 (the AES-CM plaintext).
    plain = hex_text("00 61 0010 404142434445464748494a4b4c4d4e4f 04 00000001")
    (kd,) = decode_key_data(plain)
    assert kd == KeyData(KeyDataType.MPK, bytes(range(0x40, 0x50)), None, KvSpi(b"\0\0\0\1"))


# --- other RFC 3830 payloads -----------------------------------------------------------


@pytest.mark.parametrize(("c", "c_len_hex"), [(0, "0004"), (1, "4004"), (2, "8004"), (3, "c004")])
def test_pke_cache_bits(c: int, c_len_hex: str) -> None:
    p = check(
        f"00 {c_len_hex} deadbeef   # NP, C (2 bits) + Data len (14 bits), Data",
        Pke(c, b"\xde\xad\xbe\xef"),
    )
    assert isinstance(p, Pke)
    assert p.cache == c


@pytest.mark.parametrize(
    ("group", "group_hex", "n"),
    [(DhGroup.OAKLEY_5, "00", 192), (DhGroup.OAKLEY_1, "01", 96), (DhGroup.OAKLEY_2, "02", 128)],
)
def test_dh_groups(group: DhGroup, group_hex: str, n: int) -> None:
    value = bytes([0x5A]) * n
    check(
        f"00 {group_hex} {value.hex()} 00   # NP, DH-Group, DH-value, Reserv 0 | KV Null",
        Dh(group, value),
    )


def test_dh_with_kv_and_reserved_bits() -> None:
    value = bytes(96)
    check(
        f"00 01 {value.hex()} 31 02 abcd   # Reserv 3 | KV SPI, SPI len 2, SPI",
        Dh(DhGroup.OAKLEY_1, value, KvSpi(b"\xab\xcd"), reserved=3),
    )


@pytest.mark.parametrize(
    ("st_hex", "stype"), [("0", SignType.RSA_PKCS1_V1_5), ("1", SignType.RSA_PSS)]
)
def test_sign(st_hex: str, stype: SignType) -> None:
    # SIGN has no Next Payload: S type (4 bits) | Signature len (12 bits) | Signature
    check(f"{st_hex}005 0102030405", Sign(stype, b"\x01\x02\x03\x04\x05"))


def test_sign_long_signature_length_uses_12_bits() -> None:
    sig = bytes(0x123)
    check(f"1123 {sig.hex()}", Sign(SignType.RSA_PSS, sig))


@pytest.mark.parametrize(
    ("ts_hex", "ts_type", "value_hex"),
    [
        ("00", TsType.NTP_UTC, "e9b0c0a180000000"),
        ("01", TsType.NTP, "0102030405060708"),
        ("02", TsType.COUNTER, "0000002a"),
        ("03", TsType.NTP_UTC_32, "ea1c2b3c"),
    ],
)
def test_timestamp_types(ts_hex: str, ts_type: TsType, value_hex: str) -> None:
    check(f"00 {ts_hex} {value_hex}", Timestamp(ts_type, bytes.fromhex(value_hex)))


def test_id_and_cert() -> None:
    check("00 01 0004 61626364   # NP, ID type URI, ID len 4, ID data", Id(IdType.URI, b"abcd"))
    check("00 02 0000            # Byte string, empty", Id(IdType.BYTE_STRING, b""))
    check(
        "00 03 0003 308100     # NP, Cert type X.509v3 Encr, len 3",
        Cert(CertType.X509V3_ENCR, b"\x30\x81\x00"),
    )


@pytest.mark.parametrize(
    ("hf_hex", "hf", "n"),
    [("00", HashFunc.SHA_1, 20), ("01", HashFunc.MD5, 16), ("02", HashFunc.SHA_256, 32)],
)
def test_chash(hf_hex: str, hf: HashFunc, n: int) -> None:
    digest = bytes(range(n))
    check(f"00 {hf_hex} {digest.hex()}", Chash(hf, digest))


@pytest.mark.parametrize(
    ("alg_hex", "alg", "mac"),
    [
        ("00", MacAlg.NULL, b""),
        ("01", MacAlg.HMAC_SHA_1_160, M20),
        ("02", MacAlg.HMAC_SHA_256_256, M32),
    ],
)
def test_verification(alg_hex: str, alg: MacAlg, mac: bytes) -> None:
    check(f"00 {alg_hex} {mac.hex()}   # NP, Auth alg, Ver data", Verification(alg, mac))


def test_security_policy_srtp() -> None:
    sp = check(
        """
        00        # next payload
        07        # Policy no 7
        00        # Prot type SRTP
        000f      # Policy param length 15
        00 01 01  # encr alg: AES-CM
        01 01 10  # session encr key len 16
        04 01 0e  # session salt len 14
        06 01 00  # key derivation rate 0
        0c 01 00  # SRTP prefix length 0
        """,
        SecurityPolicy(
            7,
            ProtType.SRTP,
            (
                PolicyParam(SrtpParam.ENCR_ALG, b"\x01"),
                PolicyParam(SrtpParam.SESSION_ENCR_KEY_LEN, b"\x10"),
                PolicyParam(SrtpParam.SESSION_SALT_LEN, b"\x0e"),
                PolicyParam(SrtpParam.KEY_DERIVATION_RATE, b"\x00"),
                PolicyParam(SrtpParam.SRTP_PREFIX_LEN, b"\x00"),
            ),
        ),
    )
    assert isinstance(sp, SecurityPolicy)
    assert sp.param(SrtpParam.SESSION_SALT_LEN) == b"\x0e"
    assert sp.param(SrtpParam.AUTH_ALG) is None


def test_security_policy_param_overrunning_its_length_is_an_error() -> None:
    with pytest.raises(DecodeError):
        decode_one(hex_text("00 00 00 0002 00 01 01"), PayloadType.SP)


def test_rand() -> None:
    check("00 10 101112131415161718191a1b1c1d1e1f", Rand(bytes(range(0x10, 0x20))))
    check("00 00", Rand(b""))


@pytest.mark.parametrize("no", list(ErrorNo), ids=lambda e: e.name)
def test_error_numbers(no: ErrorNo) -> None:
    p = check(f"00 {int(no):02x} 0000   # NP, Error no, Reserved", Error(no))
    assert isinstance(p, Error)
    assert p.error_no == no


def test_error_numbers_of_rfc_6043() -> None:
    assert (ErrorNo.INVALID_TICKET, ErrorNo.INVALID_TPPAR) == (14, 15)


def test_general_extension_key_id() -> None:
    ext = check(
        """
        00        # next payload
        03        # Type: Key ID (RFC 4563)
        0007      # Length 7
          01        # Key ID Type
          0004      # Key ID len 4
          cafebabe  # Key ID
        """,
        GeneralExtension(GeneralExtType.KEY_ID, hex_text("01 0004 cafebabe")),
    )
    assert isinstance(ext, GeneralExtension)
    assert ext.key_id == KeyIdInfo(1, b"\xca\xfe\xba\xbe")


def test_general_extension_vendor_id_and_bad_key_id() -> None:
    ext = check("00 00 0003 616263", GeneralExtension(GeneralExtType.VENDOR_ID, b"abc"))
    assert isinstance(ext, GeneralExtension)
    assert ext.key_id is None
    with pytest.raises(DecodeError):  # Key ID info whose length overruns the extension
        decode_one(hex_text("00 03 0003 01 0004"), PayloadType.GENERAL_EXT)


# --- RFC 6043 payloads -----------------------------------------------------------------


@pytest.mark.parametrize("role", list(TsRole), ids=lambda r: r.name)
def test_tr(role: TsRole) -> None:
    check(
        f"00 {int(role):02x} 03 ea1c2b3c   # NP, TS Role, NTP-UTC-32, value",
        Tr(role, TsType.NTP_UTC_32, bytes.fromhex("ea1c2b3c")),
    )


def test_tr_64_bit_value() -> None:
    check(
        "00 01 00 e9b0c0a180000000",
        Tr(TsRole.TRI, TsType.NTP_UTC, bytes.fromhex("e9b0c0a180000000")),
    )


@pytest.mark.parametrize("role", list(IdRole), ids=lambda r: r.name)
def test_idr(role: IdRole) -> None:
    check(
        f"00 {int(role):02x} 02 0003 414243   # NP, ID Role, Byte string, len 3",
        Idr(role, IdType.BYTE_STRING, b"ABC"),
    )


@pytest.mark.parametrize("role", list(RandRole), ids=lambda r: r.name)
def test_randr(role: RandRole) -> None:
    check(
        f"00 {int(role):02x} 04 01020304   # NP, RAND Role, RAND len, RAND",
        RandR(role, b"\x01\x02\x03\x04"),
    )


# RFC 6043 6.10: each flag alone, as (byte 5, byte 6, byte 7) of the TP payload.
FLAG_BYTES = [
    ("D", "01", "00", "00"),
    ("E", "00", "80", "00"),
    ("F", "00", "40", "00"),
    ("G", "00", "20", "00"),
    ("H", "00", "10", "00"),
    ("I", "00", "08", "00"),
    ("J", "00", "04", "00"),
    ("K", "00", "02", "00"),
    ("L", "00", "01", "00"),
    ("M", "00", "00", "80"),
    ("N", "00", "00", "40"),
    ("O", "00", "00", "20"),
]

IDRR_HEX = "00 02 02 0001 42"  # IDRr: NP Last, role IDRr, Byte string, len 1, "B"


@pytest.mark.parametrize(("flag", "b5", "b6", "b7"), FLAG_BYTES, ids=[f[0] for f in FLAG_BYTES])
def test_tp_flag_bit_positions(flag: str, b5: str, b6: str, b7: str) -> None:
    tp = check(
        f"""
        00          # next payload
        0001        # Ticket Type: MIKEY base ticket
        01 01       # Subtype, Version
        {b5} {b6} {b7}   # PRF Func 0 | D ; E..L ; M N O reserved
        0007        # TP Data length 7
        0e          # First Payload IDR
        {IDRR_HEX}
        """,
        TicketPolicy(flags=TpFlag[flag], payloads=(Idr(IdRole.IDRR, IdType.BYTE_STRING, b"B"),)),
    )
    assert isinstance(tp, TicketPolicy)
    assert tp.has(TpFlag[flag])
    assert [f for f in TpFlag if tp.has(f)] == [TpFlag[flag]]


def test_tp_prf_func_reserved_bits_and_all_flags() -> None:
    tp = check(
        f"""
        00 0001 01 01
        03          # PRF Func 1 (PRF-HMAC-SHA-256) | D=1
        ff          # E F G H I J K L
        ff          # M N O | reserved 11111
        0007 0e {IDRR_HEX}
        """,
        TicketPolicy(
            prf_func=1,
            flags=TpFlag(0x1FFE0),
            payloads=(Idr(IdRole.IDRR, IdType.BYTE_STRING, b"B"),),
            reserved=0x1F,
        ),
    )
    assert isinstance(tp, TicketPolicy)
    assert tp.prf_func == 1
    assert tp.reserved == 0x1F


def test_tp_full_tp_data_and_unknown_ticket_type() -> None:
    check(
        """
        00          # next payload
        f000        # Ticket Type 61440 (private use)
        07 02       # Subtype 7, Version 2
        fe 00 00    # PRF Func 127
        003b        # TP Data length 59
        0e          #   First Payload IDR
        0e 03 02 0001 4b            # IDRkms "K"; NP IDR
        0d 01 02 0001 49            # IDRi "I"; NP TR
        0d 02 03 ea1c2b3c           # TRs; NP TR
        0d 03 03 ea1d7cbc           # TRe; NP TR
        01 04 03 00000e10           # TRr 3600 s; NP KEMAC
        0e 00 0008 0001000000000000 00   # desired KEMAC: TGK key len 0, Null KV; NP IDR
        0e 05 02 0001 41            # IDRapp "A"; NP IDR
        00 02 02 0001 42            # IDRr "B"; NP Last
        """,
        TicketPolicy(
            ticket_type=0xF000,
            subtype=7,
            version=2,
            prf_func=0x7F,
            payloads=(
                Idr(IdRole.IDRKMS, IdType.BYTE_STRING, b"K"),
                Idr(IdRole.IDRI, IdType.BYTE_STRING, b"I"),
                Tr(TsRole.TRS, TsType.NTP_UTC_32, bytes.fromhex("ea1c2b3c")),
                Tr(TsRole.TRE, TsType.NTP_UTC_32, bytes.fromhex("ea1d7cbc")),
                Tr(TsRole.TRR, TsType.NTP_UTC_32, bytes.fromhex("00000e10")),
                Kemac(EncrAlg.NULL, bytes.fromhex("0001000000000000"), MacAlg.NULL),
                Idr(IdRole.IDRAPP, IdType.BYTE_STRING, b"A"),
                Idr(IdRole.IDRR, IdType.BYTE_STRING, b"B"),
            ),
        ),
    )


def test_tp_data_refuses_other_payloads() -> None:
    # TP Data holding a RAND payload (11): not allowed in TP Data.
    with pytest.raises(DecodeError):
        decode_one(hex_text("00 0001 01 01 000000 0003 0b 00 00"), PayloadType.TP)


BASE_TICKET_HEX = """
    05 0003 aabbcc  # THDR: next payload T, THDR Data len 3, THDR Data
    0b 02 00000001  # T: NP RAND, COUNTER 1
    01 04 01020304  # RAND: NP KEMAC, len 4
    0e 01 0002 ffee 00   # KEMAC: NP IDR, AES-CM-128, len 2, data, MAC NULL
    09 04 02 0001 50     # IDRpsk: NP V, role IDRpsk, Byte string, len 1, "P"
    00 01 000102030405060708090a0b0c0d0e0f10111213   # V: NP Last, HMAC-SHA-1, MAC
"""
BASE_TICKET = BaseTicketData(
    Timestamp(TsType.COUNTER, b"\0\0\0\1"),
    Rand(b"\1\2\3\4"),
    Kemac(EncrAlg.AES_CM_128, b"\xff\xee", MacAlg.NULL),
    Verification(MacAlg.HMAC_SHA_1_160, bytes(range(20))),
    Idr(IdRole.IDRPSK, IdType.BYTE_STRING, b"P"),
    b"\xaa\xbb\xcc",
)


def test_base_ticket_data() -> None:
    data = hex_text(BASE_TICKET_HEX)
    assert len(data) == 53
    bt = BaseTicketData.decode(data)
    assert bt == BASE_TICKET
    assert bt.raw == data
    assert BASE_TICKET.encode() == data


def test_base_ticket_without_idrpsk() -> None:
    data = hex_text("05 0000  0b 02 00000001  01 00  09 00 0000 00  00 00")
    bt = BaseTicketData.decode(data)
    assert bt.idr_psk is None
    assert bt.thdr_data == b""
    assert bt.encode() == data


@pytest.mark.parametrize(
    "bad",
    [
        "05 0000 0b 02 00000001 01 00 00 00 0000 00",  # no V
        "05 0000 0b 02 00000001 01 00 09 00 0000 00 00 00 ff",  # trailing byte
        "0b 0000 00 00",  # THDR names RAND first
        "05 0000 0b 02 00000001 01 00 0e 00 0000 00 09 01 02 0001 50 00 00",  # IDR not IDRpsk
    ],
)
def test_base_ticket_malformed(bad: str) -> None:
    with pytest.raises(DecodeError):
        BaseTicketData.decode(hex_text(bad))


def test_ticket_with_base_ticket_and_initiator_data() -> None:
    td = hex_text(BASE_TICKET_HEX)
    tk = check(
        f"""
        00          # next payload
        0001 01 01  # MIKEY base ticket, subtype 1, version 1
        01 c8 60    # PRF 0 | D ; E F I ; N O
        0007 0e {IDRR_HEX}   # TP Data length, First Payload, IDRr
        0035        # Ticket Data length 53
        {td.hex()}
        002d        # Initiator Data length 45
          09        #   First Payload V
          09 01 {bytes(range(20)).hex()}   # Vi: NP V, HMAC-SHA-1, MAC
          00 01 {M20.hex()}               # Vr: NP Last, HMAC-SHA-1, MAC
        """,
        Ticket(
            TicketPolicy(
                TicketType.MIKEY_BASE_TICKET,
                1,
                1,
                0,
                TpFlag.D | TpFlag.E | TpFlag.F | TpFlag.I | TpFlag.N | TpFlag.O,
                (Idr(IdRole.IDRR, IdType.BYTE_STRING, b"B"),),
            ),
            td,
            InitiatorData(
                Verification(MacAlg.HMAC_SHA_1_160, bytes(range(20))),
                Verification(MacAlg.HMAC_SHA_1_160, M20),
            ),
        ),
    )
    assert isinstance(tk, Ticket)
    assert tk.base_ticket() == BASE_TICKET
    # Ticket MAC input: Ticket Type .. end of Ticket Data minus the MAC (RFC 6043 A.1)
    raw = tk.raw
    assert tk.mac_input() == raw[1 : 1 + 7 + 2 + 7 + 2 + 53 - 20]
    assert tk.initiator_data is not None
    assert tk.initiator_data.vr_mac_input() == hex_text(f"09 09 01 {bytes(range(20)).hex()} 00 01")


def test_ticket_not_base_ticket() -> None:
    tk = check(
        f"00 0002 01 01 000000 0007 0e {IDRR_HEX} 0002 abcd 0000",
        Ticket(
            TicketPolicy(
                TicketType.THREEGPP_BASE_TICKET,
                1,
                1,
                0,
                TpFlag(0),
                (Idr(IdRole.IDRR, IdType.BYTE_STRING, b"B"),),
            ),
            b"\xab\xcd",
        ),
    )
    assert isinstance(tk, Ticket)
    with pytest.raises(DecodeError):
        tk.base_ticket()


# --- HDR with each map type (RFC 3830 6.1.1, RFC 4563 5, RFC 6043 6.1.1) -----------------


def header_case(hexstr: str, expected: Header, next_payload: int = 5) -> Header:
    data = hex_text(hexstr)
    r = Reader(data)
    got, nxt = Header.decode(r)
    assert r.at_end()
    assert (got, nxt) == (expected, next_payload)
    assert expected.encode(next_payload) == data
    return got


def test_hdr_srtp_id_two_cs() -> None:
    h = header_case(
        """
        01 00 05 01       # version, PSK_INIT, NP T, V=0 PRF 1
        cafebabe          # CSB ID
        02 00             # #CS 2, SRTP-ID
        00 11111111 00000000   # Policy_no 0, SSRC, ROC
        03 22222222 00000005   # Policy_no 3, SSRC, ROC 5
        """,
        Header(
            DataType.PSK_INIT,
            0xCAFEBABE,
            SrtpIdMap((SrtpIdEntry(0, 0x11111111, 0), SrtpIdEntry(3, 0x22222222, 5))),
            prf_func=1,
        ),
    )
    assert h.cs_count == 2


def test_hdr_empty_map_is_ten_bytes() -> None:
    h = header_case(
        "01 0b 05 80 12345678 00 01",
        Header(DataType.REQUEST_INIT_PSK, 0x12345678, EmptyMap(), v_flag=True),
    )
    assert h.cs_map.MAP_TYPE == CsIdMapType.EMPTY
    assert len(h.encode(5)) == 10


def test_hdr_empty_map_keeps_cs_count() -> None:
    header_case("01 0b 05 00 00000001 03 01", Header(DataType.REQUEST_INIT_PSK, 1, EmptyMap(3)))


def test_hdr_generic_id_s1_and_s0() -> None:
    header_case(
        """
        01 0f 05 7f 87654321   # TRANSFER_RESP, V=0 PRF 127, CSB ID
        02 02                  # #CS 2, GENERIC-ID
        01 00 82 00 01 000a deadbeef 00000001 0002 04 00000001
          # CS 1: SRTP, S=1 #P=2, policies 0 1, SD len 10 (SSRC ROC SEQ), SPI len 4
        05 00 00 0004 cafebabe 00
          # CS 5: SRTP, S=0 #P=0, SD len 4 (SSRC), SPI len 0
        """,
        Header(
            DataType.TRANSFER_RESP,
            0x87654321,
            GenericIdMap(
                (
                    GenericIdEntry(
                        1,
                        ProtType.SRTP,
                        True,
                        (0, 1),
                        hex_text("deadbeef 00000001 0002"),
                        b"\0\0\0\1",
                    ),
                    GenericIdEntry(5, ProtType.SRTP, False, (), b"\xca\xfe\xba\xbe", b""),
                )
            ),
            prf_func=0x7F,
        ),
    )


@pytest.mark.parametrize(
    "bad",
    [
        "02 0b 05 00 00000000 00 01",  # version 2
        "01 13 05 00 00000000 00 01",  # data type 19 unknown
        "01 0b 05 00 00000000 00 03",  # map type 3 unknown
        "01 00 05 00 00000000 01 00 00 11111111",  # SRTP-ID entry truncated
        "01 0e 05 00 00000000 01 02 01 00 01",  # GENERIC-ID entry truncated
    ],
)
def test_hdr_malformed(bad: str) -> None:
    with pytest.raises(DecodeError) as ei:
        Header.decode(Reader(hex_text(bad)))
    assert ei.value.payload == "HDR"


@pytest.mark.parametrize("prf", [0, 1])
def test_issued_base_ticket_mac_covers_what_ticket_mac_input_says(prf: int) -> None:
    """issue_base_ticket computes the V MAC without decoding the Ticket Data it just encoded:
    the MAC must be the one over Ticket.mac_input() of the final ticket (RFC 6043 A.1)."""
    from hsm.software import SoftwareKeyStore
    from kms.keystore import KeyRef
    from kms.mikey.base_ticket import issue_base_ticket, open_base_ticket
    from kms.mikey.cipher import compute_mac
    from kms.mikey.constants import KeyDataType, PrfFunc, TsType
    from kms.mikey.derive import derive_ticket_keys
    from kms.mikey.ntp import encode_ts_value
    from kms.mikey.payloads import KeyData, KvSpi, Timestamp
    from kms.mikey.protect import keyed_prf, suite_for

    ks = SoftwareKeyStore()
    ks.generate_secret("tpk/1", 32)
    tpk = KeyRef("tpk/1")
    mpk = KeyData(KeyDataType.MPK, bytes(range(16)), None, KvSpi(b"\x01\x02\x03\x04"))
    t = Timestamp(TsType.NTP_UTC, encode_ts_value(TsType.NTP_UTC, 1.7e9))
    rand = bytes(range(100, 132))
    ticket = issue_base_ticket(ks, tpk, b"tpk/1", TicketPolicy(prf_func=prf), t, rand, mpk, [])
    suite = suite_for(prf)
    keys = derive_ticket_keys(keyed_prf(ks, tpk, PrfFunc(prf)), rand, suite.encr_alg,
                              suite.mac_alg)
    data = ticket.base_ticket()
    assert data.v.mac == compute_mac(suite.mac_alg, keys.auth_key, ticket.mac_input())
    assert ticket.mac_input(data) == ticket.mac_input()  # given the decoded base ticket
    assert data.v.mac != bytes(len(data.v.mac))
    assert open_base_ticket(ks, ticket, lambda _: tpk).mpk == mpk


@pytest.mark.parametrize("prf", [0, 1])
def test_mpki_alone_is_the_first_of_the_pair(prf: int) -> None:
    """A Ticket Request without forking derives MPKi only (RFC 6043 A.2.2): the same value."""
    from hsm.software import SoftwareKeyStore
    from kms.mikey.base_ticket import derive_mpk_pair, derive_mpki
    from kms.mikey.constants import PrfFunc

    ks = SoftwareKeyStore()
    mpk, rand = bytes(range(16)), bytes(range(50, 82))
    mpki, mpkr = derive_mpk_pair(ks, mpk, rand, PrfFunc(prf))
    assert derive_mpki(ks, mpk, rand, PrfFunc(prf)) == mpki != mpkr
