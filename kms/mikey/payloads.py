"""RFC 3830 payloads (section 6), one frozen dataclass each.

Each payload class knows how to encode and decode its *body*: the bytes after its Next
Payload field (SIGN has no Next Payload field). Chaining, and so the Next Payload values,
belong to :mod:`kms.mikey.chain`: a payload never stores what follows it.

Fields whose value decides the layout (MAC alg, TS type, hash func, DH group, Key Data type,
KV type) must be known values, else decoding fails; other numbered fields keep any value so
that the KMS can answer an unknown algorithm with the right MIKEY error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar, Self, TypeVar

from kms.mikey.buffer import Reader, Writer
from kms.mikey.constants import (
    DH_VALUE_LENGTH,
    HASH_LENGTH,
    KEY_TYPES_WITH_SALT,
    MAC_LENGTH,
    TS_VALUE_LENGTH,
    CertType,
    DhGroup,
    EncrAlg,
    ErrorNo,
    GeneralExtType,
    HashFunc,
    IdType,
    KeyDataType,
    KvType,
    MacAlg,
    PayloadType,
    ProtType,
    SignType,
    TsType,
)
from kms.mikey.errors import EncodeError

E = TypeVar("E", bound=IntEnum)


# Decoding looks up ~100 numbers per exchange; a dict lookup in the enum's own value map is
# ~10x cheaper than calling the enum (profiled: EnumType.__call__ was 5 % of an exchange).


def known(enum: type[E], value: int, r: Reader, what: str, offset: int) -> E:
    """Map a layout-deciding number to its enum, or fail with the field's offset."""
    member = enum._value2member_map_.get(value)
    if member is None:
        raise r.error(f"unknown {what} {value}", offset)
    return member  # type: ignore[return-value]


def as_known(enum: type[IntEnum], value: int) -> int:
    """Return the enum member for a known value (nicer repr), the plain int otherwise."""
    member = enum._value2member_map_.get(value)
    return value if member is None else member  # type: ignore[return-value]


