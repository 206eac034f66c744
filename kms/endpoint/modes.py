"""The other modes of RFC 6043 4.1.1, for endpoints that hold a ticket protection key.

Mode 2: the Responder shares the TPK with the KMS and resolves tickets itself.
Mode 3: the Initiator shares a key with the KMS (its PSK) and creates tickets itself (D = 0,
        so L = 1); the Responder resolves them at the KMS.
Mode 4: Initiator and Responder share the key: no KMS exchange at all.
"""

from __future__ import annotations

from collections.abc import Callable

from kms.endpoint.common import now_timestamp
from kms.endpoint.initiator import DesiredPolicy, Initiator, TicketGrant
from kms.endpoint.responder import ResolvedCall, Responder
from kms.endpoint.session import EndpointError
from kms.keystore import Key
from kms.mikey.base_ticket import (
    TicketError,
    derive_mpk_pair,
    issue_base_ticket,
    open_base_ticket,
)
from kms.mikey.compose import compose
from kms.mikey.constants import (
    BASE_TICKET_SUBTYPE,
    BASE_TICKET_VERSION,
    IdRole,
    KeyDataType,
    PrfFunc,
    TicketType,
    TsRole,
    TsType,
)
from kms.mikey.errors import DecodeError
from kms.mikey.message import Message
from kms.mikey.ntp import decode_ts_value, encode_ts_value
from kms.mikey.payloads import KeyData, KvSpi, Payload
from kms.mikey.resolution import resolve_ticket_keys
from kms.mikey.ticket import Idr, TicketPolicy, TpFlag, Tr
from kms.mikey.views import TransferInit

SALTED = (KeyDataType.TGK_SALT, KeyDataType.TEK_SALT, KeyDataType.GTGK_SALT)


def build_ticket(
    ini: Initiator,
    tpk: bytes,
    tpk_id: bytes,
    desired: DesiredPolicy,
    now: float,
    lifetime_s: int = 3600,
) -> TicketGrant:
    """Modes 3 and 4: the Initiator creates a MIKEY base ticket under ``tpk`` (named by
    ``tpk_id`` in IDRpsk; for mode 3 that names the Initiator's own PSK, see
    :func:`mode3_ticket`). D = 0 requires L = 1 (RFC 6043 6.10); E = 1 when a KMS must
    resolve (mode 3)."""
    ks = ini.ks
    c = ini.creds
    flags = (desired.flags & ~(TpFlag.D | TpFlag.K)) | TpFlag.L
    data: list[Payload] = [
        Idr(IdRole.IDRKMS, c.kms_id_type, c.kms_id),
        Idr(IdRole.IDRI, c.id_type, c.identity),
        Tr(TsRole.TRS, TsType.NTP_UTC_32, encode_ts_value(TsType.NTP_UTC_32, now)),
        Tr(TsRole.TRE, TsType.NTP_UTC_32, encode_ts_value(TsType.NTP_UTC_32, now + lifetime_s)),
        *(Idr(IdRole.IDRR, c.id_type, r) for r in desired.responders),
    ]
    policy = TicketPolicy(prf_func=desired.prf_func, flags=TpFlag(flags), payloads=tuple(data))
    length = desired.key_length or (32 if desired.prf_func == PrfFunc.PRF_HMAC_SHA_256 else 16)
    types = desired.key_types or (KeyDataType.TGK,)
    keys = tuple(
        KeyData(
            kt,
            ks.random(length),
            ks.random(14) if kt in SALTED else None,
            KvSpi(ks.random(4)),
        )
        for kt in types
    )
    mpk = KeyData(KeyDataType.MPK, ks.random(length), None, KvSpi(ks.random(4)))
    rand = ks.random(32)
    ticket = issue_base_ticket(ks, tpk, tpk_id, policy, now_timestamp(now), rand, mpk, keys)
    mpki, mpkr = derive_mpk_pair(ks, mpk.key, rand, PrfFunc(policy.prf_func))
    return TicketGrant(ticket, mpki, mpkr if flags & TpFlag.I else None, keys)


def mode3_ticket(
    ini: Initiator, desired: DesiredPolicy, now: float, lifetime_s: int = 3600
) -> TicketGrant:
    """Mode 3: a ticket the Initiator creates under the PSK it shares with the KMS. IDRpsk
    names that PSK (RFC 6043 A.1) as the message IDRpsk does (4.2.1): the version name
    ``kms endpoint rotate-psk`` printed when the credentials hold one, else the identity."""
    c = ini.creds
    name = c.psk_name if c.psk_name is not None else c.identity
    return build_ticket(ini, c.psk, name, desired, now, lifetime_s)


def resolve_locally(
    res: Responder,
    transfer_init: bytes,
    now: float,
    tpk_for: Callable[[bytes | None], Key | None],
) -> ResolvedCall:
    """Modes 2 and 4: resolve the TICKET of a TRANSFER_INIT without the KMS, with the TPK
    that ``tpk_for(IDRpsk data)`` returns, then finish the exchange as after a resolve."""
    try:
        ti = compose(Message.decode(transfer_init))
    except DecodeError as exc:
        raise EndpointError(f"malformed TRANSFER_INIT: {exc}") from None
    if not isinstance(ti, TransferInit):
        raise EndpointError("not a TRANSFER_INIT")
    ticket = ti.ticket
    if ticket is None:
        raise EndpointError("TRANSFER_INIT without TICKET")
    p = ticket.policy
    if (p.ticket_type, p.subtype, p.version) != (
        TicketType.MIKEY_BASE_TICKET,
        BASE_TICKET_SUBTYPE,
        BASE_TICKET_VERSION,
    ):
        raise EndpointError("ticket type not supported")
    c = res.creds
    responders = [x.data for x in p.payloads if isinstance(x, Idr) and x.role == IdRole.IDRR]
    if c.identity not in responders:
        raise EndpointError("this Responder is not named in the ticket policy")
    for tr in (x for x in p.payloads if isinstance(x, Tr)):
        when = decode_ts_value(TsType(tr.ts_type), tr.value)
        if (tr.role == TsRole.TRS and now + res.window_s < when) or (
            tr.role == TsRole.TRE and now > when
        ):
            raise EndpointError("ticket outside its validity period")
    try:
        contents = open_base_ticket(res.ks, ticket, tpk_for)
        resolution = resolve_ticket_keys(res.ks, ticket, contents, c.identity)
    except TicketError as exc:
        raise EndpointError(f"ticket refused: {exc.reason}") from None
    modifier = None
    if resolution.rand_kms is not None:
        modifier = (Idr(IdRole.IDRR, c.id_type, c.identity), resolution.rand_kms)
    return res.finish(
        ti, resolution.mpki, resolution.forked_mpkr, resolution.session_keys, modifier, now
    )
