"""Authenticating initial messages: identity, timestamp window, PSK MAC, rate and replay
(RFC 6043 4.2.1.2, 4.2.3.2, 5.4; RFC 3830 5.4; docs/rfc-readings.md R7, R8).

Order matters: nothing that costs state (rate counters, the replay cache) is touched before
the MAC has been verified, so unauthenticated messages never build state in the KMS; and
nothing that depends on the sender (the timestamp window included) is answered before it,
so a forged message gets the same answer whether its identity is registered or not.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import replace

from kms.core.api import Outcome
from kms.core.context import Authenticated, Deps, noting
from kms.core.errors import Refusal, auth_failure, denied, precondition
from kms.core.ports import PeerKms, ReplayCacheFull
from kms.core.psk_versions import PeerPsk, named_psk, peer_psk
from kms.keystore import KeyNotFound
from kms.mikey.compose import InitialMessage, sender_of
from kms.mikey.constants import EncrAlg, ErrorNo, IdRole, IdType, TsType
from kms.mikey.message import Message
from kms.mikey.ntp import decode_ts_value
from kms.mikey.payloads import Kemac
from kms.mikey.protect import Suite, check_mac, exchange_keys, suite_for
from kms.mikey.ticket import Idr
from kms.mikey.views import RequestInitPsk, ResolveInitPk, ResolveInitPsk

PskInit = RequestInitPsk | ResolveInitPsk


def message_suite(msg: Message) -> Suite:
    try:
        return suite_for(msg.header.prf_func)
    except ValueError:
        raise Refusal(
            ErrorNo.INVALID_PRF, Outcome.MALFORMED, "PRF function not supported"
        ) from None


def check_timestamp(v: InitialMessage, deps: Deps, now: float) -> None:
    """RFC 3830 5.4: the timestamp must fall inside the window around the KMS clock."""
    t = v.t
    if t.ts_type == TsType.COUNTER:
        raise precondition(ErrorNo.INVALID_TS, "COUNTER timestamps are not accepted by the KMS")
    sent = decode_ts_value(TsType(t.ts_type), t.value)
    if abs(sent - now) > deps.policy.timestamp_window_s:
        raise precondition(
            ErrorNo.INVALID_TS,
            "timestamp outside the accepted window",
            f"timestamp off by {sent - now:+.0f} s",
        )


def check_kms_identity(v: InitialMessage, deps: Deps) -> bytes:
    """IDRkms, when present, must name this KMS; the MAC covers this KMS's identity."""
    idr = v.idr_kms
    if idr is not None and idr.data != deps.policy.kms_id:
        raise denied(ErrorNo.INVALID_ID, "message addressed to another KMS")
    return deps.policy.kms_id


def _supplies_keys(v: PskInit) -> bool:
    """Whether a REQUEST_INIT_PSK's desired TP carries a KEMAC of Initiator-chosen keys,
    encrypted with the request's own message keys (RFC 6043 4.2.1.1; docs/design.md)."""
    if not isinstance(v, RequestInitPsk):
        return False
    return any(isinstance(p, Kemac) and p.encr_alg != EncrAlg.NULL for p in v.tp.payloads)


def sender_identity(v: PskInit, role: IdRole) -> Idr:
    """The sender's identity: its IDRi/IDRr, else the owner named by IDRpsk
    (docs/rfc-readings.md R7)."""
    idr, _ = sender_of(v)
    psk = v.idr_psk
    if idr is not None and psk is not None and psk.data != idr.data:
        raise auth_failure("IDRpsk names another identity than the sender's IDR")
    if idr is not None:
        return idr
    if psk is not None:
        return Idr(role, IdType.URI, psk.data)
    raise Refusal(
        ErrorNo.INVALID_ID, Outcome.UNAUTHENTICATED, "sender identity missing", "no IDR or IDRpsk"
    )


MAX_CLAIMED_IDENTITY = 128


def claimed_identity(data: bytes) -> str:
    """An identity as the audit log records it before it has authenticated: at most
    MAX_CLAIMED_IDENTITY characters (an unauthenticated caller must not decide how much the
    KMS writes); a longer one is cut, with its length and a digest to tell them apart."""
    if len(data) <= MAX_CLAIMED_IDENTITY:
        return data.decode("utf-8", "replace")
    head = data[:64].decode("utf-8", "replace")
    return f"{head}...({len(data)} bytes, sha256:{hashlib.sha256(data).hexdigest()[:16]})"


