"""Ticket policy: validate the desired TP and grant one within the KMS's own policy
(RFC 6043 4.2.1.4, 4.2.1.5, 6.10).

The KMS honours what it can, changes what its policy requires (and then sets flag K), and
refuses with Invalid TPpar what it cannot honour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from kms.core.errors import Refusal, denied
from kms.mikey.constants import (
    BASE_TICKET_SUBTYPE,
    BASE_TICKET_VERSION,
    ErrorNo,
    IdRole,
    IdType,
    KeyDataType,
    PrfFunc,
    TicketType,
    TsRole,
    TsType,
)
from kms.mikey.ntp import MAX_UNIX, MIN_UNIX, decode_ts_value, encode_ts_value
from kms.mikey.payloads import Kemac, KeyData, KvData, Payload
from kms.mikey.ticket import Idr, TicketPolicy, TpFlag, Tr

SESSION_KEY_TYPES = (
    KeyDataType.TGK,
    KeyDataType.TGK_SALT,
    KeyDataType.TEK,
    KeyDataType.TEK_SALT,
    KeyDataType.GTGK,
    KeyDataType.GTGK_SALT,
)
SALTED = frozenset({KeyDataType.TGK_SALT, KeyDataType.TEK_SALT, KeyDataType.GTGK_SALT})
TGK_TYPES = frozenset({KeyDataType.TGK, KeyDataType.TGK_SALT})


class Forking(StrEnum):
    ALLOWED = "allowed"
    REQUIRED = "required"
    FORBIDDEN = "forbidden"


@dataclass(frozen=True)
class KmsPolicy:
    """The KMS's configured policy (kms.toml ``[policy]``)."""

    kms_id: bytes
    kms_id_type: int = IdType.URI
    prf_funcs: frozenset[int] = frozenset({PrfFunc.MIKEY_1, PrfFunc.PRF_HMAC_SHA_256})
    key_types: frozenset[int] = frozenset(SESSION_KEY_TYPES)
    key_lengths: frozenset[int] = frozenset({16, 32})
    salt_length: int = 14
    max_session_keys: int = 8
    max_lifetime_s: int = 86400
    default_lifetime_s: int = 3600
    forking: Forking = Forking.ALLOWED
    reuse_allowed: bool = True
    initiator_keys_allowed: bool = True
    responders_must_be_known: bool = False
    timestamp_window_s: int = 120
    rand_length: int = 16


@dataclass(frozen=True)
class KeyRequest:
    """One session key the granted ticket will carry."""

    key_type: KeyDataType
    length: int
    salt_length: int | None
    kv: KvData
    supplied: KeyData | None = field(default=None, repr=False)  # Initiator-supplied (B.2)


@dataclass(frozen=True)
class Grant:
    policy: TicketPolicy
    keys: tuple[KeyRequest, ...]
    changed: bool


def check_flag_rules(flags: TpFlag, has_tgk: bool) -> str | None:
    """RFC 6043 6.10 flag dependencies (reference 5.2); None when they hold, else why."""
    f = flags

    def on(x: TpFlag) -> bool:
        return bool(f & x)

    rules = (
        (on(TpFlag.D) or on(TpFlag.L), "an Initiator-generated ticket (D=0) needs L=1"),
        (not on(TpFlag.G) or on(TpFlag.F), "G=1 needs F=1"),
        (on(TpFlag.G) or on(TpFlag.H), "G=0 needs H=1"),
        (not on(TpFlag.I) or on(TpFlag.E), "forking (I=1) needs E=1"),
        (not on(TpFlag.K) or on(TpFlag.D), "K=1 needs D=1"),
        (not on(TpFlag.M) or on(TpFlag.F), "M=1 needs F=1"),
        (not (on(TpFlag.I) and has_tgk) or on(TpFlag.F), "forking a TGK needs F=1"),
    )
    for ok, why in rules:
        if not ok:
            return why
    return None


def invalid_tp(reason: str) -> Refusal:
    return denied(ErrorNo.INVALID_TPPAR, "ticket policy cannot be granted", reason)


def _time_of(tr: Tr) -> float:
    if tr.ts_type == TsType.COUNTER:
        raise invalid_tp("TRs/TRe must be NTP timestamps")
    return decode_ts_value(TsType(tr.ts_type), tr.value)


