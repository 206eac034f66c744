"""Federation (RFC 6043 9): resolving a ticket that another KMS issued.

The Responder's KMS authenticates its Responder as usual, then acts as a Responder itself
toward the issuing KMS: a RESOLVE_INIT_PSK of its own (new CSB ID, T and RANDRr) carrying the
end Responder's IDRr and the TICKET unchanged, MACed with the key shared with that peer and
naming itself in IDRpsk. It verifies the issuing KMS's RESOLVE_RESP and re-protects the keys
for its Responder. Forked keys stay bound to the end Responder's identity, which the issuing
KMS checks against its trust in this peer (kms.core.authn.authenticate_peer).

A certificate peer (no shared key) is sent a RESOLVE_INIT_PK instead: CERT is this KMS's
signing certificate, CHASH and PKE name the peer's envelope certificate (a fresh env_key,
RSAES-PKCS1-v1_5), and SIGN is computed by the token with this KMS's signing key over the
message || IDRr || IDRkms; the answer is checked with keys from env_key
(kms.core.pk.CertificateAuthenticator accepts it on the issuing side).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from kms.core.api import Outcome
from kms.core.context import Authenticated, Call, Deps, Issued, noting
from kms.core.errors import Refusal, denied
from kms.core.ports import PeerError, PeerFailure, PeerKms
from kms.core.psk_versions import version_name
from kms.core.request import fresh_timestamp
from kms.core.resolve import build_resolve_resp
from kms.keystore import Key, SignScheme
from kms.mikey.compose import ResolveInit
from kms.mikey.constants import (
    CertType,
    DataType,
    ErrorNo,
    HashFunc,
    IdRole,
    KeyDataType,
    RandRole,
    SignType,
)
from kms.mikey.coverage import seal
from kms.mikey.derive import KeyDirection
from kms.mikey.errors import DecodeError
from kms.mikey.header import EmptyMap, Header
from kms.mikey.message import Message
from kms.mikey.payloads import Cert, Chash, Error, KeyData, Payload, Pke, Sign
from kms.mikey.protect import (
    ResponseRejected,
    message_keys,
    open_response,
    placeholder_v,
    seal_mac,
)
from kms.mikey.ticket import Idr, RandR, Ticket, TpFlag
from kms.mikey.views import ResolveResp


@dataclass(frozen=True)
class PeerCall:
    """A Ticket Resolve the core cannot finish alone (RFC 6043 9): the adapter sends ``wire``
    to ``peer`` (with ``correlation_id`` and ``hops``; ``rebuild`` makes a fresh message for
    a retry, never the same bytes, RFC 3830 5.4), then hands the answer to the message built
    last, or the :class:`PeerError`, and the time back to ``Kms.finish_resolve``. No core
    state is held while the peer answers: everything needed to finish travels here."""

    peer: PeerKms
    wire: bytes = field(repr=False)
    correlation_id: str
    hops: int
    rebuild: Callable[[], bytes] = field(repr=False)
    pending: _Pending = field(repr=False)
    audit: Mapping[str, object] = field(default_factory=dict)  # the record so far


@dataclass(frozen=True)
class _Pending:
    """What finishing a forwarded resolve needs: the Responder's request and its sender,
    and each message built for the peer (with its RANDRr and response key)."""

    v: ResolveInit
    auth: Authenticated
    ticket: Ticket
    built: list[tuple[Message, bytes, Key]]


def _invalid(reason: str) -> Refusal:
    return Refusal(
        ErrorNo.UNSPECIFIED,
        Outcome.UNAVAILABLE,
        "issuing KMS returned an invalid response",
        f"peer response rejected: {reason}",
    )


def _peer_error_no(error_message: bytes | None) -> ErrorNo:
    if error_message:
        try:
            err = Message.decode(error_message).first(Error)
            if err is not None:
                return ErrorNo(err.error_no)
        except (DecodeError, ValueError):
            pass
    return ErrorNo.UNSPECIFIED


def start_forward(
    v: ResolveInit,
    auth: Authenticated,
    deps: Deps,
    call: Call,
    now: float,
    issuer: Idr,
    audit: Mapping[str, object],
) -> PeerCall:
    """The first half of a federated resolve: checks, then the RESOLVE_INIT for the issuer.
    ``audit``: what the resolve noted before it found the ticket foreign."""
    ticket = v.ticket
    notes: dict[str, object] = {**audit, "issuer": issuer.data.decode("utf-8", "replace")}
    with noting(notes):
        if auth.method == "peer":
            # A peer asked us to resolve a ticket we did not issue: never forward again, so
            # that a routing loop (A -> B -> A) stops at the first hop.
            raise denied(
                ErrorNo.INVALID_TICKET, "ticket not issued by this KMS", "no second hop"
            )
        if call.hops >= 1:
            raise denied(ErrorNo.INVALID_TICKET, "federation hop limit reached", "hop limit")
        peer = deps.directory.peer(issuer.data)
        if peer is None or not deps.federation:
            raise denied(
                ErrorNo.INVALID_TICKET, "ticket issued by an unknown KMS", "unknown issuer"
            )
        if peer.psk is None and not _reachable_by_pk(peer):
            raise denied(
                ErrorNo.INVALID_TICKET, "issuing KMS not reachable", "cert peer incomplete"
            )
    notes["event"] = "ticket.forwarded"
    notes["peer"] = peer.kms_id.decode("utf-8", "replace")
    if peer.psk is None:
        notes["peer_auth"] = "pk"
    elif peer.psk_version != 1:
        notes["peer_psk_version"] = peer.psk_version  # `kms peer use-psk`: the key we send with
    built: list[tuple[Message, bytes, Key]] = []

    def build() -> bytes:
        # Fresh RAND (and, for PK, env_key) each time: a retry on another replica of the
        # peer must not be the same bytes (RFC 3830 5.4 replay protection refuses them).
        k: Key
        if peer.psk is None:
            f, r, k = _forwarded_resolve_init_pk(v, auth, deps, now, ticket, issuer, peer)
        else:
            f, r = _forwarded_resolve_init(v, auth, deps, now, ticket, issuer, peer)
            k = peer.psk
        built.append((f, r, k))
        return bytes(f.wire)

    with noting(notes):
        first = build()
    return PeerCall(
        peer,
        first,
        call.correlation_id,
        call.hops + 1,
        build,
        _Pending(v, auth, ticket, built),
        notes,
    )


def finish_forward(pc: PeerCall, answer: bytes | PeerError, deps: Deps, now: float) -> Issued:
    """The second half: the issuing KMS's answer (or why there is none) becomes the
    RESOLVE_RESP for our Responder, or a refusal."""
    p = pc.pending
    if isinstance(answer, PeerError):
        exc = answer
        if exc.kind is PeerFailure.REFUSED:
            raise Refusal(
                _peer_error_no(exc.error_message),
                exc.outcome or Outcome.UNAVAILABLE,
                f"issuing KMS refused: {exc.detail}"[:200],
                f"peer refused ({exc.status}): {exc.detail}",
            )
        if exc.kind is PeerFailure.INVALID:
            raise _invalid(exc.detail)
        raise Refusal(
            ErrorNo.UNSPECIFIED,
            Outcome.UNAVAILABLE,
            "issuing KMS unavailable",
            f"peer unavailable: {exc.detail}",
        )
    fwd, rand_r, key = p.built[-1]  # the peer answered the message built last
    keys, rand_kms = _verify_peer_answer(answer, fwd, p.auth, deps, p.ticket, key, rand_r)
    sealed = build_resolve_resp(p.v, p.auth, deps, now, keys, rand_kms, p.auth.identity.data)
    return Issued(
        sealed,
        {"event": "ticket.resolved", "via_peer": True, "forking": rand_kms is not None},
    )


def _forwarded_head(
    data_type: DataType, v: ResolveInit, auth: Authenticated, deps: Deps, now: float
) -> tuple[Header, list[Payload], bytes]:
    """What both forms of the forwarded RESOLVE_INIT start with: a fresh HDR (own CSB ID),
    T, RANDRr and IDRr naming the end Responder. Returns them and RANDRr."""
    ks = deps.keystore
    rand_r = ks.random(32)
    csb = int.from_bytes(ks.random(4), "big")
    header = Header(data_type, csb, EmptyMap(0), True, v.hdr.prf_func)
    head: list[Payload] = [
        fresh_timestamp(v.t, now),
        RandR(RandRole.RANDRR, rand_r),
        Idr(IdRole.IDRR, auth.identity.id_type, auth.identity.data),
    ]
    return header, head, rand_r


def _forwarded_resolve_init(
    v: ResolveInit,
    auth: Authenticated,
    deps: Deps,
    now: float,
    ticket: Ticket,
    issuer: Idr,
    peer: PeerKms,
) -> tuple[Message, bytes]:
    """RESOLVE_INIT_PSK = HDR, T, RANDRr, IDRr (end Responder), IDRkms (issuer), TICKET,
    IDRpsk (this KMS, and the version of the key shared with the issuer it sends with), V."""
    ks = deps.keystore
    assert peer.psk is not None
    header, head, rand_r = _forwarded_head(DataType.RESOLVE_INIT_PSK, v, auth, deps, now)
    payloads: list[Payload] = [
        *head,
        Idr(IdRole.IDRKMS, issuer.id_type, issuer.data),
        ticket,
        # The version of the shared key this KMS sends with: ``<kms id>#psk<N>``, version 1
        # by the bare id (RFC 6043 4.2.3: IDRpsk indicates the pre-shared key used).
        Idr(IdRole.IDRPSK, deps.policy.kms_id_type,
            version_name(deps.policy.kms_id, peer.psk_version)),
        placeholder_v(auth.suite.mac_alg),
    ]
    draft = Message(header, tuple(payloads))
    keys = message_keys(ks, peer.psk, draft, KeyDirection.INITIAL, None, rand_r, auth.suite)
    return seal_mac(draft, keys, auth.suite.mac_alg, auth.identity.data + issuer.data), rand_r


def _reachable_by_pk(peer: PeerKms) -> bool:
    return (
        peer.envelope_cert_der is not None
        and peer.local_signing_key is not None
        and peer.local_signing_cert_der is not None
    )


def _forwarded_resolve_init_pk(
    v: ResolveInit,
    auth: Authenticated,
    deps: Deps,
    now: float,
    ticket: Ticket,
    issuer: Idr,
    peer: PeerKms,
) -> tuple[Message, bytes, bytes]:
    """RESOLVE_INIT_PK = HDR, T, RANDRr, IDRr (end Responder), CERT (this KMS's signing
    certificate), IDRkms (issuer), TICKET, CHASH, PKE, SIGN (RFC 6043 4.2.3.1): the PK
    counterpart of :func:`_forwarded_resolve_init`. Returns it, RANDRr and env_key."""
    ks = deps.keystore
    assert peer.envelope_cert_der is not None
    assert peer.local_signing_key is not None and peer.local_signing_cert_der is not None
    envelope = x509.load_der_x509_certificate(peer.envelope_cert_der).public_key()
    own = x509.load_der_x509_certificate(peer.local_signing_cert_der).public_key()
    if not isinstance(envelope, rsa.RSAPublicKey) or not isinstance(own, rsa.RSAPublicKey):
        raise denied(ErrorNo.INVALID_TICKET, "issuing KMS not reachable", "cert peer not RSA")
    header, head, rand_r = _forwarded_head(DataType.RESOLVE_INIT_PK, v, auth, deps, now)
    env_key = ks.random(32)
    payloads: list[Payload] = [
        *head,
        Cert(CertType.X509V3, peer.local_signing_cert_der),
        Idr(IdRole.IDRKMS, issuer.id_type, issuer.data),
        ticket,
        Chash(HashFunc.SHA_256, hashlib.sha256(peer.envelope_cert_der).digest()),
        Pke(0, envelope.encrypt(env_key, padding.PKCS1v15())),  # C = 0: no cache
        Sign(SignType.RSA_PKCS1_V1_5, bytes((own.key_size + 7) // 8)),
    ]
    key = peer.local_signing_key
    fwd = seal(
        Message(header, tuple(payloads)),
        lambda data: ks.sign(key, data, SignScheme.RSA_PKCS1V15_SHA256),
        auth.identity.data + issuer.data,
    )
    return fwd, rand_r, env_key


def _verify_peer_answer(
    answer: bytes,
    fwd: Message,
    auth: Authenticated,
    deps: Deps,
    ticket: Ticket,
    key: Key,
    rand_r: bytes,
) -> tuple[list[KeyData], bytes | None]:
    """Check the issuing KMS's RESOLVE_RESP like a Responder would (RFC 6043 4.2.3.6), and
    that forked keys are bound to the end Responder, not to some other identity. ``key``:
    the key shared with the peer, or the env_key of a RESOLVE_INIT_PK."""
    try:
        resp, opened = open_response(
            deps.keystore, answer, ResolveResp, fwd, key, auth.suite, None, rand_r
        )
    except ResponseRejected as exc:
        raise _invalid(exc.reason) from None
    key_data = list(opened)
    forking = bool(ticket.policy.flags & TpFlag.I)
    mpks = [k for k in key_data if k.key_type == KeyDataType.MPK]
    if len(mpks) != (2 if forking else 1) or key_data[: len(mpks)] != mpks:
        raise _invalid("KEMAC does not start with MPKi [and MPKr']")
    rand_kms = None
    if forking:
        assert isinstance(resp, ResolveResp)
        bound, rand = resp.idr_r, resp.rand_kms
        if bound is None or bound.data != auth.identity.data or rand is None:
            raise _invalid("forked keys not bound to the resolving Responder")
        rand_kms = rand.value
    return key_data, rand_kms
