"""Ticket Resolve: RESOLVE_INIT_PSK / RESOLVE_INIT_PK -> RESOLVE_RESP (RFC 6043 4.2.3, 5.1.1,
A.3), with key forking bound to the resolving Responder's identity."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from kms.core.context import Authenticated, Deps, Exchange
from kms.core.errors import auth_failure, denied, precondition
from kms.core.policy import TGK_TYPES, idr_in_policy, responders_of, validity_of
from kms.core.request import fresh_timestamp, response_header, ticket_id
from kms.keystore import Key
from kms.mikey.base_ticket import TicketContents, TicketError, derive_mpk_pair, open_base_ticket
from kms.mikey.cipher import compute_mac
from kms.mikey.constants import (
    BASE_TICKET_SUBTYPE,
    BASE_TICKET_VERSION,
    DataType,
    ErrorNo,
    IdRole,
    KeyDataType,
    MacAlg,
    PrfFunc,
    RandRole,
    TicketType,
    TsType,
)
from kms.mikey.derive import (
    KeyDirection,
    derive_forked_mpkr,
    derive_forked_tgk,
    derive_vr_auth_key,
)
from kms.mikey.message import Message
from kms.mikey.ntp import timestamp_t64
from kms.mikey.payloads import KeyData, Payload
from kms.mikey.protect import (
    keyed_prf,
    message_keys,
    placeholder_v,
    seal_kemac,
    seal_mac,
    suite_for,
    timestamp_of,
)
from kms.mikey.ticket import Idr, RandR, Ticket, TpFlag


def check_ticket_type(ticket: Ticket) -> None:
    p = ticket.policy
    if (p.ticket_type, p.subtype, p.version) != (
        TicketType.MIKEY_BASE_TICKET,
        BASE_TICKET_SUBTYPE,
        BASE_TICKET_VERSION,
    ):
        raise denied(ErrorNo.INVALID_TICKET, "ticket type not supported")


def open_ticket(ticket: Ticket, deps: Deps) -> TicketContents:
    try:
        return open_base_ticket(deps.keystore, ticket, _tpk_lookup(deps))
    except TicketError as exc:
        raise auth_failure(f"ticket refused: {exc.reason}") from None


def _tpk_lookup(deps: Deps) -> Callable[[bytes | None], Key | None]:
    def lookup(tpk_id: bytes | None) -> Key | None:
        if tpk_id is None:
            return deps.directory.current_tpk()[1]
        return deps.directory.tpk(tpk_id)

    return lookup


def check_validity(ticket: Ticket, deps: Deps, now: float) -> float:
    """TRs / TRe with the RFC 4330 era rule (reference 10); returns the expiry time."""
    start, end = validity_of(ticket.policy)
    skew = deps.policy.timestamp_window_s
    if start is not None and now + skew < start:
        raise precondition(ErrorNo.INVALID_TS, "ticket not yet valid")
    if end is not None and now > end:
        raise precondition(ErrorNo.INVALID_TS, "ticket expired")
    return end if end is not None else now + deps.policy.max_lifetime_s


def check_responder(ticket: Ticket, identity: bytes, deps: Deps) -> None:
    """The resolver must be listed as IDRr, or be a member now of a group listed (RFC 6043
    4.2.3.4, 8); membership is looked up at resolve time so removals take effect at once."""
    for r in responders_of(ticket.policy):
        if r == identity or deps.directory.is_member(r, identity):
            return
    raise denied(ErrorNo.INVALID_ID, "not an authorised responder for this ticket")


def verify_vr(ticket: Ticket, mpkr: bytes, deps: Deps) -> None:
    """RFC 6043 6.10: with forking the KMS verifies Vr in Initiator Data, keyed from the
    unforked MPKr (label type 0x04, TP PRF: reference 14.3)."""
    init = ticket.initiator_data
    if init is None:
        raise auth_failure("forking ticket without Initiator Data")
    suite = suite_for(ticket.policy.prf_func)
    if init.vr.mac_alg != suite.mac_alg or init.vr.mac_alg == MacAlg.NULL:
        raise auth_failure("Vr uses an unexpected MAC algorithm")
    key = derive_vr_auth_key(
        keyed_prf(deps.keystore, mpkr, PrfFunc(ticket.policy.prf_func)), suite.mac_alg
    )
    expected = compute_mac(suite.mac_alg, key, init.vr_mac_input())
    if not hmac.compare_digest(expected, init.vr.mac):
        raise auth_failure("Initiator Data Vr verification failed")


def resolve_keys(
    ticket: Ticket,
    contents: TicketContents,
    responder: bytes,
    deps: Deps,
) -> tuple[list[KeyData], bytes | None]:
    """KEMAC content of RESOLVE_RESP: MPKi || [MPKr'] || {TEK|TGK'|GTGK}, and RANDRkms when
    forking (RFC 6043 4.2.3.5, 5.1.1). GTGKs and TEKs are never forked."""
    ks = deps.keystore
    tp_prf = PrfFunc(ticket.policy.prf_func)
    mpk = contents.mpk
    mpki, mpkr = derive_mpk_pair(ks, mpk.key, contents.rand, tp_prf)
    keys = [KeyData(KeyDataType.MPK, mpki, None, mpk.kv)]
    if not ticket.policy.flags & TpFlag.I:
        keys.extend(contents.session_keys)
        return keys, None
    verify_vr(ticket, mpkr, deps)
    longest = max([len(mpkr), *(len(k.key) for k in contents.session_keys)])
    rand_kms = ks.random(max(16, longest))  # RFC 6043 12.1: RANDRkms >= longest MPKr/TGK
    forked_mpkr = derive_forked_mpkr(keyed_prf(ks, mpkr, tp_prf), responder, rand_kms, len(mpkr))
    keys.append(KeyData(KeyDataType.MPK, forked_mpkr, None, mpk.kv))
    for k in contents.session_keys:
        if k.key_type in TGK_TYPES:
            forked = derive_forked_tgk(
                keyed_prf(ks, k.key, tp_prf), responder, rand_kms, len(k.key)
            )
            keys.append(KeyData(k.key_type, forked, k.salt, k.kv))
        else:
            keys.append(k)
    return keys, rand_kms


def handle_resolve(
    msg: Message, auth: Authenticated, deps: Deps, ex: Exchange, now: float
) -> bytes:
    ks = deps.keystore
    ticket = msg.one(Ticket)
    check_ticket_type(ticket)
    issuer = idr_in_policy(ticket.policy, IdRole.IDRKMS)
    if issuer is not None and issuer.data != deps.policy.kms_id:
        raise denied(ErrorNo.INVALID_TICKET, "ticket issued by another KMS", "foreign ticket")
    tid = ticket_id(ticket.ticket_data)
    ex.audit["ticket_id"] = tid
    contents = open_ticket(ticket, deps)
    expires = check_validity(ticket, deps, now)
    responder = auth.identity.data
    check_responder(ticket, responder, deps)
    if not ticket.policy.flags & TpFlag.J and not deps.ledger.first_resolve(
        bytes.fromhex(tid), responder, expires
    ):
        raise precondition(ErrorNo.UNSPECIFIED, "ticket already resolved (reuse not allowed)")
    keys, rand_kms = resolve_keys(ticket, contents, responder, deps)

    t = fresh_timestamp(timestamp_of(msg), now)
    resp_keys = message_keys(
        ks, auth.response_key, msg, KeyDirection.RESPONSE, None, auth.rand_r, auth.suite
    )
    ex.response_keys = resp_keys
    kemac = seal_kemac(
        ks,
        resp_keys,
        auth.suite.encr_alg,
        msg.header.csb_id,
        timestamp_t64(TsType(t.ts_type), t.value),
        keys,
    )
    payloads: list[Payload] = [
        t,
        Idr(IdRole.IDRKMS, deps.policy.kms_id_type, deps.policy.kms_id),
        kemac,
    ]
    if rand_kms is not None:
        # RFC 6043 4.2.3.5: with forking, IDRr (the identity the keys are bound to) and the
        # modifier RANDRkms, which the Responder echoes in TRANSFER_RESP.
        payloads.append(Idr(IdRole.IDRR, auth.identity.id_type, responder))
        payloads.append(RandR(RandRole.RANDRKMS, rand_kms))
    payloads.append(placeholder_v(auth.suite.mac_alg))
    resp = Message(response_header(msg, DataType.RESOLVE_RESP), tuple(payloads))
    sealed = seal_mac(resp, resp_keys, auth.suite.mac_alg, msg.wire)
    ex.audit.update(
        {
            "event": "ticket.resolved",
            "forking": rand_kms is not None,
            "keys": [KeyDataType(k.key_type).name for k in contents.session_keys],
            "tpk": (contents.tpk_id or b"").decode("ascii", "replace"),
        }
    )
    return sealed.wire