def _tr(role: TsRole, unix: float) -> Tr:
    unix = min(max(math.floor(unix), MIN_UNIX), MAX_UNIX)
    return Tr(role, TsType.NTP_UTC_32, encode_ts_value(TsType.NTP_UTC_32, unix))


def _key_requests(
    kemac: Kemac | None,
    requested: tuple[KeyData, ...],
    supplied: bool,
    pol: KmsPolicy,
    default_length: int,
) -> tuple[tuple[KeyRequest, ...], bool]:
    """The session keys to put in the ticket, and whether the KMS changed the request."""
    if kemac is None:
        # RFC 6043 4.2.1.5: with no desired KEMAC, a single TGK is RECOMMENDED.
        return (KeyRequest(KeyDataType.TGK, default_length, None, None),), False
    if not requested or len(requested) > pol.max_session_keys:
        raise invalid_tp(f"desired KEMAC must list 1..{pol.max_session_keys} keys")
    out = []
    for kd in requested:
        kt = kd.key_type
        if kt not in SESSION_KEY_TYPES or kt not in pol.key_types:
            raise invalid_tp(f"key type {kt} not allowed")
        length = len(kd.key) or default_length
        if length not in pol.key_lengths:
            raise invalid_tp(f"key length {length} not allowed")
        salt_len = None
        if kt in SALTED:
            salt_len = len(kd.salt or b"") or pol.salt_length
            if not 1 <= salt_len <= 32:
                raise invalid_tp("salt length not allowed")
        if supplied and kt not in (KeyDataType.TEK, KeyDataType.TEK_SALT):
            # Appendix B.2: the KMS translates Initiator-chosen TEKs only.
            raise invalid_tp("only TEKs may be supplied by the Initiator")
        out.append(KeyRequest(KeyDataType(kt), length, salt_len, kd.kv, kd if supplied else None))
    return tuple(out), False