def authenticate_psk(
    v: PskInit, deps: Deps, now: float, role: IdRole
) -> tuple[Authenticated, dict[str, object]]:
    """Authenticate REQUEST_INIT_PSK (role IDRi) or RESOLVE_INIT_PSK (role IDRr); returns
    the sender and the audit fields about it."""
    msg = v.msg
    suite = message_suite(msg)
    # A rotated PSK's version, named by IDRpsk (RFC 6043 4.2.1, 4.2.3).
    named = named_psk(v, deps.psk_versions, deps.directory, role, now)
    identity = sender_identity(v, role) if named is None else named.identity
    with noting({"sender": claimed_identity(identity.data)}):
        kms_id = check_kms_identity(v, deps)
        if named is None:
            registered, unknown = deps.directory.psk_for(identity.data), "unknown identity"
        else:
            registered, unknown = named.key, named.reason
        # Registered or not, the same work in the same order: an unknown identity's MAC is
        # verified against the dummy key, and every check that depends on the identity (the
        # timestamp window included) comes only after the MAC has verified. Otherwise the
        # answer, or the time it takes, tells a prober which identities are registered.
        psk = registered if registered is not None else deps.dummy_psk
        rand = sender_of(v)[1].value
        rand_i, rand_r = (rand, None) if role == IdRole.IDRI else (None, rand)
        # Verifying V needs the initial message's auth key only (its encryption and salt
        # keys only to open a desired KEMAC with Initiator-supplied keys). The response's
        # keys come from the same PSK: all in one key-store operation (RFC 6043 5.1.2). A
        # forged message costs the same token work, registered identity or not.
        initial = suite if _supplies_keys(v) else replace(suite, encr_alg=EncrAlg.NULL)
        verified = False
        keys = resp_keys = None
        if psk is not None:
            try:
                keys, resp_keys = exchange_keys(
                    deps.keystore, psk, msg, rand_i, rand_r, initial, suite
                )
            except KeyNotFound:
                if registered is not None:
                    raise auth_failure("PSK registered but missing in the token") from None
            else:
                verified = check_mac(msg, keys, suite, identity.data + kms_id)
        if registered is None:
            # Answered exactly like a wrong MAC: an "Invalid ID" here would tell anyone which
            # identities are registered. The audit log keeps the real reason.
            raise auth_failure(unknown)
        if not verified:
            raise auth_failure("MAC verification failed")
    notes: dict[str, object] = {"sender": identity.data.decode("utf-8", "replace")}
    if named is not None:
        notes["psk_version"] = named.version
    auth = Authenticated(
        identity, registered, suite, rand_i, rand_r, kms_id, "psk",
        response_keys=resp_keys, initial_keys=keys if initial is suite else None,
    )
    # From here on, refusals carry a V (the sender is authenticated).
    with noting(notes, auth):
        check_timestamp(v, deps, now)
        admit(msg, deps, now, identity.data)
    return auth, notes


def admit(msg: Message, deps: Deps, now: float, identity: bytes) -> None:
    """After authentication: per-identity rate limit, then the replay cache."""
    if deps.admission is not None:  # both in one step (one database round trip)
        digest, expires = _replay_key(msg, deps, now)
        allowed, fresh = deps.admission.admit(identity, digest, expires, now)
        if not allowed:
            raise Refusal(ErrorNo.UNSPECIFIED, Outcome.RATE_LIMITED, "rate limit exceeded")
        if not fresh:
            raise _replayed()
        return
    if not deps.rate.allow(identity, now):
        raise Refusal(ErrorNo.UNSPECIFIED, Outcome.RATE_LIMITED, "rate limit exceeded")
    check_replay(msg, deps, now)


def _replay_key(msg: Message, deps: Deps, now: float) -> tuple[bytes, float]:
    # Keep each digest as long as its timestamp could still be accepted.
    return hashlib.sha256(msg.wire).digest(), now + 2 * deps.policy.timestamp_window_s


def _replayed() -> Refusal:
    return precondition(ErrorNo.INVALID_TS, "replayed message", "replay of an accepted message")


def check_replay(msg: Message, deps: Deps, now: float) -> None:
    """RFC 3830 5.4: refuse a second copy of an accepted initial message (keyed by its hash)."""
    digest, expires = _replay_key(msg, deps, now)
    try:
        fresh = deps.replay.check_and_store(digest, expires, now)
    except ReplayCacheFull:
        # Over the rate the cache was sized for: refuse (the client may retry) rather than
        # forget a live digest, which would let its replay through.
        raise Refusal(
            ErrorNo.UNSPECIFIED, Outcome.RATE_LIMITED, "server busy, retry later",
            "replay cache full of live entries",
        ) from None
    if not fresh:
        raise _replayed()


