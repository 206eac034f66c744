"""Ticket Resolve: RESOLVE_INIT_PSK / RESOLVE_INIT_PK -> RESOLVE_RESP (RFC 6043 4.2.3, 5.1.1,
A.3), with key forking bound to the resolving Responder's identity."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kms.core.context import Authenticated, Call, Deps, Issued, noting
from kms.core.errors import auth_failure, denied, precondition
from kms.core.forking import modifier_for
from kms.core.policy import (
    check_flag_rules,
    idr_in_policy,
    initiator_ticket_window,
    responders_of,
    validity_of,
)
from kms.core.psk_versions import ticket_psk
from kms.core.request import fresh_ts
from kms.core.revocation import check_ticket
from kms.keystore import Key
from kms.mikey.base_ticket import TicketContents, TicketError, open_base_ticket, ticket_id
from kms.mikey.cipher import compute_mac
from kms.mikey.compose import InitialMessage, ResolveInit
from kms.mikey.constants import (
    BASE_TICKET_SUBTYPE,
    BASE_TICKET_VERSION,
    DataType,
    ErrorNo,
    IdRole,
    KeyDataType,
    PayloadType,
    RandRole,
    TicketType,
)
from kms.mikey.ntp import timestamp_t64
from kms.mikey.payloads import KeyData, Timestamp
from kms.mikey.protect import encrypt_key_data
from kms.mikey.resolution import resolve_ticket_keys
from kms.mikey.ticket import Idr, Ticket, TpFlag
from kms.mikey.views import ResolveInitPk, ResolveInitPsk
from kms.mikey.writer import idr_body, kemac_body, randr_body, sealed_response, t_body


def check_ticket_type(ticket: Ticket) -> None:
    p = ticket.policy
    if (p.ticket_type, p.subtype, p.version) != (
        TicketType.MIKEY_BASE_TICKET,
        BASE_TICKET_SUBTYPE,
        BASE_TICKET_VERSION,
    ):
        raise denied(ErrorNo.INVALID_TICKET, "ticket type not supported")


def open_ticket(ticket: Ticket, deps: Deps, now: float) -> TicketContents:
    if not ticket.policy.flags & TpFlag.D:
        # An Initiator-made ticket never passed grant_policy: check the RFC 6043 6.10 rules.
        why = check_flag_rules(ticket.policy.flags, has_tgk=False)
        if why is not None:
            raise denied(ErrorNo.INVALID_TPPAR, "ticket policy is inconsistent", why)
    why_not: list[str] = []
    try:
        return open_base_ticket(deps.keystore, ticket, _tpk_lookup(deps, ticket, now, why_not))
    except TicketError as exc:
        reason = why_not[0] if why_not else exc.reason
        raise auth_failure(f"ticket refused: {reason}") from None


def _tpk_lookup(
    deps: Deps, ticket: Ticket, now: float, why_not: list[str]
) -> Callable[[bytes | None], Key | None]:
    kms_generated = bool(ticket.policy.flags & TpFlag.D)
    creator = idr_in_policy(ticket.policy, IdRole.IDRI)

    def lookup(tpk_id: bytes | None) -> Key | None:
        if kms_generated:
            if tpk_id is None:
                return deps.directory.current_tpk()[1]
            return deps.directory.tpk(tpk_id)
        # Mode 3 (RFC 6043 4.1.1): an Initiator-generated ticket (D = 0) is protected by a
        # key the Initiator shares with the KMS: its PSK, named by IDRpsk (A.1). IDRpsk must
        # name a live version of the PSK of the ticket policy's IDRi (after a rotation,
        # ``<IDRi>#psk<N>``), so nobody can create tickets in another's name or with a
        # retired PSK; the label type byte (0x05 versus 0x01/0x02) separates this use from
        # message keys.
        if tpk_id is None or creator is None:
            why_not.append("an Initiator-made ticket must name its PSK (IDRpsk, IDRi)")
            return None
        key, why = ticket_psk(deps.psk_versions, deps.directory, creator.data, tpk_id, now)
        if key is None:
            why_not.append(why)
        return key

    return lookup


def check_validity(
    ticket: Ticket, deps: Deps, now: float, t: Timestamp | None = None
) -> float:
    """TRs / TRe with the RFC 4330 3 era rule (docs/rfc-readings.md R11); returns the
    expiry time. ``t``: the base ticket's T, to hold an Initiator-made ticket to the
    window the KMS's policy allows (:func:`initiator_ticket_window`)."""
    if t is not None and not ticket.policy.flags & TpFlag.D:
        initiator_ticket_window(ticket.policy, t, deps.policy, now)
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


