"""MIKEY and MIKEY-TICKET registries (RFC 3830 6, RFC 4563, RFC 4738, RFC 6043 6).

Values come from the section 6 tables themselves, never through RFC 6043 section 14's table
references (several of those point at the wrong table; see docs/rfc-readings.md).
"""

from __future__ import annotations

from enum import IntEnum

from kms.mikey.prf import PrfFunc

MIKEY_VERSION = 1


class DataType(IntEnum):
    """HDR data type (RFC 3830 T6.1.a, RFC 4650, RFC 4738, RFC 6043 T6.1)."""

    PSK_INIT = 0
    PSK_RESP = 1
    PK_INIT = 2
    PK_RESP = 3
    DH_INIT = 4
    DH_RESP = 5
    ERROR = 6
    DHHMAC_INIT = 7
    DHHMAC_RESP = 8
    RSA_R_INIT = 9
    RSA_R_RESP = 10
    REQUEST_INIT_PSK = 11
    REQUEST_INIT_PK = 12
    REQUEST_RESP = 13
    TRANSFER_INIT = 14
    TRANSFER_RESP = 15
    RESOLVE_INIT_PSK = 16
    RESOLVE_INIT_PK = 17
    RESOLVE_RESP = 18


class PayloadType(IntEnum):
    """Next Payload values (RFC 3830 T6.1.b, RFC 6043 T6.2)."""

    LAST = 0
    KEMAC = 1
    PKE = 2
    DH = 3
    SIGN = 4
    T = 5
    ID = 6
    CERT = 7
    CHASH = 8
    V = 9
    SP = 10
    RAND = 11
    ERR = 12
    TR = 13
    IDR = 14
    RANDR = 15
    TP = 16
    TICKET = 17
    KEY_DATA = 20
    GENERAL_EXT = 21


class CsIdMapType(IntEnum):
    """HDR CS ID map type (RFC 3830, RFC 4563 T3, RFC 6043 T6.4)."""

    SRTP_ID = 0
    EMPTY = 1
    GENERIC_ID = 2


class EncrAlg(IntEnum):
    """KEMAC encryption algorithm (RFC 3830 T6.2.a, RFC 6043 T6.5)."""

    NULL = 0
    AES_CM_128 = 1
    AES_KW_128 = 2
    AES_CM_256 = 3


class MacAlg(IntEnum):
    """KEMAC MAC / V Auth alg (RFC 3830 T6.2.b, RFC 6043 T6.6)."""

    NULL = 0
    HMAC_SHA_1_160 = 1
    HMAC_SHA_256_256 = 2


MAC_LENGTH = {MacAlg.NULL: 0, MacAlg.HMAC_SHA_1_160: 20, MacAlg.HMAC_SHA_256_256: 32}
ENCR_KEY_LENGTH = {
    EncrAlg.NULL: 0,
    EncrAlg.AES_CM_128: 16,
    EncrAlg.AES_KW_128: 16,
    EncrAlg.AES_CM_256: 32,
}


class KeyDataType(IntEnum):
    """Key Data sub-payload Type (RFC 3830 T6.13.a, RFC 6043 T6.7)."""

    TGK = 0
    TGK_SALT = 1
    TEK = 2
    TEK_SALT = 3
    GTGK = 4
    GTGK_SALT = 5
    MPK = 6


KEY_TYPES_WITH_SALT = frozenset({KeyDataType.TGK_SALT, KeyDataType.TEK_SALT, KeyDataType.GTGK_SALT})


class KvType(IntEnum):
    """Key Validity type (RFC 3830 T6.13.b)."""

    NULL = 0
    SPI = 1
    INTERVAL = 2


class TsType(IntEnum):
    """Timestamp type (RFC 3830 T6.6, RFC 6043 T6.8)."""

    NTP_UTC = 0
    NTP = 1
    COUNTER = 2
    NTP_UTC_32 = 3


TS_VALUE_LENGTH = {TsType.NTP_UTC: 8, TsType.NTP: 8, TsType.COUNTER: 4, TsType.NTP_UTC_32: 4}


class IdType(IntEnum):
    """ID type (RFC 3830 T6.7.a, RFC 6043 T6.10)."""

    NAI = 0
    URI = 1
    BYTE_STRING = 2


class CertType(IntEnum):
    """CERT type (RFC 3830 T6.7.b)."""

    X509V3 = 0
    X509V3_URL = 1
    X509V3_SIGN = 2
    X509V3_ENCR = 3


class HashFunc(IntEnum):
    """CHASH hash function (RFC 3830 T6.8, RFC 6043 T6.12)."""

    SHA_1 = 0
    MD5 = 1
    SHA_256 = 2


HASH_LENGTH = {HashFunc.SHA_1: 20, HashFunc.MD5: 16, HashFunc.SHA_256: 32}


class SignType(IntEnum):
    """SIGN S type (RFC 3830 T6.5)."""

    RSA_PKCS1_V1_5 = 0
    RSA_PSS = 1


