"""Key derivations of MIKEY-TICKET (RFC 6043 5.1, 6.10, A.2) and MIKEY (RFC 3830 4.1.3/4.1.4).

Every function takes a :data:`~kms.mikey.prf.KeyedPrf` whose in-key is held by the caller
(host memory or a token): this module never sees long-term keys. Label layouts follow
RFC 6043 5.1.1-5.1.3, 6.10 and A.2 (and RFC 3830 4.1.3-4.1.4 for compatibility); output
lengths RFC 3830 4.1.4 and RFC 6043 6.2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from kms.mikey.constants import ENCR_KEY_LENGTH, MAC_LENGTH, EncrAlg, MacAlg, PrfLabel
from kms.mikey.prf import KeyedPrf, prf_outputs

ALL_CSB = 0xFFFF_FFFF  # RFC 6043 5.1.1/5.1.3: the 0xFFFFFFFF field in non-message labels
NO_CS_ID = 0xFF  # RFC 6043 5.1.2 / RFC 3830 4.1.4: cs_id byte of message-key labels


class KeyDirection(IntEnum):
    """Type byte of RFC 6043 message-key labels (RFC 6043 5.1.2)."""

    INITIAL = 0x01
    RESPONSE = 0x02


class _LabelType(IntEnum):
    """Type byte of the other RFC 6043 labels (RFC 6043 5.1.1, 5.1.3, 6.10, A.2)."""

    FORKING = 0x00
    SESSION = 0x03
    VR_KEY = 0x04
    TICKET = 0x05
    MPK = 0x06


SALT_KEY_LENGTH = {
    EncrAlg.NULL: 0,
    EncrAlg.AES_CM_128: 14,  # RFC 3830 4.2.3: 112-bit salt for the AES-CM IV
    EncrAlg.AES_KW_128: 8,  # RFC 3830 4.2.3 / RFC 3394: 64-bit IV for AES-KW
    EncrAlg.AES_CM_256: 14,  # RFC 6043 6.2
}
"""salt_key length in bytes per KEMAC encryption algorithm (RFC 3830 4.1.4, 4.2.3)."""

AUTH_KEY_LENGTH = dict(MAC_LENGTH)
"""auth_key length in bytes per MAC algorithm: 160 / 256 bits (RFC 3830 4.1.4, RFC 6043 6.2)."""

SRTP_SALT_LENGTH = 14  # RFC 3711 default 112-bit master salt


@dataclass(frozen=True)
class MessageKeys:
    """encr_key, auth_key and salt_key of one message (RFC 3830 4.1.4, RFC 6043 5.1.2).

    The repr shows lengths only, never key values.
    """

    encr_key: bytes = field(repr=False)
    auth_key: bytes = field(repr=False)
    salt_key: bytes = field(repr=False)

    def __repr__(self) -> str:
        return (
            f"MessageKeys(encr_key=<{len(self.encr_key)} bytes>, "
            f"auth_key=<{len(self.auth_key)} bytes>, salt_key=<{len(self.salt_key)} bytes>)"
        )


# --- field encoders ---------------------------------------------------------------------


def _u8(value: int, what: str) -> bytes:
    if not 0 <= value <= 0xFF:
        raise ValueError(f"{what} must fit in 8 bits")
    return value.to_bytes(1, "big")


def _u32(value: int, what: str) -> bytes:
    if not 0 <= value <= 0xFFFF_FFFF:
        raise ValueError(f"{what} must fit in 32 bits")
    return value.to_bytes(4, "big")


def _len8(data: bytes | None, what: str) -> bytes:
    """1-byte length then the bytes; an absent value is 0x00 with no bytes (RFC 6043 5.1.2)."""
    data = data or b""
    if len(data) > 0xFF:
        raise ValueError(f"{what} longer than 255 bytes")
    return bytes([len(data)]) + data


def _len16(data: bytes, what: str) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError(f"{what} longer than 65535 bytes")
    return len(data).to_bytes(2, "big") + data


# --- label builders (RFC 6043) ------------------------------------------------------------


def message_key_label(
    const: int,
    csb_id: int,
    direction: KeyDirection,
    rand_i: bytes | None,
    rand_r: bytes | None,
) -> bytes:
    """const || 0xFF || CSB ID || 0x01/0x02 || len8 || RANDRi || len8 || RANDRr (RFC 6043 5.1.2)."""
    return (
        _u32(const, "label constant")
        + bytes([NO_CS_ID])
        + _u32(csb_id, "CSB ID")
        + bytes([KeyDirection(direction)])
        + _len8(rand_i, "RANDRi")
        + _len8(rand_r, "RANDRr")
    )


def forking_label(const: int, id_data: bytes, rand_kms: bytes) -> bytes:
    """const || 0xFF || 0xFFFFFFFF || 0x00 || len16 || ID Data || len8 || RANDRkms.

    RFC 6043 5.1.1 (forked MPKr' and TGK').
    """
    return (
        _u32(const, "label constant")
        + bytes([NO_CS_ID])
        + _u32(ALL_CSB, "CSB ID")
        + bytes([_LabelType.FORKING])
        + _len16(id_data, "ID Data")
        + _len8(rand_kms, "RANDRkms")
    )


def session_key_label(const: int, cs_id: int, rand_i: bytes | None, rand_r: bytes | None) -> bytes:
    """const || CS ID || 0xFFFFFFFF || 0x03 || len8 || RANDRi || len8 || RANDRr (RFC 6043 5.1.3)."""
    return (
        _u32(const, "label constant")
        + _u8(cs_id, "CS ID")
        + _u32(ALL_CSB, "CSB ID")
        + bytes([_LabelType.SESSION])
        + _len8(rand_i, "RANDRi")
        + _len8(rand_r, "RANDRr")
    )


def vr_key_label(const: int) -> bytes:
    """const || 0xFF || 0xFFFFFFFF || 0x04 (RFC 6043 6.10, Initiator Data Vr key)."""
    return (
        _u32(const, "label constant")
        + bytes([NO_CS_ID])
        + _u32(ALL_CSB, "CSB ID")
        + bytes([_LabelType.VR_KEY])
    )


def ticket_key_label(const: int, rand: bytes) -> bytes:
    """const || 0xFF || 0xFFFFFFFF || 0x05 || len8 || RAND (RFC 6043 A.2.1, keys from TPK)."""
    return (
        _u32(const, "label constant")
        + bytes([NO_CS_ID])
        + _u32(ALL_CSB, "CSB ID")
        + bytes([_LabelType.TICKET])
        + _len8(rand, "RAND")
    )


def mpk_label(const: int, rand: bytes) -> bytes:
    """const || 0xFF || 0xFFFFFFFF || 0x06 || len8 || RAND (RFC 6043 A.2.2, MPKi / MPKr)."""
    return (
        _u32(const, "label constant")
        + bytes([NO_CS_ID])
        + _u32(ALL_CSB, "CSB ID")
        + bytes([_LabelType.MPK])
        + _len8(rand, "RAND")
    )


# --- label builders (RFC 3830 compatibility) ----------------------------------------------


def rfc3830_message_key_label(const: int, csb_id: int, rand: bytes) -> bytes:
    """const || 0xFF || csb_id || RAND (RFC 3830 4.1.4; RAND bytes only, no length)."""
    return _u32(const, "label constant") + bytes([NO_CS_ID]) + _u32(csb_id, "CSB ID") + rand


def rfc3830_tgk_label(const: int, cs_id: int, csb_id: int, rand: bytes) -> bytes:
    """const || cs_id || csb_id || RAND (RFC 3830 4.1.3; RAND bytes only, no length)."""
    return _u32(const, "label constant") + _u8(cs_id, "CS ID") + _u32(csb_id, "CSB ID") + rand


# --- derivations ---------------------------------------------------------------------------


def _prf_or_empty(prf: KeyedPrf, label: bytes, length: int) -> bytes:
    """PRF output, or b"" for a zero length (NULL algorithms derive no key)."""
    if length < 0:
        raise ValueError("key length must not be negative")
    return prf(label, length) if length else b""


def _key_requests(
    label_for: dict[PrfLabel, bytes], encr_alg: EncrAlg, mac_alg: MacAlg
) -> list[tuple[PrfLabel, bytes, int]]:
    """(constant, label, length) of the encr/auth/salt keys a suite needs; a NULL algorithm
    derives no key (RFC 3830 4.1.4)."""
    encr_alg = EncrAlg(encr_alg)
    mac_alg = MacAlg(mac_alg)
    lengths = {
        PrfLabel.ENCR: ENCR_KEY_LENGTH[encr_alg],
        PrfLabel.AUTH: AUTH_KEY_LENGTH[mac_alg],
        PrfLabel.SALT: SALT_KEY_LENGTH[encr_alg],
    }
    return [(c, label_for[c], lengths[c]) for c in _MESSAGE_CONSTS if lengths[c]]


def _keys_of(wanted: list[tuple[PrfLabel, bytes, int]], outputs: list[bytes]) -> MessageKeys:
    got = {c: out for (c, _, _), out in zip(wanted, outputs, strict=True)}
    return MessageKeys(
        encr_key=got.get(PrfLabel.ENCR, b""),
        auth_key=got.get(PrfLabel.AUTH, b""),
        salt_key=got.get(PrfLabel.SALT, b""),
    )


def _message_keys(
    prf: KeyedPrf,
    label_for: dict[PrfLabel, bytes],
    encr_alg: EncrAlg,
    mac_alg: MacAlg,
) -> MessageKeys:
    # The three keys under one in-key in one go (one token operation for the KMS).
    wanted = _key_requests(label_for, encr_alg, mac_alg)
    return _keys_of(wanted, prf_outputs(prf, [(label, n) for _, label, n in wanted]))


_MESSAGE_CONSTS = (PrfLabel.ENCR, PrfLabel.AUTH, PrfLabel.SALT)  # RFC 3830 4.1.4


def derive_message_keys(
    prf: KeyedPrf,
    csb_id: int,
    direction: KeyDirection,
    rand_i: bytes | None,
    rand_r: bytes | None,
    encr_alg: EncrAlg,
    mac_alg: MacAlg,
) -> MessageKeys:
    """Message keys from a PSK, envelope key, MPKi or MPKr' (RFC 6043 5.1.2).

    ``prf`` is keyed with that key and uses the HDR PRF func (RFC 3830 6.1; RFC 6043 5.1.2
    names none).
    """
    labels = {c: message_key_label(c, csb_id, direction, rand_i, rand_r) for c in _MESSAGE_CONSTS}
    return _message_keys(prf, labels, encr_alg, mac_alg)


def derive_exchange_keys(
    prf: KeyedPrf,
    csb_id: int,
    rand_i: bytes | None,
    rand_r: bytes | None,
    initial: tuple[EncrAlg, MacAlg],
    response: tuple[EncrAlg, MacAlg],
) -> tuple[MessageKeys, MessageKeys]:
    """The keys of an initial message (0x01) and of its response (0x02) under the same
    in-key, in one go (RFC 6043 5.1.2: both labels carry the initial message's RANDs and CSB
    ID): one token operation for the KMS instead of one per message. ``initial`` and
    ``response`` are the (Encr alg, MAC alg) each message's keys are for; a NULL algorithm
    derives no key (e.g. verifying a V needs the auth key only)."""
    # The six labels differ in the constant and the type byte only (message_key_label).
    csb = bytes([NO_CS_ID]) + _u32(csb_id, "CSB ID")
    rands = _len8(rand_i, "RANDRi") + _len8(rand_r, "RANDRr")
    first = _key_requests(
        {c: c.to_bytes(4, "big") + csb + b"\x01" + rands for c in _MESSAGE_CONSTS}, *initial)
    second = _key_requests(
        {c: c.to_bytes(4, "big") + csb + b"\x02" + rands for c in _MESSAGE_CONSTS}, *response)
    outputs = prf_outputs(prf, [(label, n) for _, label, n in first + second])
    return _keys_of(first, outputs[: len(first)]), _keys_of(second, outputs[len(first) :])


def derive_ticket_keys(
    prf_tpk: KeyedPrf, rand: bytes, encr_alg: EncrAlg, mac_alg: MacAlg
) -> MessageKeys:
    """Base-ticket KEMAC / V keys from the TPK (RFC 6043 A.2.1, label type 0x05)."""
    labels = {c: ticket_key_label(c, rand) for c in _MESSAGE_CONSTS}
    return _message_keys(prf_tpk, labels, encr_alg, mac_alg)


def derive_mpki(prf_mpk: KeyedPrf, rand: bytes, length: int) -> bytes:
    """MPKi from the ticket MPK (RFC 6043 A.2.2); ``length`` is the MPK length."""
    return prf_mpk(mpk_label(PrfLabel.MPKI, rand), length)


def derive_mpkr(prf_mpk: KeyedPrf, rand: bytes, length: int) -> bytes:
    """MPKr from the ticket MPK (RFC 6043 A.2.2); ``length`` is the MPK length."""
    return prf_mpk(mpk_label(PrfLabel.MPKR, rand), length)


def derive_mpki_mpkr(prf_mpk: KeyedPrf, rand: bytes, length: int) -> tuple[bytes, bytes]:
    """(MPKi, MPKr) in one go (RFC 6043 A.2.2): for the KMS, one token session object of the
    MPK for both."""
    labels = (mpk_label(PrfLabel.MPKI, rand), mpk_label(PrfLabel.MPKR, rand))
    mpki, mpkr = prf_outputs(prf_mpk, [(label, length) for label in labels])
    return mpki, mpkr


def derive_forked_mpkr(prf_mpkr: KeyedPrf, id_data: bytes, rand_kms: bytes, length: int) -> bytes:
    """MPKr' = PRF(MPKr, forking label) (RFC 6043 5.1.1); ``length`` is the MPKr length."""
    return prf_mpkr(forking_label(PrfLabel.FORK_MPKR, id_data, rand_kms), length)


