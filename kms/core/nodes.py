"""Keys for authorised intermediate nodes (RFC 6043 11.1: "The KMS MAY also provide keying
material to authorized intermediate nodes performing various network functions (e.g.
transcoding services, recording services, conference bridges)").

Encoding (docs/design.md, "Keys for authorised intermediate nodes"): the node sends a plain
RESOLVE_INIT_PSK (RFC 6043 4.2.3.1: HDR, T, RANDRr, [IDRr], [IDRkms], TICKET, [IDRpsk], V)
with the TICKET it saw in TRANSFER_INIT. IDRpsk names the node, so the KMS verifies V with
the node's PSK; IDRr names the Responder of the call leg the node wants (the IDRr of the
TRANSFER_RESP it saw; required with forking), the same shape as a peer KMS's forwarded
resolve (kms.core.federation). V covers the message || IDRr (the leg, else the node's
identity) || IDRkms, as for any RESOLVE_INIT. The answer is a RESOLVE_RESP (4.2.3.5)
protected with the node's PSK whose KEMAC holds the session keys of that leg only (TEK,
TGK' of the leg, GTGK) and, with forking, IDRr and RANDRkms of the leg: no MPKi and no
MPKr', which authenticate TRANSFER messages (a recorder holding them could forge them).

Refusals use the RFC error numbers: Invalid ID (7) for an unknown or removed node, one out
of scope, a leg that is not a responder of the ticket, a ticket another KMS issued (the
node must be registered there) and when ``[policy] intermediate_nodes = "forbidden"``.
"""

from __future__ import annotations

from dataclasses import replace

from kms.core.api import Outcome
from kms.core.authn import (
    admit,
    check_kms_identity,
    check_timestamp,
    claimed_identity,
    identity_matches,
    message_suite,
)
from kms.core.context import Authenticated, Call, Deps, Issued, noting
from kms.core.errors import Refusal, auth_failure, denied
from kms.core.forking import modifier_for
from kms.core.policy import idr_in_policy, responders_of
from kms.core.ports import IntermediateNode
from kms.core.resolve import (
    build_resolve_resp,
    check_responder,
    check_ticket_type,
    check_validity,
    open_ticket,
)
from kms.core.revocation import check_ticket
from kms.keystore import KeyNotFound, KeyRef
from kms.mikey.base_ticket import TicketError, ticket_id
from kms.mikey.compose import InitialMessage
from kms.mikey.constants import EncrAlg, ErrorNo, IdRole, IdType, KeyDataType
from kms.mikey.derive import KeyDirection
from kms.mikey.protect import check_mac, message_keys
from kms.mikey.resolution import resolve_ticket_keys
from kms.mikey.ticket import Idr, Ticket, TpFlag
from kms.mikey.views import ResolveInitPk, ResolveInitPsk

EVENT = "ticket.node_keys"


def node_request(v: InitialMessage, deps: Deps) -> ResolveInitPsk | None:
    """A RESOLVE_INIT_PSK from an intermediate node: IDRpsk names a registered node or a
    version of its PSK (``<node>#psk<N>``, kms.core.psk_versions), or names another
    identity than IDRr that is no endpoint's PSK version (an unknown or removed node,
    refused as such). None: an ordinary resolve."""
    if not isinstance(v, ResolveInitPsk) or v.idr_psk is None:
        return None
    name = v.idr_psk.data
    leg = v.idr_r
    if leg is not None and leg.data == name:
        return None  # an endpoint naming its own PSK: no registry read on the common path
    if deps.nodes is not None and deps.nodes.node(name) is not None:
        return v
    ref = deps.psk_versions.psk_version(name) if deps.psk_versions is not None else None
    if ref is not None:  # a rotated PSK's name: a node's version, or an endpoint's
        return v if deps.nodes is not None and deps.nodes.node(ref.owner) is not None else None
    if leg is None:
        return None
    return v


