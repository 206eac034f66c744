"""Ticket policy: validate the desired TP and grant one within the KMS's own policy
(RFC 6043 4.2.1.4, 4.2.1.5, 6.10).

The KMS honours what it can, changes what its policy requires, and refuses with Invalid
TPpar what it cannot honour. Flag K (RFC 6043 6.10: "the KMS changed the desired ticket policy
or the desired KEMAC") is not tracked change by change: it is set exactly when the granted TP
(flags other than D and K, PRF, TP Data other than KEMAC) or the granted keys (types, lengths,
number) differ from what the desired TP means (:func:`policy_differs`, :func:`keys_differ`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import StrEnum

from kms.core.errors import Refusal, denied, precondition
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
from kms.mikey.payloads import Kemac, KeyData, KvData, Payload, Timestamp
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
    kms_id_type: IdType = IdType.URI
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
    # RFC 6043 11.1: whether registered intermediate nodes may obtain keys ([policy]
    # intermediate_nodes); a node still needs the scope it was registered with.
    intermediate_nodes: bool = True


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


_D, _E, _F, _G, _H, _I, _K, _L, _M = (
    int(x) for x in (TpFlag.D, TpFlag.E, TpFlag.F, TpFlag.G, TpFlag.H, TpFlag.I, TpFlag.K,
                     TpFlag.L, TpFlag.M)
)


def check_flag_rules(flags: TpFlag, has_tgk: bool) -> str | None:
    """RFC 6043 6.10 flag dependencies; None when they hold, else why."""
    f = int(flags)  # plain int tests: enum.Flag operators cost a microsecond each
    if not f & (_D | _L):
        return "an Initiator-generated ticket (D=0) needs L=1"
    if f & _G and not f & _F:
        return "G=1 needs F=1"
    if not f & (_G | _H):
        return "G=0 needs H=1"
    if f & _I and not f & _E:
        return "forking (I=1) needs E=1"
    if f & _K and not f & _D:
        return "K=1 needs D=1"
    if f & _M and not f & _F:
        return "M=1 needs F=1"
    if f & _I and has_tgk and not f & _F:
        return "forking a TGK needs F=1"
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


def _key_length(asked: int, supplied: bool, pol: KmsPolicy, default_length: int) -> int:
    """The length granted for a requested key: the asked one if allowed (0: the KMS's
    default), else the default (or the longest allowed); a supplied key cannot change."""
    length = asked or default_length
    if length in pol.key_lengths:
        return length
    if supplied:
        raise invalid_tp(f"key length {length} not allowed for a supplied key")
    return default_length if default_length in pol.key_lengths else max(pol.key_lengths)


def _key_requests(
    kemac: Kemac | None,
    requested: tuple[KeyData, ...],
    supplied: bool,
    pol: KmsPolicy,
    default_length: int,
) -> tuple[KeyRequest, ...]:
    """The session keys to put in the ticket. The KMS changes what its policy does not allow
    (a key type it does not issue is dropped, a length or salt length it does not issue is
    replaced, keys beyond ``max_session_keys`` are dropped) and refuses only what it cannot
    change: no key left, a non-session key type, a supplied key it would have to alter."""
    if kemac is None:
        # RFC 6043 4.2.1.5: with no desired KEMAC, a single TGK is RECOMMENDED.
        return (KeyRequest(KeyDataType.TGK, default_length, None, None),)
    if not requested:
        raise invalid_tp(f"desired KEMAC must list 1..{pol.max_session_keys} keys")
    out = []
    for kd in requested:
        kt = kd.key_type
        if kt not in SESSION_KEY_TYPES:
            raise invalid_tp(f"key type {kt} is not a session key type")
        if supplied and kt not in (KeyDataType.TEK, KeyDataType.TEK_SALT):
            # Appendix B.2: the KMS translates Initiator-chosen TEKs only.
            raise invalid_tp("only TEKs may be supplied by the Initiator")
        if kt not in pol.key_types:
            if supplied:
                raise invalid_tp(f"key type {kt} not allowed")
            continue  # dropped: flag K tells the Initiator (keys_differ)
        length = _key_length(len(kd.key), supplied, pol, default_length)
        salt_len = None
        if kt in SALTED:
            salt_len = len(kd.salt or b"") or pol.salt_length
            if not 1 <= salt_len <= 32:
                if supplied:
                    raise invalid_tp("salt length not allowed")
                salt_len = pol.salt_length
        out.append(KeyRequest(KeyDataType(kt), length, salt_len, kd.kv, kd if supplied else None))
    if not out:
        raise invalid_tp("no requested key type is allowed by this KMS")
    return tuple(out[: pol.max_session_keys])


def keys_differ(
    kemac: Kemac | None, requested: tuple[KeyData, ...], granted: tuple[KeyRequest, ...]
) -> bool:
    """Whether the granted keys differ from the desired KEMAC's (RFC 6043 6.10 flag K): number,
    types, lengths and salt lengths; a zero length asks for the KMS's default and is honoured
    by any length. Without a desired KEMAC the KMS's default (one TGK, 4.2.1.5) is no change."""
    if kemac is None:
        return False
    if len(requested) != len(granted):
        return True
    for kd, kr in zip(requested, granted, strict=True):
        if kd.key_type != kr.key_type:
            return True
        if kd.key and len(kd.key) != kr.length:
            return True
        if kd.salt and len(kd.salt) != kr.salt_length:
            return True
    return False