def derive_forked_tgk(prf_tgk: KeyedPrf, id_data: bytes, rand_kms: bytes, length: int) -> bytes:
    """TGK' = PRF(TGK, forking label) (RFC 6043 5.1.1); ``length`` is the TGK length."""
    return prf_tgk(forking_label(PrfLabel.FORK_TGK, id_data, rand_kms), length)


def derive_session_key(
    prf_tgk: KeyedPrf,
    const: int,
    cs_id: int,
    rand_i: bytes | None,
    rand_r: bytes | None,
    length: int,
) -> bytes:
    """A key for crypto session ``cs_id`` from a TGK, TGK' or GTGK (RFC 6043 5.1.3).

    The caller applies the flags: ``rand_i`` is None unless H = 1, ``rand_r`` is None unless
    G = 1. At least one RAND must be used (RFC 6043 5.1.3), so both None raises ValueError.
    """
    if rand_i is None and rand_r is None:
        raise ValueError("session key derivation needs RANDRi or RANDRr (H or G flag)")
    return prf_tgk(session_key_label(const, cs_id, rand_i, rand_r), length)


def derive_tek(
    prf_tgk: KeyedPrf, cs_id: int, rand_i: bytes | None, rand_r: bytes | None, length: int
) -> bytes:
    """TEK from a TGK (RFC 6043 5.1.3, constant 0x2AD01C64 of RFC 3830 4.1.3)."""
    return derive_session_key(prf_tgk, PrfLabel.TEK, cs_id, rand_i, rand_r, length)


