"""Public-key variants for endpoints: REQUEST_INIT_PK and RESOLVE_INIT_PK (RFC 6043 4.2.1.1,
4.2.3.1, 5.4; RFC 3830 4.2.5; algorithms: docs/rfc-readings.md R5).

    REQUEST_INIT_PK = HDR, T, RANDRi, [IDRi], {CERTi}, [IDRkms], TP, [CHASH], PKE, SIGNi
    RESOLVE_INIT_PK = HDR, T, RANDRr, [IDRr], {CERTr}, [IDRkms], TICKET, [CHASH], PKE, SIGNr

The endpoint holds its certificate chain and an RSA private key (a ``cryptography`` object:
endpoint keys are software keys), picks a fresh envelope key (env_key) per message and
encrypts it to the KMS certificate's public key (PKE); the KMS answers with a REQUEST_RESP /
RESOLVE_RESP protected exactly like a PSK response, with env_key in the PSK's place
(RFC 6043 5.1.2, label type 0x02).

:class:`PkInitiator` and :class:`PkResponder` are the PSK :class:`Initiator` /
:class:`Responder` with the two KMS-facing steps replaced. Every payload a PSK message and a
PK message share (T, RANDR, IDRs, TP or TICKET, and an encrypted desired KEMAC, which the
KMS keys from env_key like it keys it from the PSK) is built by the PSK code run with env_key
as its key; :func:`pk_message` then turns that draft into the PK message (CERTs, CHASH, PKE,
SIGN instead of IDRpsk and V). The draft's V is never sent.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DesiredPolicy, Initiator, PendingRequest, TicketGrant
from kms.endpoint.responder import PendingResolve, ResolvedCall, Responder
from kms.endpoint.session import EndpointError
from kms.keystore import KeyStore, RsaPadding, SignScheme
from kms.mikey.constants import (
    CertType,
    DataType,
    HashFunc,
    IdRole,
    IdType,
    PayloadType,
    SignType,
)
from kms.mikey.coverage import seal
from kms.mikey.message import Message
from kms.mikey.payloads import Cert, Chash, Payload, Pke, Sign, Verification
from kms.mikey.protect import Suite
from kms.mikey.ticket import Idr

ENV_KEY_BYTES = 32  # >= 128 bits (RFC 6043 12.1), <= the 32-byte RANDRs sent (5.1)

_PK_TYPE = {
    DataType.REQUEST_INIT_PSK: DataType.REQUEST_INIT_PK,
    DataType.RESOLVE_INIT_PSK: DataType.RESOLVE_INIT_PK,
}
_SIGN = {
    SignScheme.RSA_PKCS1V15_SHA256: (SignType.RSA_PKCS1_V1_5, hashes.SHA256),
    SignScheme.RSA_PKCS1V15_SHA1: (SignType.RSA_PKCS1_V1_5, hashes.SHA1),
    SignScheme.RSA_PSS_SHA256: (SignType.RSA_PSS, hashes.SHA256),
    SignScheme.RSA_PSS_SHA1: (SignType.RSA_PSS, hashes.SHA1),
}


@dataclass(frozen=True)
class PkCredentials:
    """An endpoint's identity, certificate chain (own certificate first, each next one
    certifying the previous: RFC 6043 6.7) and RSA private key, and the KMS certificate it
    encrypts env_key to (pinned: the KMS's certificate is self-signed).

    ``sign_scheme``: SIGN S type and hash (docs/rfc-readings.md R5: SHA-256 by default,
    SHA-1 where a profile asks). ``pke_padding``: must match the KMS's ``[pk] pke_padding``.
    ``chash``: hash function of the CHASH naming the KMS certificate, or None to omit CHASH.
    ``send_idr``: False omits IDRi / IDRr, so the certificate's URI is the identity
    (docs/rfc-readings.md R7).
    """

    identity: bytes
    cert_chain_der: tuple[bytes, ...] = field(repr=False)
    private_key: rsa.RSAPrivateKey = field(repr=False)
    kms_id: bytes
    kms_cert_der: bytes = field(repr=False)
    id_type: int = IdType.URI
    kms_id_type: int = IdType.URI
    sign_scheme: SignScheme = SignScheme.RSA_PKCS1V15_SHA256
    pke_padding: RsaPadding = RsaPadding.PKCS1V15
    chash: HashFunc | None = HashFunc.SHA_256
    env_key_bytes: int = ENV_KEY_BYTES
    send_idr: bool = True

    def __post_init__(self) -> None:
        if not self.cert_chain_der:
            raise ValueError("the certificate chain is empty")
        if self.sign_scheme not in _SIGN:
            raise ValueError(f"SIGN supports RSA schemes only, not {self.sign_scheme}")
        if self.env_key_bytes < 16:
            raise ValueError("env_key must be at least 128 bits (RFC 6043 12.1)")

    def psk_shaped(self, env_key: bytes) -> Credentials:
        """PSK credentials with env_key in the PSK's place (for the shared payloads)."""
        return Credentials(self.identity, env_key, self.kms_id, self.id_type, self.kms_id_type)


# --- building ----------------------------------------------------------------------------


def encrypt_env_key(creds: PkCredentials, env_key: bytes) -> bytes:
    """PKE Data: RSA encryption of env_key under the KMS certificate's public key
    (RFC 3830 4.2.5; PKCS#1 v1.5 by default, OAEP-SHA1 by configuration: docs/rfc-readings.md
    R5)."""
    public = x509.load_der_x509_certificate(creds.kms_cert_der).public_key()
    if not isinstance(public, rsa.RSAPublicKey):
        raise ValueError("the KMS certificate does not hold an RSA key")
    if creds.pke_padding == RsaPadding.OAEP_SHA1:
        sha1 = hashes.SHA1()  # noqa: S303 - RSAES-OAEP with SHA-1 is what the token offers
        return public.encrypt(env_key, padding.OAEP(padding.MGF1(sha1), sha1, None))
    return public.encrypt(env_key, padding.PKCS1v15())


def kms_cert_hash(creds: PkCredentials) -> Chash | None:
    """CHASH naming the KMS certificate the PKE is encrypted to (RFC 3830 6.8)."""
    if creds.chash is None:
        return None
    if creds.chash == HashFunc.SHA_256:
        return Chash(HashFunc.SHA_256, hashlib.sha256(creds.kms_cert_der).digest())
    if creds.chash == HashFunc.SHA_1:
        digest = hashlib.sha1(creds.kms_cert_der, usedforsecurity=False).digest()
        return Chash(HashFunc.SHA_1, digest)
    raise ValueError(f"CHASH hash function {creds.chash} not supported")


def sign_message(creds: PkCredentials, msg: Message) -> Message:
    """Fill the SIGN payload (the last one, its Signature already of the final length): the
    signature covers the message up to the Signature field || own identity || Identity_kms
    (RFC 6043 5.4)."""
    sign_type, hash_cls = _SIGN[creds.sign_scheme]
    algorithm = hash_cls()
    scheme: padding.AsymmetricPadding = padding.PKCS1v15()
    if sign_type == SignType.RSA_PSS:
        scheme = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.DIGEST_LENGTH)
    key = creds.private_key
    return seal(
        msg,
        lambda data: key.sign(data, scheme, algorithm),
        creds.identity + creds.kms_id,
    )