def grant_policy(
    desired: TicketPolicy,
    *,
    initiator: Idr,
    pol: KmsPolicy,
    now: float,
    requested_keys: tuple[KeyData, ...] = (),
    keys_supplied: bool = False,
    is_known: object = None,
    applications: frozenset[bytes] = frozenset(),
) -> Grant:
    """Grant a ticket policy for ``desired`` (a TP payload from REQUEST_INIT).

    ``is_known(identity) -> bool`` tells whether a responder identity is registered (used when
    the policy requires known responders).
    """
    if (desired.ticket_type, desired.subtype, desired.version) != (
        TicketType.MIKEY_BASE_TICKET,
        BASE_TICKET_SUBTYPE,
        BASE_TICKET_VERSION,
    ):
        raise denied(
            ErrorNo.INVALID_TICKET,
            "ticket type not supported",
            f"desired ticket type {desired.ticket_type}/{desired.subtype}/{desired.version}",
        )
    if desired.prf_func not in pol.prf_funcs:
        raise invalid_tp(f"TP PRF func {desired.prf_func} not allowed")
    if desired.reserved:
        raise invalid_tp("reserved TP bits set")

    # --- TP Data ---------------------------------------------------------------------
    trs = tre = trr = None
    kemac: Kemac | None = None
    apps: list[Idr] = []
    responders: list[Idr] = []
    for p in desired.payloads:
        if isinstance(p, Tr):
            if p.role == TsRole.TRS:
                trs = p
            elif p.role == TsRole.TRE:
                tre = p
            elif p.role == TsRole.TRR:
                trr = p
            # TRi is the KMS's to set; a desired one is ignored.
        elif isinstance(p, Kemac):
            kemac = p
        elif isinstance(p, Idr):
            if p.role == IdRole.IDRAPP:
                apps.append(p)
            elif p.role == IdRole.IDRR:
                responders.append(p)
            elif p.role == IdRole.IDRKMS and p.data != pol.kms_id:
                raise denied(ErrorNo.INVALID_ID, "ticket policy names another KMS")
            # IDRi in TP Data is the KMS's to set (the authenticated Initiator).
    if not responders:
        raise invalid_tp("desired TP names no responder (IDRr)")
    changed = False
    if pol.responders_must_be_known and callable(is_known):
        kept = [r for r in responders if is_known(r.data)]
        if not kept:
            raise denied(ErrorNo.INVALID_ID, "no authorised responder", "unknown responders")
        changed |= len(kept) != len(responders)
        responders = kept
    if applications and apps:
        kept_apps = [a for a in apps if a.data in applications]
        if not kept_apps:
            raise denied(ErrorNo.INVALID_ID, "application not authorised")
        changed |= len(kept_apps) != len(apps)
        apps = kept_apps

    # RFC 6043 12.1: the 256-bit suite goes with 256-bit session keys by default.
    default_length = 32 if desired.prf_func == PrfFunc.PRF_HMAC_SHA_256 else 16
    keys, keys_changed = _key_requests(kemac, requested_keys, keys_supplied, pol, default_length)
    changed |= keys_changed
    has_tgk = any(k.key_type in TGK_TYPES for k in keys)

    # --- validity window ----------------------------------------------------------------
    start = now if trs is None else _time_of(trs)
    end_cap = max(start, now) + pol.max_lifetime_s
    if tre is None:
        end = max(start, now) + pol.default_lifetime_s
    else:
        end = _time_of(tre)
        if end <= now or end <= start:
            raise invalid_tp("desired validity ends before it starts or in the past")
        if end > end_cap:
            end, changed = end_cap, True
    if start > now + pol.max_lifetime_s:
        raise invalid_tp("desired validity starts too far in the future")

    # --- flags ---------------------------------------------------------------------------
    d_flags = desired.flags & ~(TpFlag.D | TpFlag.K)
    why = check_flag_rules(d_flags | TpFlag.D, has_tgk)
    if why is not None:
        raise invalid_tp(why)
    flags = d_flags | TpFlag.D | TpFlag.E  # KMS-generated; base tickets resolve at the KMS
    if not desired.flags & TpFlag.E:
        changed = True
    if pol.forking is Forking.REQUIRED and not flags & TpFlag.I:
        flags |= TpFlag.I
        changed = True
    if pol.forking is Forking.FORBIDDEN and flags & TpFlag.I:
        flags &= ~TpFlag.I
        changed = True
    if flags & TpFlag.I and has_tgk and not flags & TpFlag.F:
        flags |= TpFlag.F  # RFC 6043 6.10: forking a TGK needs the TRANSFER_RESP
        changed = True
    if not pol.reuse_allowed and flags & TpFlag.J:
        flags &= ~TpFlag.J
        changed = True
    if keys_supplied and not pol.initiator_keys_allowed:
        raise invalid_tp("Initiator-supplied keys are not allowed")
    if changed:
        flags |= TpFlag.K
    why = check_flag_rules(flags, has_tgk)
    if why is not None:  # pragma: no cover - the changes above keep the rules
        raise invalid_tp(why)

    data: list[Payload] = [
        Idr(IdRole.IDRKMS, pol.kms_id_type, pol.kms_id),
        Idr(IdRole.IDRI, initiator.id_type, initiator.data),
        _tr(TsRole.TRS, start),
        _tr(TsRole.TRE, end),
    ]
    if trr is not None:
        data.append(trr)
    data.extend(apps)
    data.extend(responders)
    granted = TicketPolicy(
        TicketType.MIKEY_BASE_TICKET,
        BASE_TICKET_SUBTYPE,
        BASE_TICKET_VERSION,
        desired.prf_func,
        TpFlag(flags),
        tuple(data),
    )
    return Grant(granted, keys, changed)


def validity_of(policy: TicketPolicy) -> tuple[float | None, float | None]:
    """(TRs, TRe) of a granted policy as Unix times (RFC 4330 era rule); None if absent."""
    start = end = None
    for p in policy.payloads:
        if isinstance(p, Tr) and p.ts_type != TsType.COUNTER:
            if p.role == TsRole.TRS:
                start = decode_ts_value(TsType(p.ts_type), p.value)
            elif p.role == TsRole.TRE:
                end = decode_ts_value(TsType(p.ts_type), p.value)
    return start, end


def responders_of(policy: TicketPolicy) -> list[bytes]:
    return [p.data for p in policy.payloads if isinstance(p, Idr) and p.role == IdRole.IDRR]


def idr_in_policy(policy: TicketPolicy, role: IdRole) -> Idr | None:
    for p in policy.payloads:
        if isinstance(p, Idr) and p.role == role:
            return p
    return None

