"""What both endpoints share: crypto sessions, SRTP keys from TGK/TEK (RFC 6043 5.1.3,
RFC 3830 4.1.3), and the checks on messages they receive.

Sans-IO: functions of bytes, time and a key store; no sockets, no clock reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kms.keystore import KeyOps
from kms.mikey.constants import KeyDataType, PrfFunc, ProtType, SrtpParam
from kms.mikey.derive import MessageKeys, derive_srtp_salt, derive_tek
from kms.mikey.header import GenericIdEntry, GenericIdMap
from kms.mikey.payloads import KeyData, KvSpi, PolicyParam, SecurityPolicy
from kms.mikey.protect import Suite, keyed_prf
from kms.mikey.ticket import TicketPolicy, TpFlag


class EndpointError(Exception):
    """A message was refused by an endpoint (bad MAC, wrong type, unacceptable policy...)."""


@dataclass(frozen=True)
class SrtpProfile:
    """An SRTP crypto suite as an SP payload describes it (RFC 3830 6.10.1)."""

    name: str
    encr_key_len: int
    salt_len: int
    auth_key_len: int
    auth_tag_len: int


AES_CM_128_HMAC_SHA1_80 = SrtpProfile("AES_CM_128_HMAC_SHA1_80", 16, 14, 20, 10)
AES_CM_128_HMAC_SHA1_32 = SrtpProfile("AES_CM_128_HMAC_SHA1_32", 16, 14, 20, 4)
AES_256_CM_HMAC_SHA1_80 = SrtpProfile("AES_256_CM_HMAC_SHA1_80", 32, 14, 20, 10)
PROFILES = (AES_CM_128_HMAC_SHA1_80, AES_CM_128_HMAC_SHA1_32, AES_256_CM_HMAC_SHA1_80)


def security_policy(policy_no: int, profile: SrtpProfile) -> SecurityPolicy:
    """An SP payload for SRTP with AES-CM and HMAC-SHA-1 (RFC 3830 6.10.1)."""
    params = (
        (SrtpParam.ENCR_ALG, 1),  # AES-CM
        (SrtpParam.SESSION_ENCR_KEY_LEN, profile.encr_key_len),
        (SrtpParam.AUTH_ALG, 1),  # HMAC-SHA-1
        (SrtpParam.SESSION_AUTH_KEY_LEN, profile.auth_key_len),
        (SrtpParam.SESSION_SALT_LEN, profile.salt_len),
        (SrtpParam.AUTH_TAG_LEN, profile.auth_tag_len),
    )
    return SecurityPolicy(
        policy_no, ProtType.SRTP, tuple(PolicyParam(t, bytes([v])) for t, v in params)
    )


def profile_of(sp: SecurityPolicy | None) -> SrtpProfile:
    """The SRTP profile an SP payload names (RFC 3830 defaults where a parameter is absent)."""
    if sp is None:
        return AES_CM_128_HMAC_SHA1_80

    def value(t: SrtpParam, default: int) -> int:
        v = sp.param(t)
        return int.from_bytes(v, "big") if v else default

    encr = value(SrtpParam.SESSION_ENCR_KEY_LEN, 16)
    tag = value(SrtpParam.AUTH_TAG_LEN, 10)
    for p in PROFILES:
        if p.encr_key_len == encr and p.auth_tag_len == tag:
            return p
    raise EndpointError(f"unsupported SRTP policy (key {encr} bytes, tag {tag} bytes)")


@dataclass(frozen=True)
class CryptoSession:
    """One SRTP stream of the CSB: GENERIC-ID CS ID, its SSRC and the SP policy it uses."""

    cs_id: int
    ssrc: int
    policy_no: int = 0


def generic_id_map(sessions: Sequence[CryptoSession], spi: bytes = b"") -> GenericIdMap:
    """RFC 6043 6.1.1: GENERIC-ID map, one policy per CS, Session Data = SSRC."""
    return GenericIdMap(
        tuple(
            GenericIdEntry(
                s.cs_id, ProtType.SRTP, False, (s.policy_no,), s.ssrc.to_bytes(4, "big"), spi
            )
            for s in sessions
        )
    )


def sessions_of(cs_map: object) -> list[CryptoSession]:
    if not isinstance(cs_map, GenericIdMap):
        raise EndpointError("TRANSFER messages must use the GENERIC-ID map (RFC 6043 6.1.1)")
    out = []
    for e in cs_map.entries:
        ssrc = int.from_bytes(e.session_data[:4], "big") if len(e.session_data) >= 4 else 0
        out.append(CryptoSession(e.cs_id, ssrc, e.policy_nos[0] if e.policy_nos else 0))
    return out


@dataclass(frozen=True)
class SrtpKeys:
    """SRTP master key and salt for one crypto session (what goes to libsrtp)."""

    cs_id: int
    ssrc: int
    profile: SrtpProfile
    master_key: bytes = field(repr=False)
    master_salt: bytes = field(repr=False)
    spi: bytes = b""

    @property
    def key_and_salt(self) -> bytes:
        return self.master_key + self.master_salt


def spi_of(k: KeyData) -> bytes:
    return k.kv.spi if isinstance(k.kv, KvSpi) else b""


_TGK_LIKE = frozenset(
    {KeyDataType.TGK, KeyDataType.TGK_SALT, KeyDataType.GTGK, KeyDataType.GTGK_SALT}
)
_TEK_LIKE = frozenset({KeyDataType.TEK, KeyDataType.TEK_SALT})


def srtp_keys(
    ks: KeyOps,
    session_keys: Sequence[KeyData],
    sessions: Sequence[CryptoSession],
    policies: Sequence[SecurityPolicy],
    policy: TicketPolicy,
    hdr_prf: int,
    rand_i: bytes | None,
    rand_r: bytes | None,
) -> list[SrtpKeys]:
    """SRTP keys per crypto session (RFC 6043 5.1.3).

    From a TGK/GTGK (first one found): TEK and salt derived per CS with RANDRi iff H = 1 and
    RANDRr iff G = 1; a Key data salt, when present, is used instead of a derived one. From
    TEKs (no TGK): the i-th TEK serves the i-th crypto session.
    """
    use_i = rand_i if policy.flags & TpFlag.H else None
    use_r = rand_r if policy.flags & TpFlag.G else None
    by_no = {sp.policy_no: sp for sp in policies}
    tgk = next((k for k in session_keys if k.key_type in _TGK_LIKE), None)
    teks = [k for k in session_keys if k.key_type in _TEK_LIKE]
    out = []
    for i, cs in enumerate(sessions):
        profile = profile_of(by_no.get(cs.policy_no))
        if tgk is not None:
            prf = keyed_prf(ks, tgk.key, PrfFunc(hdr_prf))
            tek = derive_tek(prf, cs.cs_id, use_i, use_r, profile.encr_key_len)
            salt = tgk.salt or derive_srtp_salt(prf, cs.cs_id, use_i, use_r, profile.salt_len)
            spi = spi_of(tgk)
        elif i < len(teks):
            tek, salt = teks[i].key, teks[i].salt or b""
            if len(tek) != profile.encr_key_len or len(salt) != profile.salt_len:
                raise EndpointError("TEK or salt length does not match the SRTP policy")
            spi = spi_of(teks[i])
        else:
            raise EndpointError(f"no session key for crypto session {cs.cs_id}")
        out.append(SrtpKeys(cs.cs_id, cs.ssrc, profile, tek, salt[: profile.salt_len], spi))
    return out


@dataclass(frozen=True)
class CallState:
    """What an endpoint keeps after the Ticket Transfer, for CSB updates (RFC 6043 5.2)."""

    csb_id: int
    prf_func: int
    suite: Suite
    keys: MessageKeys = field(repr=False)  # protected the last message of the initial exchange
    local_id: bytes
    peer_id: bytes
    rand_i: bytes | None = field(repr=False)
    rand_r: bytes | None = field(repr=False)
    policy: TicketPolicy
    session_keys: tuple[KeyData, ...] = field(repr=False)
    sessions: tuple[CryptoSession, ...]
    policies: tuple[SecurityPolicy, ...]
    srtp: tuple[SrtpKeys, ...] = field(repr=False)