def _not_a_node(reason: str) -> Refusal:
    # The same answer for an unknown node, a removed one and a wrong MAC: which names are
    # registered nodes is not for a prober to learn. The audit log keeps the reason.
    return Refusal(ErrorNo.INVALID_ID, Outcome.UNAUTHENTICATED, "not an authorised node", reason)


def authenticate_node(
    v: ResolveInitPsk, deps: Deps, now: float
) -> tuple[Authenticated, dict[str, object]]:
    """Verify V with the node's PSK (the dummy PSK for an unknown name: the same work), then
    the timestamp window, rate limit and replay cache, as for endpoints (kms.core.authn)."""
    assert v.idr_psk is not None  # node_request checked it
    msg = v.msg
    name = v.idr_psk.data
    notes: dict[str, object] = {"node": claimed_identity(name)}
    with noting(notes):
        if not deps.policy.intermediate_nodes:
            raise denied(
                ErrorNo.INVALID_ID,
                "intermediate nodes are not allowed by this KMS",
                "[policy] intermediate_nodes = forbidden",
            )
        suite = message_suite(msg)
        node, psk, version, why = node_psk(name, deps, now)
        if node is not None:  # the audit log names a registered node (never on the wire)
            notes.update(node=node.identity.decode("utf-8", "replace"), role=node.role)
        kms_id = check_kms_identity(v, deps)
        key = psk if psk is not None else deps.dummy_psk
        leg = v.idr_r
        covered = (leg.data if leg is not None else name) + kms_id
        verified = False
        if key is not None:
            mac_only = replace(suite, encr_alg=EncrAlg.NULL)
            try:
                keys = message_keys(
                    deps.keystore, key, msg, KeyDirection.INITIAL, None, v.rand_r.value, mac_only
                )
            except KeyNotFound:
                if node is not None:
                    raise auth_failure("node PSK registered but missing in the token") from None
            else:
                verified = check_mac(msg, keys, suite, covered)
        if node is None:
            raise _not_a_node("unknown node")
        if node.psk is None:
            raise _not_a_node("certificate node sent a PSK message")
        if psk is None:
            raise _not_a_node(why)
        if not verified:
            raise _not_a_node("node MAC verification failed")
    notes = {"node": node.identity.decode("utf-8", "replace"), "role": node.role,
             "sender": claimed_identity(name)}  # fmt: skip
    if version is not None:
        notes["psk_version"] = version
    auth = Authenticated(
        Idr(IdRole.IDRR, IdType.URI, node.identity), psk, suite, None, v.rand_r.value, kms_id,
        "node", node_role=node.role,
    )  # fmt: skip
    with noting(notes, auth):
        check_timestamp(v, deps, now)
        admit(msg, deps, now, node.identity)  # one rate for all its PSK versions
    return auth, notes


def node_psk(
    name: bytes, deps: Deps, now: float
) -> tuple[IntermediateNode | None, KeyRef | None, int | None, str]:
    """The node IDRpsk ``name`` designates, the PSK to verify its message with (None:
    refuse, for the reason given), and the PSK version when the node's PSK was rotated.

    ``name`` is the node's identity (its registered PSK, version 1) or, once rotated, a
    version name ``<node>#psk<N>`` as for endpoints (kms.core.psk_versions: "used to
    indicate the pre-shared key used", RFC 6043 4.2.3); a retired version, or one whose
    overlap has ended, is refused like a wrong MAC."""
    nodes = deps.nodes
    ref = deps.psk_versions.psk_version(name) if deps.psk_versions is not None else None
    if ref is None:
        node = nodes.node(name) if nodes is not None else None
        return node, node.psk if node is not None else None, None, "unknown node"
    node = nodes.node(ref.owner) if nodes is not None else None
    if node is None or node.psk is None:
        return node, None, ref.version, "unknown node"  # an endpoint's version, or stale
    if not ref.live(now):
        return node, None, ref.version, f"PSK version {ref.version} retired"
    return node, ref.key, ref.version, ""