def derive_srtp_salt(
    prf_tgk: KeyedPrf,
    cs_id: int,
    rand_i: bytes | None,
    rand_r: bytes | None,
    length: int = SRTP_SALT_LENGTH,
) -> bytes:
    """Salting key from a TGK (RFC 6043 5.1.3, constant 0x39A2C14B of RFC 3830 4.1.3)."""
    return derive_session_key(prf_tgk, PrfLabel.SALT_FROM_TGK, cs_id, rand_i, rand_r, length)


def derive_vr_auth_key(prf_mpkr: KeyedPrf, mac_alg: MacAlg) -> bytes:
    """auth_key for the Initiator Data Vr MAC from the unforked MPKr (RFC 6043 6.10).

    ``prf_mpkr`` uses the TP PRF Func (docs/rfc-readings.md R3).
    """
    return _prf_or_empty(prf_mpkr, vr_key_label(PrfLabel.AUTH), AUTH_KEY_LENGTH[MacAlg(mac_alg)])


def derive_vr_key_and_forked_mpkr(
    prf_mpkr: KeyedPrf, mac_alg: MacAlg, id_data: bytes, rand_kms: bytes, length: int
) -> tuple[bytes, bytes]:
    """(Vr auth_key, MPKr') in one go: both are keyed by the unforked MPKr (RFC 6043 6.10,
    5.1.1), so the KMS needs one token session object of MPKr for both. The caller must not
    hand out MPKr' unless Vr verifies."""
    auth_len = AUTH_KEY_LENGTH[MacAlg(mac_alg)]
    if not auth_len:
        raise ValueError("Vr needs a MAC algorithm")
    vr_key, forked = prf_outputs(prf_mpkr, [
        (vr_key_label(PrfLabel.AUTH), auth_len),
        (forking_label(PrfLabel.FORK_MPKR, id_data, rand_kms), length),
    ])
    return vr_key, forked