def pk_message(creds: PkCredentials, draft: Message, env_key: bytes) -> Message:
    """Turn a REQUEST_INIT_PSK / RESOLVE_INIT_PSK draft into REQUEST_INIT_PK /
    RESOLVE_INIT_PK: same HDR fields, T, RANDR, IDRs and TP / TICKET; CERTs before IDRkms;
    then [CHASH], PKE and the SIGN (RFC 6043 4.2.1.1, 4.2.3.1)."""
    data_type = _PK_TYPE.get(DataType(draft.data_type))
    if data_type is None:
        raise ValueError("the draft must be a REQUEST_INIT_PSK or RESOLVE_INIT_PSK")
    own_role = IdRole.IDRI if data_type == DataType.REQUEST_INIT_PK else IdRole.IDRR
    certs = [Cert(CertType.X509V3, der) for der in creds.cert_chain_der]
    body: list[Payload] = []
    for p in draft.payloads:
        if isinstance(p, Verification) or (isinstance(p, Idr) and p.role == IdRole.IDRPSK):
            continue
        if isinstance(p, Idr) and p.role == own_role and not creds.send_idr:
            continue
        if certs and ((isinstance(p, Idr) and p.role == IdRole.IDRKMS) or p.TYPE in _AFTER_CERTS):
            body += certs
            certs = []
        body.append(p)
    chash = kms_cert_hash(creds)
    if chash is not None:
        body.append(chash)
    body.append(Pke(0, encrypt_env_key(creds, env_key)))  # C = 0: no cache (RFC 3830 6.4)
    sign_type, _ = _SIGN[creds.sign_scheme]
    body.append(Sign(sign_type, bytes((creds.private_key.key_size + 7) // 8)))
    header = replace(draft.header, data_type=data_type, v_flag=True)
    return sign_message(creds, Message(header, tuple(body)))


# TP (request) or TICKET (resolve) follows the CERTs when IDRkms is omitted.
_AFTER_CERTS = frozenset({PayloadType.TP, PayloadType.TICKET})


# --- endpoints ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PkPendingRequest(PendingRequest):
    """A REQUEST_INIT_PK in flight, with the env_key that will protect the response."""

    env_key: bytes = field(repr=False)


@dataclass(frozen=True, kw_only=True)
class PkPendingResolve(PendingResolve):
    """A RESOLVE_INIT_PK in flight, with the env_key that will protect the response."""

    env_key: bytes = field(repr=False)


def _placeholder_credentials(creds: PkCredentials) -> Credentials:
    # The PSK-side code reads identity, id types and kms_id from here; the PSK itself is
    # only used by the KMS-facing steps, which the PK classes replace.
    return creds.psk_shaped(b"")


class PkInitiator(Initiator):
    """An Initiator that authenticates its Ticket Request with certificate and signature
    (REQUEST_INIT_PK). Ticket Transfer is unchanged (it uses MPKi, not the PSK)."""

    def __init__(self, creds: PkCredentials, ks: KeyStore, suite: Suite | None = None) -> None:
        super().__init__(_placeholder_credentials(creds), ks, suite)
        self.pk = creds

    def _psk_side(self, env_key: bytes) -> Initiator:
        ini = Initiator(self.pk.psk_shaped(env_key), self.ks, self.suite)
        ini.window_s = self.window_s
        return ini

    def request_ticket(
        self, desired: DesiredPolicy, now: float, csb_id: int | None = None
    ) -> tuple[bytes, PkPendingRequest]:
        """REQUEST_INIT_PK = HDR, T, RANDRi, IDRi, CERTi..., IDRkms, TP, CHASH, PKE, SIGNi."""
        env_key = self.ks.random(self.pk.env_key_bytes)
        _, draft = self._psk_side(env_key).request_ticket(desired, now, csb_id)
        msg = pk_message(self.pk, draft.message, env_key)
        pending = PkPendingRequest(
            message=msg, rand_i=draft.rand_i, supplied_teks=draft.supplied_teks, env_key=env_key
        )
        return msg.wire, pending

    def accept_ticket(self, pending: PendingRequest, data: bytes, now: float) -> TicketGrant:
        """Verify REQUEST_RESP with env_key-derived keys (RFC 6043 4.2.1.6, 5.1.2)."""
        if not isinstance(pending, PkPendingRequest):
            raise EndpointError("not a pending REQUEST_INIT_PK")
        return self._psk_side(pending.env_key).accept_ticket(pending, data, now)


class PkResponder(Responder):
    """A Responder that resolves tickets with RESOLVE_INIT_PK (certificate and signature)."""

    def __init__(self, creds: PkCredentials, ks: KeyStore, suite: Suite | None = None) -> None:
        super().__init__(_placeholder_credentials(creds), ks, suite)
        self.pk = creds

    def _psk_side(self, env_key: bytes) -> Responder:
        res = Responder(self.pk.psk_shaped(env_key), self.ks, self.suite)
        res.window_s = self.window_s
        return res

    def receive_transfer_init(self, data: bytes, now: float) -> tuple[bytes, PkPendingResolve]:
        """Early TRANSFER_INIT checks (RFC 6043 4.2.2.2), then RESOLVE_INIT_PK = HDR, T,
        RANDRr, IDRr, CERTr..., IDRkms, TICKET, CHASH, PKE, SIGNr (4.2.3.1)."""
        env_key = self.ks.random(self.pk.env_key_bytes)
        _, draft = self._psk_side(env_key).receive_transfer_init(data, now)
        msg = pk_message(self.pk, draft.resolve_init, env_key)
        pending = PkPendingResolve(
            transfer_init=draft.transfer_init,
            resolve_init=msg,
            rand_r=draft.rand_r,
            env_key=env_key,
        )
        return msg.wire, pending

    def accept_resolve(self, pending: PendingResolve, data: bytes, now: float) -> ResolvedCall:
        """Verify RESOLVE_RESP with env_key-derived keys, then as the PSK Responder does."""
        if not isinstance(pending, PkPendingResolve):
            raise EndpointError("not a pending RESOLVE_INIT_PK")
        return self._psk_side(pending.env_key).accept_resolve(pending, data, now)