def scope_of(node: IntermediateNode, ticket: Ticket, leg: bytes | None, deps: Deps) -> str | None:
    """Why ``node`` may have the keys of ``leg`` (None: the whole ticket, no forking):
    "initiator" (IDRi of the ticket policy matches its initiator patterns), "responder" (the
    leg, or without one a listed IDRr, matches its responder patterns) or "group" (a group
    listed as IDRr matches its group patterns and the leg is a member now). None: out of
    scope. Patterns as for peer trust (kms.core.authn.identity_matches)."""
    policy = ticket.policy
    creator = idr_in_policy(policy, IdRole.IDRI)
    if creator is not None and identity_matches(creator.data, node.initiators):
        return "initiator"
    listed = responders_of(policy)
    if any(identity_matches(r, node.responders) for r in ([leg] if leg else listed)):
        return "responder"
    for group in listed:
        if not identity_matches(group, node.groups):
            continue
        if leg is None or leg == group or deps.directory.is_member(group, leg):
            return "group"
    return None


def handle_node_resolve(
    v: InitialMessage, auth: Authenticated, deps: Deps, call: Call, now: float
) -> Issued:
    """The session keys of the leg the node names, in a RESOLVE_RESP protected for it."""
    assert isinstance(v, ResolveInitPsk | ResolveInitPk)  # a node resolve (PSK or certificate)
    node = deps.nodes.node(auth.identity.data) if deps.nodes is not None else None
    if node is None:  # removed since it authenticated
        raise _not_a_node("node removed")
    ks = deps.keystore
    ticket = v.ticket
    check_ticket_type(ticket)
    tid = ticket_id(ticket.ticket_data)
    forking = bool(ticket.policy.flags & TpFlag.I)
    leg = v.idr_r.data if v.idr_r is not None else None
    notes: dict[str, object] = {
        "node": node.identity.decode("utf-8", "replace"),
        "role": node.role,
        "ticket_id": tid,
        "leg": "" if leg is None else leg.decode("utf-8", "replace"),
        "forking": forking,
    }
    with noting(notes):
        issuer = idr_in_policy(ticket.policy, IdRole.IDRKMS)
        if issuer is not None and issuer.data != deps.policy.kms_id:
            # RFC 6043 9 lets a KMS resolve another's ticket for its own Responders; a node
            # is trusted by the KMS that registered it, so it asks the issuing KMS itself.
            raise denied(
                ErrorNo.INVALID_ID,
                "ticket issued by another KMS: the node must be registered there",
                "node asked about a foreign ticket",
            )
        contents = open_ticket(ticket, deps, now)
        check_validity(ticket, deps, now, contents.t)
        creator = idr_in_policy(ticket.policy, IdRole.IDRI)
        check_ticket(deps.revocations, tid, creator.data if creator else None, contents.t)
        if forking and leg is None:
            raise denied(ErrorNo.INVALID_ID, "a forking ticket's leg must be named by IDRr")
        if leg is not None:
            check_responder(ticket, leg, deps)  # the leg must be one the ticket allows
        scope = scope_of(node, ticket, leg, deps)
        if scope is None:
            raise denied(
                ErrorNo.INVALID_ID,
                "not an authorised node for this ticket",
                f"{node.role} node out of scope",
            )
        notes["scope"] = scope
        if forking and deps.fork_modifier is None:
            raise denied(ErrorNo.UNSPECIFIED, "forked leg keys are not available")
        try:
            modifier = modifier_for(ks, deps.fork_modifier, bytes.fromhex(tid), leg or b"")
            resolution = resolve_ticket_keys(ks, ticket, contents, leg or b"", modifier)
        except TicketError as exc:
            raise auth_failure(f"ticket refused: {exc.reason}") from None
        # Least privilege: the session keys (TEK, TGK' of the leg, GTGK), not MPKi / MPKr'.
        keys = list(resolution.session_keys)
        sealed = build_resolve_resp(v, auth, deps, now, keys, resolution.rand_kms, leg or b"")
    return Issued(
        sealed,
        {
            **notes,
            "event": EVENT,
            "keys": [KeyDataType(k.key_type).name for k in keys],
        },
    )