def build_resolve_resp(
    v: ResolveInit,
    auth: Authenticated,
    deps: Deps,
    now: float,
    keys: list[KeyData],
    rand_kms: bytes | None,
    bound_to: bytes,
) -> bytes:
    """RESOLVE_RESP = HDR, T, IDRkms, KEMAC, [IDRr, RANDRkms], V (RFC 6043 4.2.3.5),
    protected with keys from the resolver's PSK or envelope key (0x02 label, RANDRr)."""
    ks = deps.keystore
    msg = v.msg
    suite = auth.suite
    ts_type, ts_value = fresh_ts(v.t, now)
    resp_keys = auth.keys_for_response(ks, msg)
    encr = encrypt_key_data(ks, resp_keys, suite.encr_alg, msg.header.csb_id,
                            timestamp_t64(ts_type, ts_value), keys)
    parts = [
        (PayloadType.T, t_body(ts_type, ts_value)),
        (PayloadType.IDR, idr_body(IdRole.IDRKMS, deps.policy.kms_id_type, deps.policy.kms_id)),
        (PayloadType.KEMAC, kemac_body(suite.encr_alg, encr)),
    ]
    if rand_kms is not None:
        # With forking, IDRr (the identity the keys are bound to) and the modifier RANDRkms,
        # which the Responder echoes in TRANSFER_RESP.
        parts.append((PayloadType.IDR, idr_body(IdRole.IDRR, auth.identity.id_type, bound_to)))
        parts.append((PayloadType.RANDR, randr_body(RandRole.RANDRKMS, rand_kms)))
    # Written in one pass (kms.mikey.writer); V over the response || RESOLVE_INIT (RFC 6043 5.4).
    return sealed_response(
        msg,
        DataType.RESOLVE_RESP,
        parts,
        suite.mac_alg,
        lambda data: compute_mac(suite.mac_alg, resp_keys.auth_key, data),
        msg.wire,
    )


@dataclass(frozen=True)
class Foreign:
    """A ticket another KMS issued (IDRkms in its policy names ``issuer``): the resolve
    continues in :mod:`kms.core.federation` (RFC 6043 9)."""

    issuer: Idr
    audit: Mapping[str, object]


def handle_resolve(
    v: InitialMessage, auth: Authenticated, deps: Deps, call: Call, now: float
) -> Issued | Foreign:
    assert isinstance(v, ResolveInitPsk | ResolveInitPk)  # the service routes by data type
    ks = deps.keystore
    ticket = v.ticket
    check_ticket_type(ticket)
    tid = ticket_id(ticket.ticket_data)
    issuer = idr_in_policy(ticket.policy, IdRole.IDRKMS)
    if issuer is not None and issuer.data != deps.policy.kms_id:
        # RFC 6043 9: not ours; the caller asks the KMS that issued it.
        return Foreign(issuer, {"ticket_id": tid})
    notes: dict[str, object] = {"ticket_id": tid}
    with noting(notes):
        contents = open_ticket(ticket, deps, now)
        expires = check_validity(ticket, deps, now, contents.t)
        creator = idr_in_policy(ticket.policy, IdRole.IDRI)
        check_ticket(deps.revocations, tid, creator.data if creator else None, contents.t)
        responder = auth.identity.data
        check_responder(ticket, responder, deps)
        try:
            modifier = modifier_for(ks, deps.fork_modifier, bytes.fromhex(tid), responder)
            resolution = resolve_ticket_keys(ks, ticket, contents, responder, modifier)
        except TicketError as exc:
            raise auth_failure(f"ticket refused: {exc.reason}") from None
        keys, rand_kms = list(resolution.keys), resolution.rand_kms

        sealed = build_resolve_resp(v, auth, deps, now, keys, rand_kms, responder)
        # J = 0: record the resolve last, once every check (Vr included) has passed and the
        # response is built, so that a refused RESOLVE_INIT never uses up the responder's
        # resolve.
        if not ticket.policy.flags & TpFlag.J and not deps.ledger.first_resolve(
            bytes.fromhex(tid), responder, expires
        ):
            raise precondition(
                ErrorNo.UNSPECIFIED, "ticket already resolved (reuse not allowed)"
            )
    return Issued(
        sealed,
        {
            **notes,
            "event": "ticket.resolved",
            "forking": rand_kms is not None,
            "keys": [KeyDataType(k.key_type).name for k in contents.session_keys],
            "tpk": (contents.tpk_id or b"").decode("ascii", "replace"),
        },
    )