# --- RFC 3830 compatibility ---------------------------------------------------------------


def derive_rfc3830_message_keys(
    prf: KeyedPrf, csb_id: int, rand: bytes, encr_alg: EncrAlg, mac_alg: MacAlg
) -> MessageKeys:
    """encr/auth/salt keys from a PSK or envelope key, plain MIKEY (RFC 3830 4.1.4)."""
    labels = {c: rfc3830_message_key_label(c, csb_id, rand) for c in _MESSAGE_CONSTS}
    return _message_keys(prf, labels, encr_alg, mac_alg)


def derive_rfc3830_tek(
    prf_tgk: KeyedPrf, cs_id: int, csb_id: int, rand: bytes, length: int
) -> bytes:
    """TEK from a TGK, plain MIKEY (RFC 3830 4.1.3)."""
    return prf_tgk(rfc3830_tgk_label(PrfLabel.TEK, cs_id, csb_id, rand), length)


def derive_rfc3830_srtp_salt(
    prf_tgk: KeyedPrf, cs_id: int, csb_id: int, rand: bytes, length: int = SRTP_SALT_LENGTH
) -> bytes:
    """Salting key from a TGK, plain MIKEY (RFC 3830 4.1.3)."""
    return prf_tgk(rfc3830_tgk_label(PrfLabel.SALT_FROM_TGK, cs_id, csb_id, rand), length)


__all__ = [
    "ALL_CSB",
    "AUTH_KEY_LENGTH",
    "NO_CS_ID",
    "SALT_KEY_LENGTH",
    "SRTP_SALT_LENGTH",
    "KeyDirection",
    "MessageKeys",
    "derive_exchange_keys",
    "derive_forked_mpkr",
    "derive_forked_tgk",
    "derive_message_keys",
    "derive_mpki",
    "derive_mpkr",
    "derive_mpki_mpkr",
    "derive_rfc3830_message_keys",
    "derive_rfc3830_srtp_salt",
    "derive_rfc3830_tek",
    "derive_session_key",
    "derive_srtp_salt",
    "derive_tek",
    "derive_ticket_keys",
    "derive_vr_auth_key",
    "derive_vr_key_and_forked_mpkr",
    "forking_label",
    "message_key_label",
    "mpk_label",
    "rfc3830_message_key_label",
    "rfc3830_tgk_label",
    "session_key_label",
    "ticket_key_label",
    "vr_key_label",
]