# TP Data order (RFC 6043 6.10): [IDRkms], [IDRi], [TRs], [TRe], [TRr], [KEMAC], {IDRapp}, (IDRr)
_TP_ORDER: dict[tuple[type, int], int] = {
    (Idr, IdRole.IDRKMS): 0,
    (Idr, IdRole.IDRI): 1,
    (Tr, TsRole.TRS): 2,
    (Tr, TsRole.TRE): 3,
    (Tr, TsRole.TRR): 4,
    (Idr, IdRole.IDRAPP): 6,
    (Idr, IdRole.IDRR): 7,
}


def _tp_data_meaning(
    payloads: tuple[Payload, ...], initiator: Idr, pol: KmsPolicy
) -> list[tuple[int, Payload]]:
    """TP Data without KEMAC, in RFC 6043 6.10 order, with the identities an omitted payload
    stands for made explicit: no IDRkms means this KMS, no IDRi the authenticated Initiator
    (docs/rfc-readings.md R7). An omitted TRs / TRe means no bound (R11) and stays omitted.
    Anything else (TRi, other roles) keeps its own rank, so that dropping it is a change."""
    out: list[tuple[int, Payload]] = []
    for p in payloads:
        if isinstance(p, Kemac):
            continue
        role = p.role if isinstance(p, Idr | Tr) else -1
        out.append((_TP_ORDER.get((type(p), role), 5), p))
    present = {rank for rank, _ in out}
    if 0 not in present:
        out.append((0, Idr(IdRole.IDRKMS, pol.kms_id_type, pol.kms_id)))
    if 1 not in present:
        out.append((1, Idr(IdRole.IDRI, initiator.id_type, initiator.data)))
    return sorted(out, key=lambda rp: rp[0])  # stable: IDRapp / IDRr keep their order