def forwarding_peer(v: InitialMessage, deps: Deps, now: float) -> PeerPsk | None:
    """RFC 6043 9: a RESOLVE_INIT_PSK whose IDRpsk names a registered peer KMS (or a version
    of the key shared with it, ``<kms id>#psk<N>``) comes from that KMS, resolving on behalf
    of the Responder named by IDRr."""
    if not isinstance(v, ResolveInitPsk) or v.idr_psk is None:
        return None
    name = v.idr_psk.data
    if v.idr_r is not None and v.idr_r.data == name:
        return None  # an endpoint naming its own PSK (a peer names itself, not IDRr): no read
    return peer_psk(name, deps.psk_versions, deps.directory, now)


def authenticate_peer(
    v: ResolveInitPsk, deps: Deps, now: float, named: PeerPsk
) -> tuple[Authenticated, dict[str, object]]:
    """A peer KMS forwarding a Ticket Resolve: MAC with the key shared with that peer (the
    version IDRpsk names) over RESOLVE_INIT || IDRr || IDRkms, then the issuing side's
    trust: may this peer resolve for that identity, and within its quota
    (docs/federation.md). An unknown or retired version is refused like a wrong MAC, after
    the same work (the dummy key's)."""
    msg = v.msg
    suite = message_suite(msg)
    peer = named.peer
    notes: dict[str, object] = {"peer": peer.kms_id.decode("utf-8", "replace")}
    if named.version is not None:
        notes["psk_version"] = named.version
    with noting(notes):
        identity = peer_responder(v)
    notes["sender"] = claimed_identity(identity.data)
    with noting(notes):
        kms_id = check_kms_identity(v, deps)
        if peer.psk is None:
            raise auth_failure("peer has no shared key for RESOLVE_INIT_PSK")
        rand_r = v.rand_r.value
        key = named.key if named.key is not None else deps.dummy_psk
        verified = False
        keys = resp_keys = None
        if key is not None:
            try:
                keys, resp_keys = exchange_keys(deps.keystore, key, msg, None, rand_r, suite, suite)
            except KeyNotFound:
                if named.key is not None:
                    raise auth_failure("peer key registered but missing in the token") from None
            else:
                verified = check_mac(msg, keys, suite, identity.data + kms_id)
        if named.key is None:
            raise auth_failure(f"peer {named.reason}")
        if not verified:
            raise auth_failure("peer MAC verification failed")
    notes["sender"] = identity.data.decode("utf-8", "replace")  # vouched for by the peer
    with noting(notes):
        check_timestamp(v, deps, now)  # after the MAC, as for endpoints
        check_peer_resolves_for(peer, identity.data, "peer")
    # The RESOLVE_RESP is protected with the version the request used (as for endpoints).
    auth = Authenticated(
        identity, named.key, suite, None, rand_r, kms_id, "peer", peer.kms_id,
        response_keys=resp_keys,
    )
    with noting(notes, auth):
        check_peer_quota(peer, deps, now)
        check_replay(msg, deps, now)
    return auth, notes


# --- the issuing side's trust in a peer KMS (PSK and certificate peers alike) ---------------


def peer_responder(v: ResolveInitPsk | ResolveInitPk) -> Idr:
    """The end Responder a peer KMS resolves for (IDRr); refused when absent."""
    identity = v.idr_r
    if identity is None:
        raise Refusal(
            ErrorNo.INVALID_ID,
            Outcome.UNAUTHENTICATED,
            "sender identity missing",
            "peer without IDRr",
        )
    return identity


def identity_matches(identity: bytes, patterns: tuple[str, ...]) -> bool:
    """Whether ``identity`` matches one of the trust ``patterns`` (case-sensitive globs, as
    `kms peer add --resolve-for` and `kms node add --initiators ...` take them)."""
    shown = identity.decode("utf-8", "replace")
    return any(fnmatch.fnmatchcase(shown, pattern) for pattern in patterns)


def check_peer_resolves_for(peer: PeerKms, identity: bytes, who: str) -> None:
    """The peer's ``--resolve-for`` patterns must cover the end Responder
    (docs/federation.md); ``who`` names the peer in the audit reason."""
    shown = identity.decode("utf-8", "replace")
    if not identity_matches(identity, peer.resolve_for):
        raise denied(
            ErrorNo.INVALID_ID,
            "peer KMS may not resolve for this identity",
            f"{who} not trusted for {shown}",
        )


def check_peer_quota(peer: PeerKms, deps: Deps, now: float) -> None:
    """The per-peer resolve quota (``--rate-limit``)."""
    if deps.peer_quota is not None and not deps.peer_quota.allow(peer.kms_id, peer.rate_per_s, now):
        raise Refusal(ErrorNo.UNSPECIFIED, Outcome.RATE_LIMITED, "peer quota exceeded")