@dataclass(frozen=True)
class Payload:
    """Base of every payload. ``raw`` holds the exact bytes it was decoded from."""

    TYPE: ClassVar[PayloadType]
    NAME: ClassVar[str]

    raw: bytes = field(default=b"", compare=False, repr=False, kw_only=True)

    def encode_body(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode_body(cls, r: Reader) -> Self:
        raise NotImplementedError


# --- Key validity data (RFC 3830 6.13, 6.14) -------------------------------------------


@dataclass(frozen=True)
class KvSpi:
    """KV type SPI/MKI: SPI length (1) | SPI."""

    spi: bytes

    def encode(self, w: Writer) -> None:
        w.push_len8(self.spi, "SPI")


@dataclass(frozen=True)
class KvInterval:
    """KV type Interval: VF length (1) | Valid From | VT length (1) | Valid To."""

    valid_from: bytes
    valid_to: bytes

    def encode(self, w: Writer) -> None:
        w.push_len8(self.valid_from, "Valid From")
        w.push_len8(self.valid_to, "Valid To")


KvData = KvSpi | KvInterval | None


def _kv_type_of(kv: KvData) -> KvType:
    if kv is None:
        return KvType.NULL
    return KvType.SPI if isinstance(kv, KvSpi) else KvType.INTERVAL


def _decode_kv(r: Reader, kv_type: KvType) -> KvData:
    if kv_type == KvType.SPI:
        return KvSpi(r.pull_bytes(r.pull_u8("SPI length"), "SPI"))
    if kv_type == KvType.INTERVAL:
        vf = r.pull_bytes(r.pull_u8("VF length"), "Valid From")
        vt = r.pull_bytes(r.pull_u8("VT length"), "Valid To")
        return KvInterval(vf, vt)
    return None


# --- Payloads -------------------------------------------------------------------------


@dataclass(frozen=True)
class Kemac(Payload):
    """Key data transport payload (RFC 3830 6.2): Encr alg | Encr data len | Encr data |
    MAC alg | MAC. ``encr_data`` is the sub-payload chain as sent (encrypted or not)."""

    TYPE = PayloadType.KEMAC
    NAME = "KEMAC"

    encr_alg: int
    encr_data: bytes = field(repr=False)
    mac_alg: int
    mac: bytes = b""

    def encode_body(self) -> bytes:
        w = Writer()
        w.push_u8(self.encr_alg, "Encr alg")
        w.push_len16(self.encr_data, "Encr data")
        w.push_u8(self.mac_alg, "MAC alg")
        if self.mac_alg in MAC_LENGTH and len(self.mac) != MAC_LENGTH[MacAlg(self.mac_alg)]:
            raise EncodeError("KEMAC MAC length does not match its MAC alg")
        w.push_bytes(self.mac)
        return w.getvalue()

    @classmethod
    def decode_body(cls, r: Reader) -> Self:
        encr_alg = r.pull_u8("Encr alg")
        data = r.pull_bytes(r.pull_u16("Encr data len"), "Encr data")
        at = r.pos
        mac_alg = known(MacAlg, r.pull_u8("MAC alg"), r, "MAC alg", at)
        mac = r.pull_bytes(MAC_LENGTH[mac_alg], "MAC")

        return cls(as_known(EncrAlg, encr_alg), data, mac_alg, mac)


@dataclass(frozen=True)
class KeyData(Payload):
    """Key data sub-payload (RFC 3830 6.13, RFC 6043 6.8): Type+KV | Key len | Key |
    [Salt len | Salt] | [KV data]."""

    TYPE = PayloadType.KEY_DATA
    NAME = "Key data"

    key_type: int
    key: bytes = field(repr=False)
    salt: bytes | None = field(default=None, repr=False)
    kv: KvData = None

    @property
    def kv_type(self) -> KvType:
        return _kv_type_of(self.kv)

    def encode_body(self) -> bytes:
        has_salt = self.key_type in KEY_TYPES_WITH_SALT
        if has_salt != (self.salt is not None):
            raise EncodeError("Key data: a salt is present exactly for the *+SALT key types")
        if not 0 <= self.key_type <= 15:
            raise EncodeError("Key data type must fit in 4 bits")
        w = Writer()
        w.push_u8((self.key_type << 4) | self.kv_type)
        w.push_len16(self.key, "Key data")
        if self.salt is not None:
            w.push_len16(self.salt, "Salt data")
        if self.kv is not None:
            self.kv.encode(w)
        return w.getvalue()

    @classmethod
    def decode_body(cls, r: Reader) -> Self:
        at = r.pos
        b = r.pull_u8("Type/KV")
        key_type = known(KeyDataType, b >> 4, r, "Key data type", at)
        kv_type = known(KvType, b & 0x0F, r, "KV type", at)
        key = r.pull_bytes(r.pull_u16("Key data len"), "Key data")
        salt = None
        if key_type in KEY_TYPES_WITH_SALT:
            salt = r.pull_bytes(r.pull_u16("Salt len"), "Salt data")
        return cls(key_type, key, salt, _decode_kv(r, kv_type))


@dataclass(frozen=True)
class Pke(Payload):
    """Envelope data payload (RFC 3830 6.3): C (2 bits) + Data len (14 bits) | Data."""

    TYPE = PayloadType.PKE
    NAME = "PKE"

    cache: int
    data: bytes

    def encode_body(self) -> bytes:
        if not 0 <= self.cache <= 3 or len(self.data) > 0x3FFF:
            raise EncodeError("PKE: C must fit in 2 bits and Data in 14-bit length")
        w = Writer()
        w.push_u16((self.cache << 14) | len(self.data))
        w.push_bytes(self.data)
        return w.getvalue()

    @classmethod
    def decode_body(cls, r: Reader) -> Self:
        v = r.pull_u16("C/Data len")
        return cls(v >> 14, r.pull_bytes(v & 0x3FFF, "Data"))


@dataclass(frozen=True)
class Dh(Payload):
    """DH data payload (RFC 3830 6.4): DH-Group | DH-value | Reserv(4)+KV(4) | KV data."""

    TYPE = PayloadType.DH
    NAME = "DH"

    group: int
    value: bytes
    kv: KvData = None
    reserved: int = 0

    def encode_body(self) -> bytes:
        if (
            self.group not in DH_VALUE_LENGTH
            or len(self.value) != DH_VALUE_LENGTH[DhGroup(self.group)]
        ):
            raise EncodeError("DH value length does not match its group")
        if not 0 <= self.reserved <= 15:
            raise EncodeError("DH reserved field must fit in 4 bits")
        w = Writer()
        w.push_u8(self.group, "DH-Group")
        w.push_bytes(self.value)
        w.push_u8((self.reserved << 4) | _kv_type_of(self.kv))
        if self.kv is not None:
            self.kv.encode(w)
        return w.getvalue()

    @classmethod
    def decode_body(cls, r: Reader) -> Self:
        at = r.pos
        group = known(DhGroup, r.pull_u8("DH-Group"), r, "DH group", at)
        value = r.pull_bytes(DH_VALUE_LENGTH[group], "DH-value")
        at = r.pos
        b = r.pull_u8("Reserv/KV")
        kv_type = known(KvType, b & 0x0F, r, "KV type", at)
        return cls(group, value, _decode_kv(r, kv_type), reserved=b >> 4)


@dataclass(frozen=True)
class Sign(Payload):
    """Signature payload (RFC 3830 6.5): S type (4 bits) + Signature len (12 bits) |
    Signature. It has no Next Payload field and is always the last payload."""

    TYPE = PayloadType.SIGN
    NAME = "SIGN"

    sign_type: int
    signature: bytes

    def encode_body(self) -> bytes:
        if not 0 <= self.sign_type <= 15 or len(self.signature) > 0xFFF:
            raise EncodeError("SIGN: S type must fit in 4 bits and Signature in 12-bit length")
        w = Writer()
        w.push_u16((self.sign_type << 12) | len(self.signature))
        w.push_bytes(self.signature)
        return w.getvalue()

    @classmethod
    def decode_body(cls, r: Reader) -> Self:
        v = r.pull_u16("S type/Signature len")

        return cls(as_known(SignType, v >> 12), r.pull_bytes(v & 0x0FFF, "Signature"))


def push_ts(w: Writer, ts_type: int, value: bytes, payload: str) -> None:
    """TS type | TS value (RFC 3830 6.6, RFC 6043 6.3/6.4), the value's length by its type."""
    if ts_type not in TS_VALUE_LENGTH or len(value) != TS_VALUE_LENGTH[TsType(ts_type)]:
        raise EncodeError(f"{payload}: TS value length does not match its TS type")
    w.push_u8(ts_type, "TS type")
    w.push_bytes(value)


def pull_ts(r: Reader) -> tuple[TsType, bytes]:
    at = r.pos
    ts_type = known(TsType, r.pull_u8("TS type"), r, "TS type", at)
    return ts_type, r.pull_bytes(TS_VALUE_LENGTH[ts_type], "TS value")


@dataclass(frozen=True)
class Timestamp(Payload):
    """Timestamp payload T (RFC 3830 6.6, RFC 6043 6.3): TS type | TS value."""

    TYPE = PayloadType.T
    NAME = "T"

    ts_type: int
    value: bytes

    def encode_body(self) -> bytes:
        w = Writer()
        push_ts(w, self.ts_type, self.value, self.NAME)
        return w.getvalue()

    @classmethod
    def decode_body(cls, r: Reader) -> Self:
        return cls(*pull_ts(r))


@dataclass(frozen=True)
class Id(Payload):
    """ID payload (RFC 3830 6.7): ID type | ID len | ID data."""

    TYPE = PayloadType.ID
    NAME = "ID"

    id_type: int
    data: bytes

    def encode_body(self) -> bytes:
        w = Writer()
        w.push_u8(self.id_type, "ID type")
        w.push_len16(self.data, "ID data")
        return w.getvalue()

    @classmethod
    def decode_body(cls, r: Reader) -> Self:
        id_type = r.pull_u8("ID type")
        return cls(as_known(IdType, id_type), r.pull_bytes(r.pull_u16("ID len"), "ID data"))


@dataclass(frozen=True)
class Cert(Payload):
    """Certificate payload (RFC 3830 6.7): Cert type | Cert len | Certificate."""

    TYPE = PayloadType.CERT
    NAME = "CERT"

    cert_type: int
    data: bytes

    def encode_body(self) -> bytes:
        w = Writer()
        w.push_u8(self.cert_type, "Cert type")
        w.push_len16(self.data, "Certificate")
        return w.getvalue()

    @classmethod
    def decode_body(cls, r: Reader) -> Self:
        ct = r.pull_u8("Cert type")
        return cls(as_known(CertType, ct), r.pull_bytes(r.pull_u16("Cert len"), "Certificate"))


@dataclass(frozen=True)
class Chash(Payload):
    """Cert hash payload (RFC 3830 6.8): Hash func | Hash."""

    TYPE = PayloadType.CHASH
    NAME = "CHASH"

    hash_func: int
    digest: bytes

    def encode_body(self) -> bytes:
        if (
            self.hash_func not in HASH_LENGTH
            or len(self.digest) != HASH_LENGTH[HashFunc(self.hash_func)]
        ):
            raise EncodeError("CHASH: hash length does not match its hash function")
        return bytes([self.hash_func]) + self.digest

    @classmethod
    def decode_body(cls, r: Reader) -> Self:
        at = r.pos
        hf = known(HashFunc, r.pull_u8("Hash func"), r, "hash function", at)
        return cls(hf, r.pull_bytes(HASH_LENGTH[hf], "Hash"))


@dataclass(frozen=True)
class Verification(Payload):
    """Verification payload V (RFC 3830 6.9): Auth alg | Ver data (the MAC)."""

    TYPE = PayloadType.V
    NAME = "V"

    mac_alg: int
    mac: bytes

    def encode_body(self) -> bytes:
        if self.mac_alg not in MAC_LENGTH or len(self.mac) != MAC_LENGTH[MacAlg(self.mac_alg)]:
            raise EncodeError("V: MAC length does not match its Auth alg")
        return bytes([self.mac_alg]) + self.mac

    @classmethod
    def decode_body(cls, r: Reader) -> Self:
        at = r.pos
        alg = known(MacAlg, r.pull_u8("Auth alg"), r, "Auth alg", at)
        return cls(alg, r.pull_bytes(MAC_LENGTH[alg], "Ver data"))


@dataclass(frozen=True)
class PolicyParam:
    """One Security Policy parameter (RFC 3830 6.10): Type | Length | Value."""

    param_type: int
    value: bytes


@dataclass(frozen=True)
class SecurityPolicy(Payload):
    """Security Policy payload SP (RFC 3830 6.10): Policy no | Prot type |
    Policy param length | Policy params (TLVs)."""

    TYPE = PayloadType.SP
    NAME = "SP"

    policy_no: int
    prot_type: int
    params: tuple[PolicyParam, ...] = ()

    def param(self, param_type: int) -> bytes | None:
        for p in self.params:
            if p.param_type == param_type:
                return p.value
        return None

    def encode_body(self) -> bytes:
        body = Writer()
        for p in self.params:
            body.push_u8(p.param_type, "SP param type")
            body.push_len8(p.value, "SP param value")
        w = Writer()
        w.push_u8(self.policy_no, "Policy no")
        w.push_u8(self.prot_type, "Prot type")
        w.push_len16(body.getvalue(), "Policy param")
        return w.getvalue()

    @classmethod
    def decode_body(cls, r: Reader) -> Self:
        policy_no = r.pull_u8("Policy no")
        prot = r.pull_u8("Prot type")
        sub = r.sub(r.pull_u16("Policy param length"), "Policy param")
        params = []
        while not sub.at_end():
            t = sub.pull_u8("param type")
            params.append(
                PolicyParam(t, sub.pull_bytes(sub.pull_u8("param length"), "param value"))
            )
        return cls(policy_no, as_known(ProtType, prot), tuple(params))


@dataclass(frozen=True)
class Rand(Payload):
    """RAND payload (RFC 3830 6.11): RAND len | RAND."""

    TYPE = PayloadType.RAND
    NAME = "RAND"

    value: bytes

    def encode_body(self) -> bytes:
        w = Writer()
        w.push_len8(self.value, "RAND")
        return w.getvalue()

    @classmethod
    def decode_body(cls, r: Reader) -> Self:
        return cls(r.pull_bytes(r.pull_u8("RAND len"), "RAND"))


@dataclass(frozen=True)
class Error(Payload):
    """Error payload ERR (RFC 3830 6.12): Error no | Reserved (16 bits)."""

    TYPE = PayloadType.ERR
    NAME = "ERR"

    error_no: int
    reserved: int = 0

    def encode_body(self) -> bytes:
        w = Writer()
        w.push_u8(self.error_no, "Error no")
        w.push_u16(self.reserved, "Reserved")
        return w.getvalue()

    @classmethod
    def decode_body(cls, r: Reader) -> Self:
        no = r.pull_u8("Error no")
        return cls(as_known(ErrorNo, no), r.pull_u16("Reserved"))


@dataclass(frozen=True)
class KeyIdInfo:
    """RFC 4563 4: the Data of a Key ID general extension: Key ID Type | Key ID len | Key ID."""

    key_id_type: int
    key_id: bytes

    def encode(self) -> bytes:
        w = Writer()
        w.push_u8(self.key_id_type, "Key ID Type")
        w.push_len16(self.key_id, "Key ID")
        return w.getvalue()

    @classmethod
    def decode(cls, r: Reader) -> Self:
        t = r.pull_u8("Key ID Type")
        kid = r.pull_bytes(r.pull_u16("Key ID len"), "Key ID")
        r.expect_end("Key ID information")
        return cls(t, kid)


@dataclass(frozen=True)
class GeneralExtension(Payload):
    """General Extension payload (RFC 3830 6.15): Type | Length | Data."""

    TYPE = PayloadType.GENERAL_EXT
    NAME = "General Extension"

    ext_type: int
    data: bytes

    @property
    def key_id(self) -> KeyIdInfo | None:
        """The RFC 4563 Key ID information carried, if this is a Key ID extension."""
        if self.ext_type != GeneralExtType.KEY_ID:
            return None
        return KeyIdInfo.decode(Reader(self.data, payload="Key ID"))

    def encode_body(self) -> bytes:
        w = Writer()
        w.push_u8(self.ext_type, "Extension type")
        w.push_len16(self.data, "Extension data")
        return w.getvalue()

    @classmethod
    def decode_body(cls, r: Reader) -> Self:
        ext_type = r.pull_u8("Type")
        sub = r.sub(r.pull_u16("Length"), "Data")
        data = sub.pull_bytes(sub.remaining(), "Data")
        if ext_type == GeneralExtType.KEY_ID:
            # RFC 4563: a Key ID extension must hold exactly one Key ID information block.
            KeyIdInfo.decode(Reader(sub.data, sub.end - len(data), sub.end, r.payload))
        return cls(as_known(GeneralExtType, ext_type), data)