def policy_differs(
    desired: TicketPolicy, granted: TicketPolicy, initiator: Idr, pol: KmsPolicy
) -> bool:
    """Whether the granted TP differs from the desired one (RFC 6043 6.10 flag K): ticket
    type, PRF, flags other than D (the KMS generates every ticket it issues) and K, and TP
    Data other than KEMAC as :func:`_tp_data_meaning` reads it."""
    if (desired.ticket_type, desired.subtype, desired.version, desired.prf_func) != (
        granted.ticket_type,
        granted.subtype,
        granted.version,
        granted.prf_func,
    ):
        return True
    mask = ~(TpFlag.D | TpFlag.K)
    if desired.flags & mask != granted.flags & mask:
        return True
    return _tp_data_meaning(desired.payloads, initiator, pol) != _tp_data_meaning(
        granted.payloads, initiator, pol
    )


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
    # PRF for the ticket (RFC 6043 6.10): the desired one if the KMS allows it, else the
    # strongest the KMS allows (a change, so flag K).
    prf = desired.prf_func if desired.prf_func in pol.prf_funcs else max(pol.prf_funcs)
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
            # TRi is the KMS's to set; a desired one is dropped (a change).
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
    if pol.responders_must_be_known and callable(is_known):
        kept = [r for r in responders if is_known(r.data)]
        if not kept:
            raise denied(ErrorNo.INVALID_ID, "no authorised responder", "unknown responders")
        responders = kept
    if applications and apps:
        kept_apps = [a for a in apps if a.data in applications]
        if not kept_apps:
            raise denied(ErrorNo.INVALID_ID, "application not authorised")
        apps = kept_apps

    # RFC 6043 12.1: the 256-bit suite goes with 256-bit session keys by default.
    default_length = 32 if prf == PrfFunc.PRF_HMAC_SHA_256 else 16
    keys = _key_requests(kemac, requested_keys, keys_supplied, pol, default_length)
    has_tgk = any(k.key_type in TGK_TYPES for k in keys)

    # --- validity window ----------------------------------------------------------------
    # An omitted TRs means no lower bound (docs/rfc-readings.md R11) and is granted as such: the KMS
    # adds no TRs of its own (docs/design.md). A desired TR that is honoured is kept as sent.
    start = None if trs is None else _time_of(trs)
    begin = now if start is None else max(start, now)
    end_cap = begin + pol.max_lifetime_s
    tre_out: Tr
    if tre is None:  # no upper bound asked: the KMS sets its default (a change, flag K)
        tre_out = _tr(TsRole.TRE, begin + pol.default_lifetime_s)
    else:
        end = _time_of(tre)
        if end <= now or (start is not None and end <= start):
            raise invalid_tp("desired validity ends before it starts or in the past")
        tre_out = tre if end <= end_cap else _tr(TsRole.TRE, end_cap)
    if start is not None and start > now + pol.max_lifetime_s:
        raise invalid_tp("desired validity starts too far in the future")

    # --- flags ---------------------------------------------------------------------------
    d_flags = desired.flags & ~(TpFlag.D | TpFlag.K)
    why = check_flag_rules(d_flags | TpFlag.D, has_tgk)
    if why is not None:
        raise invalid_tp(why)
    flags = d_flags | TpFlag.D | TpFlag.E  # KMS-generated; base tickets resolve at the KMS
    if pol.forking is Forking.REQUIRED and not flags & TpFlag.I:
        flags |= TpFlag.I
    if pol.forking is Forking.FORBIDDEN and flags & TpFlag.I:
        flags &= ~TpFlag.I
    if flags & TpFlag.I and has_tgk and not flags & TpFlag.F:
        flags |= TpFlag.F  # RFC 6043 6.10: forking a TGK needs the TRANSFER_RESP
    if not pol.reuse_allowed and flags & TpFlag.J:
        flags &= ~TpFlag.J
    if keys_supplied and not pol.initiator_keys_allowed:
        raise invalid_tp("Initiator-supplied keys are not allowed")

    data: list[Payload] = [
        Idr(IdRole.IDRKMS, pol.kms_id_type, pol.kms_id),
        Idr(IdRole.IDRI, initiator.id_type, initiator.data),
    ]
    if trs is not None:
        data.append(trs)
    data.append(tre_out)
    if trr is not None:
        data.append(trr)
    data.extend(apps)
    data.extend(responders)
    granted = TicketPolicy(
        TicketType.MIKEY_BASE_TICKET,
        BASE_TICKET_SUBTYPE,
        BASE_TICKET_VERSION,
        prf,
        TpFlag(flags),
        tuple(data),
    )
    changed = policy_differs(desired, granted, initiator, pol) or keys_differ(
        kemac, requested_keys, keys
    )
    if changed:
        granted = replace(granted, flags=TpFlag(flags | TpFlag.K))
    why = check_flag_rules(granted.flags, has_tgk)
    if why is not None:  # pragma: no cover - the changes above keep the rules
        raise invalid_tp(why)
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


def initiator_ticket_window(
    policy: TicketPolicy, t: Timestamp, pol: KmsPolicy, now: float
) -> None:
    """Hold an Initiator-made ticket (RFC 6043 4.1.1 mode 3, D = 0), which never passed
    :func:`grant_policy`, to the validity window grant_policy would grant at its issue time
    (base-ticket T, A.1): T not ahead of this KMS's clock by more than the timestamp window
    (Invalid TS), a TRe present, TRs at most max_lifetime_s after T and TRe at most
    max_lifetime_s after max(TRs, T) (else Invalid TPpar, RFC 6043 6.12: the KMS's policy
    does not allow that ticket policy). So no ticket this KMS resolves is valid more than
    2 x max_lifetime_s after it was made, which bounds how long a ticket revocation or a
    resolve-ledger row (flag J = 0) must be kept."""
    try:
        issued = decode_ts_value(TsType(t.ts_type), t.value)
    except ValueError:
        raise precondition(ErrorNo.INVALID_TS, "ticket time unreadable") from None
    if issued > now + pol.timestamp_window_s:
        raise precondition(ErrorNo.INVALID_TS, "ticket made in the future")
    start, end = validity_of(policy)
    why = None
    if end is None:
        why = "an Initiator-made ticket must carry TRe"
    elif start is not None and start > issued + pol.max_lifetime_s:
        why = "TRs later than max_lifetime_s after the ticket's T"
    elif end > (issued if start is None else max(start, issued)) + pol.max_lifetime_s + 1:
        why = "validity longer than max_lifetime_s"
    if why is not None:
        raise denied(ErrorNo.INVALID_TPPAR, "ticket validity not allowed by the KMS policy", why)


def responders_of(policy: TicketPolicy) -> list[bytes]:
    return [p.data for p in policy.payloads if isinstance(p, Idr) and p.role == IdRole.IDRR]


def idr_in_policy(policy: TicketPolicy, role: IdRole) -> Idr | None:
    for p in policy.payloads:
        if isinstance(p, Idr) and p.role == role:
            return p
    return None

