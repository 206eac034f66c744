"""Public-key authentication of REQUEST_INIT_PK and RESOLVE_INIT_PK (RFC 6043 4.2.1.1,
4.2.3.1, 5.4, 6.7; RFC 3830 3.2, 4.2.5, 6.8; docs/rfc-readings.md R5, R7, R8).

REQUEST_INIT_PK = HDR, T, RANDRi, [IDRi], {CERTi}, [IDRkms], TP, [CHASH], PKE, SIGNi
RESOLVE_INIT_PK = HDR, T, RANDRr, [IDRr], {CERTr}, [IDRkms], TICKET, [CHASH], PKE, SIGNr

The sender proves its identity with a certificate chain (own certificate first, each next
one certifying the previous, RFC 6043 6.7) and the SIGN payload; PKE carries a fresh
envelope key (env_key) encrypted to one of the KMS's RSA keys, and the KMS protects its
response with keys derived from env_key (RFC 6043 5.1.2, label type 0x02).

Order of the checks (every step before the PKE is pure software; the token is touched only
for a message whose signature verified and whose timestamp is fresh):

1. PRF func and IDRkms (as for PSK messages: Identity_kms is part of the signed data);
2. certificate chain against the configured CA bundle, then revocation of each certificate
   of the validated chain (``[pk] crl``; revoked, or a CRL expired -> fail closed)
   -> ERR Invalid Cert (8);
3. identity binding: the certificate's subjectAltName URI equals IDRi / IDRr byte for byte
   (docs/rfc-readings.md R8), or becomes the identity when the IDR is omitted (R7)
   -> Auth failure;
4. SIGN over the message up to the Signature field || Identity_i/r || Identity_kms
   (RFC 6043 5.4), S type 0 RSASSA-PKCS1-v1_5 or 1 RSASSA-PSS, SHA-256 unless configured
   (docs/rfc-readings.md R5) -> Auth failure;
5. timestamp window (RFC 3830 5.4; now authenticated by SIGN) -> Invalid TS;
6. CHASH selects the envelope key (hash of that key's certificate) -> Auth failure;
7. PKE decrypted in the token (PKCS#1 v1.5 or OAEP-SHA1 per configuration, R5); every
   PKE failure, including a too short env_key, is the same opaque Auth failure;
8. only then rate limit and replay cache (:func:`kms.core.authn.admit`), so unauthenticated
   messages never build state in the KMS.

A RESOLVE_INIT_PK whose CERT names (subjectAltName URI) a registered certificate peer KMS is
that KMS resolving on behalf of the end Responder in IDRr (RFC 6043 9): its certificate must
be the peer's pinned signing certificate (`kms peer add --cert`), not revoked (as above; its
issuer is itself when self-issued, else a CA of the bundle), SIGN is verified with IDRr
as the signed identity, PKE is opened as above, then the peer trust of the PSK peer path
applies (``--resolve-for`` patterns, per-peer quota; replay as for any PK message).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import itertools
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, load_der_public_key
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from kms.core.api import Outcome
from kms.core.authn import (
    check_kms_identity,
    check_peer_quota,
    check_peer_resolves_for,
    check_timestamp,
    message_suite,
    peer_responder,
)
from kms.core.context import Authenticated, Deps, noting
from kms.core.errors import Refusal, auth_failure
from kms.core.ports import IntermediateNode, PeerKms, Revocation, RevocationChecker
from kms.core.steps import Steps, TokenIo, drive, token
from kms.keystore import InvalidSealedData, KeyRef, RsaPadding
from kms.mikey.compose import sender_of
from kms.mikey.constants import CertType, ErrorNo, HashFunc, IdRole, IdType, SignType
from kms.mikey.coverage import initial_mac_input
from kms.mikey.ticket import Idr
from kms.mikey.views import RequestInitPk, ResolveInitPk

PkInit = RequestInitPk | ResolveInitPk

ENV_KEY_MIN_BYTES = 16  # RFC 6043 12.1: keys of at least 128 bits
MAX_CHAIN_CERTS = 8  # CERT payloads accepted in one message (own certificate included)

# CERT types that carry a DER X.509v3 certificate (RFC 3830 T6.7.b); URLs are not fetched.
_DER_CERT_TYPES = frozenset({CertType.X509V3, CertType.X509V3_SIGN})


class SignHash(StrEnum):
    """The hash under SIGN, which MIKEY does not signal (docs/rfc-readings.md R5): SHA-256 by
    project default; SHA-1 (RFC 3830 4.2.1's mandatory hash) where a profile asks for it."""

    SHA256 = "sha256"
    SHA1 = "sha1"

    def algorithm(self) -> hashes.HashAlgorithm:
        if self is SignHash.SHA256:
            return hashes.SHA256()
        return hashes.SHA1()  # noqa: S303 - only where a deployment profile selects it


def chash_digest(hash_func: int, cert_der: bytes) -> bytes | None:
    """CHASH value of a certificate (RFC 3830 6.8, RFC 6043 T6.12); None for MD5/unknown."""
    if hash_func == HashFunc.SHA_256:
        return hashlib.sha256(cert_der).digest()
    if hash_func == HashFunc.SHA_1:
        return hashlib.sha1(cert_der, usedforsecurity=False).digest()
    return None


@dataclass(frozen=True)
class EnvelopeKey:
    """An RSA key of the KMS that endpoints encrypt env_key to, and its certificate (DER),
    which CHASH names (RFC 3830 6.8)."""

    key: KeyRef
    cert_der: bytes = field(repr=False)


def load_pem_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle; ValueError if there is none or one is malformed."""
    certs = x509.load_pem_x509_certificates(data)
    if not certs:  # pragma: no cover - cryptography already refuses an empty bundle
        raise ValueError("no certificate in the PEM data")
    return certs


def invalid_cert(reason: str) -> Refusal:
    """RFC 3830 T6.12 error 8: the sender's certificate is not acceptable. Certificates are
    public, so saying so helps an honest sender and no attacker."""
    return Refusal(
        ErrorNo.INVALID_CERT, Outcome.UNAUTHENTICATED, "certificate not accepted", reason
    )


class CertificateAuthenticator:
    """:class:`kms.core.context.PkAuthenticator` over X.509 certificates, SIGN and PKE.

    ``deps`` is read at call time (key store, policy, rate limiter, replay cache), so the
    composition root can create it before it stores it in ``deps.pk``. ``envelope_keys``:
    the first one is used when the message has no CHASH.
    """

    def __init__(
        self,
        deps: Deps,
        roots: Sequence[x509.Certificate],
        envelope_keys: Sequence[EnvelopeKey],
        *,
        pke_padding: RsaPadding = RsaPadding.PKCS1V15,
        sign_hash: SignHash = SignHash.SHA256,
        revocation: RevocationChecker | None = None,
    ) -> None:
        # No roots: endpoint certificates cannot be validated, so only certificate peer KMSs
        # (pinned certificates, RFC 6043 9) are accepted; endpoints get "not enabled".
        self._endpoints_enabled = bool(roots)
        if not envelope_keys:
            raise ValueError("at least one envelope key is needed")
        self._deps = deps
        self._store = Store(list(roots)) if roots else None
        self._roots = tuple(roots)
        self.revocation = revocation  # None: no revocation source configured
        self._envelope_keys = tuple(envelope_keys)
        self.pke_padding = RsaPadding(pke_padding)
        self.sign_hash = SignHash(sign_hash)

    def check_envelope_keys(self) -> None:
        """Each envelope certificate must certify the key the token holds under its label
        (a mismatch would make every PK request fail as an opaque PKE failure)."""
        for env in self._envelope_keys:
            cert = x509.load_der_x509_certificate(env.cert_der)
            token_key = load_der_public_key(self._deps.keystore.public_key_der(env.key))
            if cert.public_key() != token_key:
                raise ValueError(f"the certificate for {env.key} does not match its key")

    # --- PkAuthenticator ------------------------------------------------------------------

    def authenticate(self, v: PkInit, now: float, role: int) -> Authenticated:
        """:meth:`authenticate_steps` run to the end here, the RSA operation included."""
        return drive(self.authenticate_steps(v, now, role))

    def authenticate_steps(self, v: PkInit, now: float, role: int) -> Steps[Authenticated]:
        """The authentication as steps (:mod:`kms.core.steps`): everything before the PKE
        runs here; the envelope's RSA decryption is yielded as the one :class:`TokenIo`."""
        deps = self._deps
        id_role = IdRole(role)
        if id_role not in (IdRole.IDRI, IdRole.IDRR):
            raise ValueError("role must be IDRi (Ticket Request) or IDRr (Ticket Resolve)")
        first = _first_certificate(v)
        if id_role == IdRole.IDRR and first is not None and isinstance(v, ResolveInitPk):
            uris = _san_uris(first)
            peer = self._certificate_peer(uris)
            if peer is not None:
                return (yield from self._authenticate_peer_pk(v, now, peer, first))
            node = self._certificate_node(uris)
            if node is not None:
                return (yield from self._authenticate_node_pk(v, now, node, first))
        if not self._endpoints_enabled:
            raise Refusal(
                ErrorNo.UNSUPPORTED_MESSAGE_TYPE,
                Outcome.MALFORMED,
                "public-key messages are not enabled on this KMS",
            )
        suite = message_suite(v.msg)
        kms_id = check_kms_identity(v, deps)

        leaf = self._validate_chain(v, now, first)
        identity = _bind_identity(v, id_role, leaf)
        self._verify_signature(v, leaf, identity.data, kms_id)

        # Signed by the identity's certificate: a refusal from here on, or a call cancelled
        # while its PKE is decrypted (kms.core.steps), is audited with its sender.
        with noting({"sender": identity.data.decode("utf-8", "replace")}):
            check_timestamp(v, deps, now)
            env_key = yield from self._open_envelope(v)

        rand = sender_of(v)[1].value
        rand_i, rand_r = (rand, None) if id_role == IdRole.IDRI else (None, rand)
        # The service admits it (rate limit, replay cache) once it has recorded the
        # authentication, so that those refusals are MACed with env_key like any other.
        return Authenticated(identity, env_key, suite, rand_i, rand_r, kms_id, "pk")

    # --- a peer KMS forwarding a Ticket Resolve (RFC 6043 9) ------------------------------

    def _certificate_peer(self, uris: Sequence[bytes]) -> PeerKms | None:
        """The registered certificate peer KMS that the first CERT's subjectAltName URI
        names; None (the endpoint path) for anything else."""
        for uri in uris:
            peer = self._deps.directory.peer(uri)
            if peer is not None and peer.psk is None and peer.signing_certs_der:
                return peer
        return None

    def _check_pinned(
        self, leaf: x509.Certificate, pinned: Sequence[bytes], now: float, who: str,
        mismatch: str,
    ) -> None:
        """A pinned certificate (a certificate peer's or node's): one of ``pinned``, valid now,
        not revoked, with an RSA key; Invalid Cert otherwise."""
        der = leaf.public_bytes(Encoding.DER)
        if not any(hmac.compare_digest(der, p) for p in pinned):
            raise invalid_cert(mismatch)
        when = dt.datetime.fromtimestamp(now, dt.UTC)
        if not leaf.not_valid_before_utc <= when <= leaf.not_valid_after_utc:
            raise invalid_cert(f"{who} certificate expired or not yet valid")
        issuers = [r for r in self._roots if r.subject == leaf.issuer]
        if leaf.issuer == leaf.subject:
            issuers.insert(0, leaf)  # self-issued: only its own key can sign its CRL
        self._check_revocation(leaf, issuers, now, f"{who} ")
        if not isinstance(leaf.public_key(), rsa.RSAPublicKey):
            raise invalid_cert("certificate key is not RSA")

    def _authenticate_peer_pk(
        self, v: ResolveInitPk, now: float, peer: PeerKms, leaf: x509.Certificate
    ) -> Steps[Authenticated]:
        """RESOLVE_INIT_PK from a certificate peer: pinned certificate, SIGN by the peer over
        RESOLVE_INIT || IDRr || IDRkms, PKE, then the peer's trust (as authenticate_peer)."""
        deps = self._deps
        suite = message_suite(v.msg)
        kms_id = check_kms_identity(v, deps)
        self._check_pinned(
            leaf, peer.signing_certs_der, now, "peer",
            "not the registered signing certificate of this peer KMS",
        )  # fmt: skip
        identity = peer_responder(v)
        try:
            self._verify_signature(v, leaf, identity.data, kms_id)
        except Refusal as refusal:
            raise auth_failure(f"peer {refusal.reason}") from None
        with noting({"sender": identity.data.decode("utf-8", "replace"),
                     "peer": peer.kms_id.decode("utf-8", "replace")}):
            check_timestamp(v, deps, now)
            env_key = yield from self._open_envelope(v)
        check_peer_resolves_for(
            peer, identity.data, f"peer {peer.kms_id.decode('utf-8', 'replace')}"
        )
        check_peer_quota(peer, deps, now)
        rand_r = v.rand_r.value
        # The replay cache (and the Responder's rate limit) follow in the service's admit().
        idr = Idr(IdRole.IDRR, identity.id_type, identity.data)
        return Authenticated(idr, env_key, suite, None, rand_r, kms_id, "peer", peer.kms_id)

    # --- an intermediate node (RFC 6043 11.1, kms.core.nodes) ------------------------------

    def _certificate_node(self, uris: Sequence[bytes]) -> IntermediateNode | None:
        """The registered certificate node that the first CERT's subjectAltName URI names;
        None (the endpoint path) for anything else."""
        nodes = self._deps.nodes
        if nodes is None:
            return None
        for uri in uris:
            node = nodes.node(uri)
            if node is not None and node.psk is None and node.signing_certs_der:
                return node
        return None

    def _authenticate_node_pk(
        self, v: ResolveInitPk, now: float, node: IntermediateNode, leaf: x509.Certificate
    ) -> Steps[Authenticated]:
        """RESOLVE_INIT_PK from a certificate node: its pinned certificate, SIGN over
        RESOLVE_INIT || IDRr (the leg; the node's identity without one) || IDRkms, PKE.
        Refusals are audited with the (registered) node and its role, as for PSK nodes."""
        deps = self._deps
        with noting({"node": node.identity.decode("utf-8", "replace"), "role": node.role}):
            if not deps.policy.intermediate_nodes:
                raise Refusal(
                    ErrorNo.INVALID_ID,
                    Outcome.DENIED,
                    "intermediate nodes are not allowed by this KMS",
                    "[policy] intermediate_nodes = forbidden",
                )
            suite = message_suite(v.msg)
            kms_id = check_kms_identity(v, deps)
            self._check_pinned(
                leaf, node.signing_certs_der, now, "node",
                "not the registered certificate of this node",
            )  # fmt: skip
            signed = v.idr_r.data if v.idr_r is not None else node.identity
            self._verify_signature(v, leaf, signed, kms_id)
            check_timestamp(v, deps, now)
            env_key = yield from self._open_envelope(v)
        idr = Idr(IdRole.IDRR, IdType.URI, node.identity)
        return Authenticated(
            idr, env_key, suite, None, v.rand_r.value, kms_id, "node", node_role=node.role
        )

    # --- steps --------------------------------------------------------------------------

    def _validate_chain(
        self, v: PkInit, now: float, first: x509.Certificate | None
    ) -> x509.Certificate:
        """CERTi / CERTr: own certificate first, each next one certifying the previous
        (RFC 6043 4.2.1.1, 6.7), ending at (or issued by) a CA of the bundle.

        Path validation is cryptography's X.509 verifier with its client (end-entity)
        profile: RFC 5280 chain building, signatures, validity periods at ``now``,
        basicConstraints / pathLen, keyUsage on CAs, name constraints and the CA/B-style
        algorithm floor (RSA >= 2048, no SHA-1 certificate signatures).
        """
        payloads = v.certs
        if not payloads:
            # The KMS does not know certificates out of band, so CERT is required here.
            raise invalid_cert("no certificate in the message")
        if len(payloads) > MAX_CHAIN_CERTS:
            raise invalid_cert(f"more than {MAX_CHAIN_CERTS} certificates")
        certs: list[x509.Certificate] = []
        for i, p in enumerate(payloads):
            if p.cert_type not in _DER_CERT_TYPES:
                raise invalid_cert(f"CERT type {p.cert_type} not supported")
            if i == 0 and first is not None:
                certs.append(first)  # already parsed, once
                continue
            try:
                certs.append(x509.load_der_x509_certificate(p.data))
            except ValueError:
                raise invalid_cert("undecodable certificate") from None
        for child, parent in itertools.pairwise(certs):
            try:
                child.verify_directly_issued_by(parent)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                raise invalid_cert("CERT payloads do not form a chain in order") from None
        if self._store is None:  # pragma: no cover - authenticate() refuses endpoints first
            raise invalid_cert("no CA bundle configured")
        verifier = (
            PolicyBuilder()
            .store(self._store)
            .time(dt.datetime.fromtimestamp(now, dt.UTC))
            .build_client_verifier()
        )
        leaf = certs[0]
        try:
            chain = verifier.verify(leaf, certs[1:]).chain
        except VerificationError as exc:
            raise invalid_cert(f"certificate path not valid: {_one_line(exc)}") from None
        # RFC 5280 6.3: each certificate of the validated path (the trust anchor aside) is
        # checked against its issuer's CRL, verified with that issuer's key.
        for cert, issuer in itertools.pairwise(chain):
            self._check_revocation(cert, [issuer], now, "")
        try:
            key = leaf.public_key()
        except (ValueError, UnsupportedAlgorithm):  # pragma: no cover - verifier parsed it
            raise invalid_cert("unusable public key") from None
        if not isinstance(key, rsa.RSAPublicKey):
            # RFC 3830 T6.5: SIGN is defined for RSA only.
            raise invalid_cert("certificate key is not RSA")
        try:
            usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        if usage is not None and not usage.digital_signature:
            raise invalid_cert("certificate keyUsage does not allow digitalSignature")
        return leaf

    def _check_revocation(
        self, cert: x509.Certificate, issuers: Sequence[x509.Certificate], now: float, who: str
    ) -> None:
        """Refuse a revoked certificate, and fail closed when its issuer's CRL is configured
        but expired or unusable: both Invalid Cert (8), the audit log says which."""
        if self.revocation is None:
            return
        status, why = self.revocation.check(cert, issuers, now)
        if status is Revocation.REVOKED:
            raise invalid_cert(f"{who}certificate revoked ({why})")
        if status is not Revocation.GOOD:
            raise invalid_cert(f"{who}certificate revocation status unknown ({why})")

    def _verify_signature(
        self, v: PkInit, leaf: x509.Certificate, identity: bytes, kms_id: bytes
    ) -> None:
        """SIGNi / SIGNr over the message up to the Signature field || Identity_i/r ||
        Identity_kms (RFC 6043 5.4)."""
        sign = v.sign
        key = leaf.public_key()
        assert isinstance(key, rsa.RSAPublicKey)  # _validate_chain checked it
        algorithm = self.sign_hash.algorithm()
        scheme: padding.AsymmetricPadding
        if sign.sign_type == SignType.RSA_PKCS1_V1_5:
            scheme = padding.PKCS1v15()
        elif sign.sign_type == SignType.RSA_PSS:
            # The salt length is not signalled in MIKEY: accept what the signer chose.
            scheme = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.AUTO)
        else:
            raise auth_failure(f"SIGN S type {sign.sign_type} not supported")
        try:
            data = initial_mac_input(v.msg, identity, kms_id)
            key.verify(sign.signature, data, scheme, algorithm)
        except InvalidSignature:
            raise auth_failure("signature verification failed") from None

    def _envelope_key(self, v: PkInit) -> EnvelopeKey:
        """CHASH names the KMS certificate (hence key) the PKE is encrypted to (RFC 3830
        6.8, docs/rfc-readings.md R5); without CHASH the first envelope key is meant."""
        chash = v.chash
        if chash is None:
            return self._envelope_keys[0]
        for env in self._envelope_keys:
            digest = chash_digest(chash.hash_func, env.cert_der)
            if digest is None:
                raise Refusal(
                    ErrorNo.INVALID_HA,
                    Outcome.UNAUTHENTICATED,
                    "CHASH hash function not supported",
                )
            if hmac.compare_digest(digest, chash.digest):
                return env
        raise auth_failure("CHASH names no envelope key of this KMS")

    def _open_envelope(self, v: PkInit) -> Generator[TokenIo[bytes], object, bytes]:
        """PKE = E(KMS public key, env_key) (RFC 3830 4.2.5, docs/rfc-readings.md R5). The C
        field only allows the receiver to cache env_key; the KMS never does, so any value
        is fine. The RSA decryption is the step yielded to the caller (kms.core.steps): it
        may run it off its event loop. The checks before it are all done by then, so a
        forged or stale message never costs a private-key operation.
        Every failure is the same Auth failure to the sender (docs/rfc-readings.md R5)."""
        env = self._envelope_key(v)
        pke = v.pke
        try:
            env_key = yield from token(
                self._deps.keystore.rsa_decrypt, env.key, pke.data, self.pke_padding
            )
        except InvalidSealedData:
            raise auth_failure("PKE cannot be decrypted") from None
        if len(env_key) < ENV_KEY_MIN_BYTES:
            raise auth_failure("PKE envelope key shorter than 128 bits")
        return env_key