class PkeCache(IntEnum):
    """PKE C field (RFC 3830 T6.3)."""

    NO_CACHE = 0
    CACHE = 1
    CACHE_FOR_CSB = 2


class DhGroup(IntEnum):
    """DH group (RFC 3830 T6.4)."""

    OAKLEY_5 = 0
    OAKLEY_1 = 1
    OAKLEY_2 = 2


DH_VALUE_LENGTH = {DhGroup.OAKLEY_5: 192, DhGroup.OAKLEY_1: 96, DhGroup.OAKLEY_2: 128}


class ErrorNo(IntEnum):
    """ERR payload error numbers (RFC 3830 T6.12, RFC 4738, RFC 6043 T6.14)."""

    AUTH_FAILURE = 0
    INVALID_TS = 1
    INVALID_PRF = 2
    INVALID_MAC = 3
    INVALID_EA = 4
    INVALID_HA = 5
    INVALID_DH = 6
    INVALID_ID = 7
    INVALID_CERT = 8
    INVALID_SP = 9
    INVALID_SPPAR = 10
    INVALID_DT = 11
    UNSPECIFIED = 12
    UNSUPPORTED_MESSAGE_TYPE = 13
    INVALID_TICKET = 14
    INVALID_TPPAR = 15


class ProtType(IntEnum):
    """Security protocol (RFC 3830 T6.10)."""

    SRTP = 0


class SrtpParam(IntEnum):
    """SRTP policy parameter types (RFC 3830 T6.10.1.a)."""

    ENCR_ALG = 0
    SESSION_ENCR_KEY_LEN = 1
    AUTH_ALG = 2
    SESSION_AUTH_KEY_LEN = 3
    SESSION_SALT_LEN = 4
    SRTP_PRF = 5
    KEY_DERIVATION_RATE = 6
    SRTP_ENCRYPTION = 7
    SRTCP_ENCRYPTION = 8
    FEC_ORDER = 9
    SRTP_AUTHENTICATION = 10
    AUTH_TAG_LEN = 11
    SRTP_PREFIX_LEN = 12


class GeneralExtType(IntEnum):
    """General Extension type (RFC 3830 T6.15, RFC 4563, RFC 4738)."""

    VENDOR_ID = 0
    SDP_IDS = 1
    TESLA_I_KEY = 2
    KEY_ID = 3
    CSB_ID = 4


class TsRole(IntEnum):
    """TR TS Role (RFC 6043 T6.9)."""

    TRI = 1  # time of issue
    TRS = 2  # start of validity
    TRE = 3  # end of validity
    TRR = 4  # rekeying interval


class IdRole(IntEnum):
    """IDR ID Role (RFC 6043 T6.11)."""

    IDRI = 1
    IDRR = 2
    IDRKMS = 3
    IDRPSK = 4
    IDRAPP = 5


class RandRole(IntEnum):
    """RANDR RAND Role (RFC 6043 T6.13)."""

    RANDRI = 1
    RANDRR = 2
    RANDRKMS = 3


class TicketType(IntEnum):
    """TP / TICKET Ticket Type (RFC 6043 T6.15)."""

    MIKEY_BASE_TICKET = 1
    THREEGPP_BASE_TICKET = 2


BASE_TICKET_SUBTYPE = 1  # RFC 6043 A
BASE_TICKET_VERSION = 1


class PrfLabel(IntEnum):
    """PRF label constants (RFC 3830 4.1.3/4.1.4, RFC 6043 T5.1, TA.1)."""

    TEK = 0x2AD01C64
    AUTH_FROM_TGK = 0x1B5C7973
    ENCR_FROM_TGK = 0x15798CEF
    SALT_FROM_TGK = 0x39A2C14B
    ENCR = 0x150533E1
    AUTH = 0x2D22AC75
    SALT = 0x29B88916
    FORK_MPKR = 0x2B288856
    FORK_TGK = 0x1512B54A
    MPKI = 0x220E99A2
    MPKR = 0x1F4D675B


__all__ = [
    "BASE_TICKET_SUBTYPE",
    "BASE_TICKET_VERSION",
    "DH_VALUE_LENGTH",
    "ENCR_KEY_LENGTH",
    "HASH_LENGTH",
    "KEY_TYPES_WITH_SALT",
    "MAC_LENGTH",
    "MIKEY_VERSION",
    "TS_VALUE_LENGTH",
    "CertType",
    "CsIdMapType",
    "DataType",
    "DhGroup",
    "EncrAlg",
    "ErrorNo",
    "GeneralExtType",
    "HashFunc",
    "IdRole",
    "IdType",
    "KeyDataType",
    "KvType",
    "MacAlg",
    "PayloadType",
    "PrfFunc",
    "PrfLabel",
    "ProtType",
    "RandRole",
    "SignType",
    "SrtpParam",
    "TicketType",
    "TsRole",
    "TsType",
]