def _first_certificate(v: PkInit) -> x509.Certificate | None:
    """The first CERT (RFC 6043 6.7: the sender's own certificate), parsed once; None when
    it is absent, not DER, or undecodable (the chain check then says why)."""
    first = v.certs[0] if v.certs else None
    if first is None or first.cert_type not in _DER_CERT_TYPES:
        return None
    try:
        return x509.load_der_x509_certificate(first.data)
    except ValueError:
        return None


def _san_uris(cert: x509.Certificate) -> tuple[bytes, ...]:
    """The certificate's subjectAltName URIs; none without (or with a broken) extension."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return ()
    return tuple(u.encode("utf-8") for u in san.get_values_for_type(x509.UniformResourceIdentifier))


def _bind_identity(v: PkInit, role: IdRole, leaf: x509.Certificate) -> Idr:
    """The sender's identity: IDRi / IDRr must be one of the certificate's subjectAltName
    URIs (exact bytes, docs/rfc-readings.md R8); without the IDR, the certificate's single
    URI is the identity (R7)."""
    uris = _san_uris(leaf)
    if not uris:
        raise invalid_cert("certificate has no subjectAltName URI")
    idr = sender_of(v)[0]
    if idr is None:
        if len(uris) != 1:
            raise Refusal(
                ErrorNo.INVALID_ID,
                Outcome.UNAUTHENTICATED,
                "sender identity missing",
                "no IDR and the certificate names several URIs",
            )
        return Idr(role, IdType.URI, uris[0])
    if idr.data not in uris:
        raise auth_failure("the certificate does not certify the sender's IDR")
    return Idr(role, idr.id_type, idr.data)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]
