"""Public-key variants against the real KMS core and a SoftHSM2 token: REQUEST_INIT_PK and
RESOLVE_INIT_PK (RFC 6043 4.2.1.1, 4.2.3.1; reference 5.1, 8, 9, 14.5).

The KMS trusts the test root CA (``[pk] ca_bundle`` in kms.toml); endpoints present
leaf + intermediate. Refusals: a certificate the KMS cannot accept (path invalid: expired,
unknown CA, out of order) is ERR 8 Invalid Cert; everything else that fails authentication
(certificate for another identity, bad SIGN, wrong CHASH, undecryptable PKE) is the opaque
ERR 0 Auth failure, all with outcome UNAUTHENTICATED and no MAC (the sender is unknown).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.serialization import Encoding

from kms.core.api import KmsReply, Outcome
from kms.core.pk import CertificateAuthenticator, EnvelopeKey, SignHash
from kms.endpoint.initiator import DEFAULT_FLAGS, DesiredPolicy, Initiator
from kms.endpoint.pk import (
    PkCredentials,
    PkInitiator,
    PkPendingResolve,
    PkResponder,
    pk_message,
    sign_message,
)
from kms.endpoint.session import CryptoSession
from kms.keystore import KeyRef, KeyStore, RsaPadding, SignScheme
from kms.mikey.compose import compose
from kms.mikey.constants import DataType, ErrorNo, HashFunc, IdRole, KeyDataType
from kms.mikey.derive import KeyDirection
from kms.mikey.message import Message
from kms.mikey.payloads import Cert, Chash, Error, KeyData, KvSpi, Payload, Pke, Sign, Verification
from kms.mikey.protect import SUITE_128, check_mac, message_keys
from kms.mikey.ticket import Idr, TpFlag
from kms.mikey.views import ResolveInitPk, ResolveResp
from kms.server.compose import build_handler
from kms.server.config import load_config
from kms.server.home import CERT_FILE, ENVELOPE_LABEL, SIGNING_CERT_FILE, HomeError
from tests.core.pki import Pki, der, make_pki, pem, rsa_key
from tests.core.world import ALICE, BOB, CAROL, KMS_ID, TEAM, World, make_world

FORKING = TpFlag.E | TpFlag.F | TpFlag.G | TpFlag.H | TpFlag.I
MALLORY = b"sip:mallory@example.org"
CA_BUNDLE = "endpoint-ca.pem"


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki(dt.datetime.now(dt.UTC).replace(microsecond=0))


class CountingKeyStore:
    """Delegates to the token, counting rsa_decrypt calls (reference 14.5: the KMS must not
    touch the PKE before the signature has verified)."""

    def __init__(self, inner: KeyStore) -> None:
        self.inner = inner
        self.rsa_decrypts = 0

    def rsa_decrypt(self, key: KeyRef, data: bytes, pad: RsaPadding) -> bytes:
        self.rsa_decrypts += 1
        return self.inner.rsa_decrypt(key, data, pad)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclass
class PkWorld:
    world: World
    pki: Pki
    kms_cert_der: bytes
    counting: CountingKeyStore

    @property
    def now(self) -> float:
        return self.world.now

    def creds(self, who: bytes = ALICE, **kw: Any) -> PkCredentials:
        key, chain = self.pki.chain(who)
        return replace(PkCredentials(who, chain, key, KMS_ID, self.kms_cert_der), **kw)

    def initiator(self, creds: PkCredentials | None = None) -> PkInitiator:
        return PkInitiator(creds or self.creds(), self.world.sw)

    def request(self, wire: bytes) -> KmsReply:
        return self.world.request(ALICE, wire)


def enable_pk(world: World, pki: Pki, padding: str = "pkcs1v15") -> PkWorld:
    """Write the CA bundle into the home, switch ``[pk]`` on in kms.toml, rebuild the KMS
    with the composition root (which builds the CertificateAuthenticator from the home)."""
    home = world.home
    (home.path / CA_BUNDLE).write_bytes(pem(pki.root.cert))
    toml = home.path / "kms.toml"
    text = toml.read_text()
    text = text.replace("# ca_bundle = ", "ca_bundle = ", 1)
    text = text.replace('pke_padding = "pkcs1v15"', f'pke_padding = "{padding}"')
    toml.write_text(text)
    home.config = load_config(home.path)
    assert home.config.pk.ca_bundle == home.path / CA_BUNDLE
    world.kms = build_handler(home)
    counting = CountingKeyStore(world.kms.deps.keystore)  # type: ignore[attr-defined]
    world.kms.deps.keystore = counting  # type: ignore[attr-defined]
    kms_cert = x509.load_pem_x509_certificate((home.path / CERT_FILE).read_bytes())
    return PkWorld(world, pki, kms_cert.public_bytes(Encoding.DER), counting)


@pytest.fixture
def pk_world(tmp_path: Path, pki: Pki) -> Iterator[PkWorld]:
    for world in make_world(tmp_path / "home"):
        yield enable_pk(world, pki)


@pytest.fixture
def oaep_world(tmp_path: Path, pki: Pki) -> Iterator[PkWorld]:
    for world in make_world(tmp_path / "home"):
        yield enable_pk(world, pki, "oaep-sha1")


def error_of(reply: KmsReply) -> Message:
    assert reply.error_message is not None
    return Message.decode(reply.error_message)


def assert_refused(reply: KmsReply, error_no: ErrorNo, outcome: Outcome) -> Message:
    assert reply.outcome is outcome, reply.audit
    err = error_of(reply)
    assert [e.error_no for e in err.all(Error)] == [error_no]
    return err


def assert_auth_failure(reply: KmsReply) -> None:
    """The one opaque answer to every authentication failure: ERR 0, no MAC, same detail."""
    err = assert_refused(reply, ErrorNo.AUTH_FAILURE, Outcome.UNAUTHENTICATED)
    assert err.first(Verification) is None
    assert reply.detail == "authentication failed"


def resign(creds: PkCredentials, wire: bytes, change: Callable[[Payload], Payload]) -> bytes:
    """Change payloads of a PK message and sign it again (a validly signed bad message)."""
    msg = Message.decode(wire)
    return sign_message(creds, replace(msg, payloads=tuple(change(p) for p in msg.payloads))).wire


# --- success -----------------------------------------------------------------------------


def test_pk_request_then_psk_resolve_gives_both_ends_the_same_keys(pk_world: PkWorld) -> None:
    ini = pk_world.initiator()
    wire, pending = ini.request_ticket(DesiredPolicy(responders=(BOB,)), pk_world.now)
    msg = Message.decode(wire)
    compose(msg)
    assert msg.data_type == DataType.REQUEST_INIT_PK and msg.header.v_flag
    # HDR, T, RANDRi, IDRi, CERTi (leaf, intermediate), IDRkms, TP, CHASH, PKE, SIGNi
    assert [p.NAME for p in msg.payloads] == [
        "T", "RANDR", "IDR", "CERT", "CERT", "IDR", "TP", "CHASH", "PKE", "SIGN",
    ]  # fmt: skip
    assert msg.one(Pke).cache == 0
    reply = pk_world.request(wire)
    assert reply.ok, reply.audit
    assert reply.audit["method"] == "pk"
    grant = ini.accept_ticket(pending, reply.data, pk_world.now)
    assert [k.key_type for k in grant.session_keys] == [KeyDataType.TGK]
    # The ticket names the certified identity as Initiator; Bob resolves it with his PSK.
    keys_a, call, _ = pk_world.world.call(grant, BOB)
    assert [k.key_and_salt for k in keys_a] == [k.key_and_salt for k in call.srtp]
    assert call.initiator == ALICE
    assert pk_world.counting.rsa_decrypts == 1


@pytest.mark.parametrize("flags", [DEFAULT_FLAGS, FORKING], ids=["plain", "forking"])
def test_pk_request_and_pk_resolve(pk_world: PkWorld, flags: TpFlag) -> None:
    responder = TEAM if flags & TpFlag.I else BOB
    ini = pk_world.initiator()
    wire, pending = ini.request_ticket(
        DesiredPolicy(responders=(responder,), flags=flags), pk_world.now
    )
    reply = pk_world.request(wire)
    assert reply.ok, reply.audit
    grant = ini.accept_ticket(pending, reply.data, pk_world.now)

    sessions = (CryptoSession(1, 0x0A0B0C0D),)
    ti, pt = ini.transfer_init(grant, pk_world.now, responder, sessions)
    res = PkResponder(pk_world.creds(BOB), pk_world.world.sw)
    ri, pr = res.receive_transfer_init(ti, pk_world.now)
    resolve = Message.decode(ri)
    compose(resolve)
    assert resolve.data_type == DataType.RESOLVE_INIT_PK
    reply = pk_world.world.resolve(ri)
    assert reply.ok, reply.audit
    call = res.accept_resolve(pr, reply.data, pk_world.now)
    assert call.transfer_resp is not None
    keys_a = ini.accept_transfer_resp(pt, call.transfer_resp, pk_world.now)
    assert [k.key_and_salt for k in keys_a] == [k.key_and_salt for k in call.srtp]
    if flags & TpFlag.I:
        # Forking binds the keys to the certified identity (RFC 6043 5.1.1).
        resp = compose(Message.decode(reply.data))
        assert isinstance(resp, ResolveResp) and resp.idr_r is not None
        assert resp.idr_r.data == BOB
        assert call.session_keys[0].key != grant.session_keys[0].key


def test_psk_request_then_pk_resolve_without_idr(pk_world: PkWorld) -> None:
    """Without IDRr the certificate's URI is the identity (reference 14.7)."""
    grant = pk_world.world.grant(DesiredPolicy(responders=(BOB,)))
    ini = pk_world.world.initiator()
    ti, pt = ini.transfer_init(grant, pk_world.now, BOB, (CryptoSession(1, 7),))
    res = PkResponder(pk_world.creds(BOB, send_idr=False, chash=None), pk_world.world.sw)
    ri, pr = res.receive_transfer_init(ti, pk_world.now)
    view = compose(Message.decode(ri))
    assert isinstance(view, ResolveInitPk)
    assert view.idr_r is None and view.chash is None
    reply = pk_world.world.resolve(ri)
    assert reply.ok, reply.audit
    call = res.accept_resolve(pr, reply.data, pk_world.now)
    assert call.transfer_resp is not None
    keys_a = ini.accept_transfer_resp(pt, call.transfer_resp, pk_world.now)
    assert keys_a[0].key_and_salt == call.srtp[0].key_and_salt


@pytest.mark.parametrize(
    "scheme",
    [SignScheme.RSA_PSS_SHA256, SignScheme.RSA_PKCS1V15_SHA256],
    ids=["pss", "pkcs1v15"],
)
def test_sign_types_and_sha1_chash(pk_world: PkWorld, scheme: SignScheme) -> None:
    """S type 1 (PSS) and 0 (PKCS#1 v1.5); CHASH with SHA-1 still names the KMS cert."""
    ini = pk_world.initiator(pk_world.creds(sign_scheme=scheme, chash=HashFunc.SHA_1))
    wire, pending = ini.request_ticket(DesiredPolicy(responders=(BOB,)), pk_world.now)
    reply = pk_world.request(wire)
    assert reply.ok, reply.audit
    ini.accept_ticket(pending, reply.data, pk_world.now)


def test_sha1_signatures_only_where_selected(pk_world: PkWorld) -> None:
    """SHA-256 by default (reference 14.5); SHA-1 by the constructor's ``sign_hash``."""
    creds = pk_world.creds(sign_scheme=SignScheme.RSA_PKCS1V15_SHA1)
    wire, _ = pk_world.initiator(creds).request_ticket(
        DesiredPolicy(responders=(BOB,)), pk_world.now
    )
    assert_auth_failure(pk_world.request(wire))
    kms = pk_world.world.kms
    kms.deps.pk = CertificateAuthenticator(  # type: ignore[attr-defined]
        kms.deps,  # type: ignore[attr-defined]
        [pk_world.pki.root.cert],
        [EnvelopeKey(KeyRef(ENVELOPE_LABEL), pk_world.kms_cert_der)],
        sign_hash=SignHash.SHA1,
    )
    ini = pk_world.initiator(creds)
    wire, pending = ini.request_ticket(DesiredPolicy(responders=(BOB,)), pk_world.now)
    reply = pk_world.request(wire)
    assert reply.ok, reply.audit
    ini.accept_ticket(pending, reply.data, pk_world.now)


def test_oaep_configured(oaep_world: PkWorld) -> None:
    ini = oaep_world.initiator(oaep_world.creds(pke_padding=RsaPadding.OAEP_SHA1))
    wire, pending = ini.request_ticket(DesiredPolicy(responders=(BOB,)), oaep_world.now)
    reply = oaep_world.request(wire)
    assert reply.ok, reply.audit
    grant = ini.accept_ticket(pending, reply.data, oaep_world.now)
    keys_a, call, _ = oaep_world.world.call(grant, BOB)
    assert keys_a[0].key_and_salt == call.srtp[0].key_and_salt
    # A v1.5 PKE is refused by an OAEP KMS, opaquely.
    wire, _ = oaep_world.initiator().request_ticket(
        DesiredPolicy(responders=(BOB,)), oaep_world.now
    )
    assert_auth_failure(oaep_world.request(wire))


def test_supplied_teks_travel_under_env_key(pk_world: PkWorld) -> None:
    """A desired KEMAC with Initiator-supplied TEKs is keyed from env_key (0x01 label), as
    the KMS keys it from the response key (Appendix B.2 reading of request.py)."""
    tek = KeyData(KeyDataType.TEK_SALT, secrets.token_bytes(16), bytes(14), KvSpi(b"\x00\x01"))
    ini = pk_world.initiator()
    desired = DesiredPolicy(responders=(BOB,), supplied_teks=(tek,))
    wire, pending = ini.request_ticket(desired, pk_world.now)
    reply = pk_world.request(wire)
    assert reply.ok, reply.audit
    grant = ini.accept_ticket(pending, reply.data, pk_world.now)
    _, call, _ = pk_world.world.call(grant, BOB)
    assert call.session_keys[0].key == tek.key


# --- refusals: certificates ----------------------------------------------------------------


def _request_with(pk_world: PkWorld, creds: PkCredentials) -> KmsReply:
    wire, _ = pk_world.initiator(creds).request_ticket(
        DesiredPolicy(responders=(BOB,)), pk_world.now
    )
    return pk_world.request(wire)


def test_certificate_for_another_identity_is_an_auth_failure(pk_world: PkWorld) -> None:
    """A valid certificate for Mallory cannot speak for Alice: ERR 0, like a PSK whose owner
    differs from the IDR (the certificate is fine; the claim is not)."""
    key, chain = pk_world.pki.chain(MALLORY)
    creds = PkCredentials(ALICE, chain, key, KMS_ID, pk_world.kms_cert_der)
    reply = _request_with(pk_world, creds)
    assert_auth_failure(reply)
    assert reply.audit["reason"] == "the certificate does not certify the sender's IDR"
    assert pk_world.counting.rsa_decrypts == 0


def test_expired_certificate(pk_world: PkWorld) -> None:
    p = pk_world.pki
    key = rsa_key(ALICE.decode())
    old = p.intermediate.endpoint(
        ALICE, key, p.now, start=p.now - dt.timedelta(days=400), end=p.now - dt.timedelta(days=1)
    )
    creds = pk_world.creds(cert_chain_der=(der(old), der(p.intermediate.cert)))
    reply = _request_with(pk_world, creds)
    err = assert_refused(reply, ErrorNo.INVALID_CERT, Outcome.UNAUTHENTICATED)
    assert err.first(Verification) is None
    assert "not valid at validation time" in str(reply.audit["reason"])
    assert pk_world.counting.rsa_decrypts == 0


def test_certificate_from_another_ca(pk_world: PkWorld) -> None:
    p = pk_world.pki
    key = rsa_key(ALICE.decode())
    foreign = p.other.endpoint(ALICE, key, p.now)
    creds = pk_world.creds(cert_chain_der=(der(foreign), der(p.other.cert)))
    assert_refused(_request_with(pk_world, creds), ErrorNo.INVALID_CERT, Outcome.UNAUTHENTICATED)
    assert pk_world.counting.rsa_decrypts == 0


@pytest.mark.parametrize("shape", ["reversed", "leaf-only", "none"])
def test_chain_must_be_complete_and_in_order(pk_world: PkWorld, shape: str) -> None:
    leaf, inter = pk_world.pki.chain(ALICE)[1]
    chain = {"reversed": (inter, leaf), "leaf-only": (leaf,), "none": (leaf,)}[shape]
    creds = pk_world.creds(cert_chain_der=chain)
    wire, _ = pk_world.initiator(creds).request_ticket(
        DesiredPolicy(responders=(BOB,)), pk_world.now
    )
    if shape == "none":  # {CERTi} may be empty on the wire; this KMS needs the chain
        msg = Message.decode(wire)
        stripped = replace(msg, payloads=tuple(p for p in msg.payloads if not isinstance(p, Cert)))
        wire = sign_message(creds, stripped).wire
    reply = pk_world.request(wire)
    assert_refused(reply, ErrorNo.INVALID_CERT, Outcome.UNAUTHENTICATED)


# --- refusals: SIGN, CHASH, PKE ------------------------------------------------------------


def test_bad_signature_never_reaches_the_token(pk_world: PkWorld) -> None:
    wire, _ = pk_world.initiator().request_ticket(DesiredPolicy(responders=(BOB,)), pk_world.now)
    flipped = bytearray(wire)
    flipped[-7] ^= 0x01  # inside the Signature
    reply = pk_world.request(bytes(flipped))
    assert_auth_failure(reply)
    assert reply.audit["reason"] == "signature verification failed"
    assert pk_world.counting.rsa_decrypts == 0
    # A signature over other identities (here: another KMS id) fails the same way.
    creds = replace(pk_world.creds(), kms_id=b"sip:other-kms.example.org")
    msg = Message.decode(wire)
    payloads = tuple(
        p for p in msg.payloads if not (isinstance(p, Idr) and p.role == IdRole.IDRKMS)
    )
    assert_auth_failure(pk_world.request(sign_message(creds, replace(msg, payloads=payloads)).wire))
    assert pk_world.counting.rsa_decrypts == 0


def _garbage_pke(creds: PkCredentials, kms_cert_der: bytes) -> list[bytes]:
    public = x509.load_der_x509_certificate(kms_cert_der).public_key()
    return [
        secrets.token_bytes(256),  # random: almost surely bad padding
        b"\x00" * 16,  # wrong length for the modulus
        public.encrypt(b"short", padding.PKCS1v15()),  # type: ignore[union-attr]  # < 128 bits
        public.encrypt(  # type: ignore[union-attr]  # OAEP to a v1.5 KMS
            secrets.token_bytes(32), padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
        ),
    ]


def test_every_pke_failure_looks_the_same(pk_world: PkWorld) -> None:
    creds = pk_world.creds()
    ini = pk_world.initiator(creds)
    replies = []
    for data in _garbage_pke(creds, pk_world.kms_cert_der):
        wire, _ = ini.request_ticket(DesiredPolicy(responders=(BOB,)), pk_world.now)
        bad = resign(creds, wire, lambda p, d=data: Pke(0, d) if isinstance(p, Pke) else p)  # type: ignore[misc]
        replies.append(pk_world.request(bad))
    for reply in replies:
        assert_auth_failure(reply)
    # Only the audit log tells them apart; the peer sees identical refusals.
    assert {(r.outcome, r.detail, error_of(r).one(Error).error_no) for r in replies} == {
        (Outcome.UNAUTHENTICATED, "authentication failed", ErrorNo.AUTH_FAILURE)
    }
    assert pk_world.counting.rsa_decrypts == len(replies)


def test_chash_not_matching_is_refused_before_decryption(pk_world: PkWorld) -> None:
    creds = pk_world.creds()
    wire, _ = pk_world.initiator(creds).request_ticket(
        DesiredPolicy(responders=(BOB,)), pk_world.now
    )
    signing_cert = x509.load_pem_x509_certificate(
        (pk_world.world.home.path / SIGNING_CERT_FILE).read_bytes()
    )
    other = Chash(HashFunc.SHA_256, x509_hash(signing_cert))
    bad = resign(creds, wire, lambda p: other if isinstance(p, Chash) else p)
    assert_auth_failure(pk_world.request(bad))
    md5 = resign(
        creds, wire, lambda p: Chash(HashFunc.MD5, bytes(16)) if isinstance(p, Chash) else p
    )
    assert_refused(pk_world.request(md5), ErrorNo.INVALID_HA, Outcome.UNAUTHENTICATED)
    assert pk_world.counting.rsa_decrypts == 0


def x509_hash(cert: x509.Certificate) -> bytes:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()


# --- after authentication -------------------------------------------------------------------


def test_stale_timestamp_and_replay(pk_world: PkWorld) -> None:
    ini = pk_world.initiator()
    stale, _ = ini.request_ticket(DesiredPolicy(responders=(BOB,)), pk_world.now - 3600)
    assert_refused(pk_world.request(stale), ErrorNo.INVALID_TS, Outcome.PRECONDITION)
    assert pk_world.counting.rsa_decrypts == 0  # authentic but stale: token untouched
    wire, _ = ini.request_ticket(DesiredPolicy(responders=(BOB,)), pk_world.now)
    assert pk_world.request(wire).ok
    replayed = assert_refused(pk_world.request(wire), ErrorNo.INVALID_TS, Outcome.PRECONDITION)
    # The replay is authentic (signature, PKE): its refusal is MACed like a response would be.
    assert replayed.first(Verification) is not None
    assert pk_world.world.audit()[-1]["sender"] == ALICE.decode()


def test_refusal_after_authentication_is_maced_with_env_key(pk_world: PkWorld) -> None:
    """Carol may not resolve Bob's ticket: DENIED, and the error's V is keyed from the
    env_key of her RESOLVE_INIT_PK (reference 8: same key as the response)."""
    grant = pk_world.world.grant(DesiredPolicy(responders=(BOB,)))
    ti, _ = pk_world.world.initiator().transfer_init(
        grant, pk_world.now, BOB, (CryptoSession(1, 9),)
    )
    res = PkResponder(pk_world.creds(CAROL), pk_world.world.sw)
    ri, pr = res.receive_transfer_init(ti, pk_world.now)
    assert isinstance(pr, PkPendingResolve)
    reply = pk_world.world.resolve(ri)
    err = assert_refused(reply, ErrorNo.INVALID_ID, Outcome.DENIED)
    sw, env_key = pk_world.world.sw, pr.env_key
    keys = message_keys(
        sw, env_key, pr.resolve_init, KeyDirection.RESPONSE, None, pr.rand_r, SUITE_128
    )
    assert check_mac(err, keys, SUITE_128, b"")


def test_pk_messages_refused_when_pk_is_not_configured(world: World, pki: Pki) -> None:
    key, chain = pki.chain(ALICE)
    kms_cert = x509.load_pem_x509_certificate((world.home.path / CERT_FILE).read_bytes())
    creds = PkCredentials(ALICE, chain, key, KMS_ID, kms_cert.public_bytes(Encoding.DER))
    wire, _ = PkInitiator(creds, world.sw).request_ticket(
        DesiredPolicy(responders=(BOB,)), world.now
    )
    reply = world.request(ALICE, wire)
    assert_refused(reply, ErrorNo.UNSUPPORTED_MESSAGE_TYPE, Outcome.MALFORMED)


def test_mismatched_kms_certificate_stops_the_composition_root(world: World, pki: Pki) -> None:
    """kms-cert.pem must certify the envelope key in the token, else every PKE would fail."""
    home = world.home
    (home.path / CERT_FILE).write_bytes((home.path / SIGNING_CERT_FILE).read_bytes())
    with pytest.raises(HomeError, match="does not match its key"):
        enable_pk(world, pki)


def test_pk_message_builder_needs_a_psk_draft(pk_world: PkWorld) -> None:
    msg = Message.decode(
        Initiator(pk_world.world.creds(ALICE), pk_world.world.sw).request_ticket(
            DesiredPolicy(responders=(BOB,)), pk_world.now
        )[0]
    )
    built = pk_message(pk_world.creds(), msg, secrets.token_bytes(32))
    assert built.data_type == DataType.REQUEST_INIT_PK
    assert isinstance(built.payloads[-1], Sign)
    with pytest.raises(ValueError, match="REQUEST_INIT_PSK"):
        pk_message(pk_world.creds(), built, secrets.token_bytes(32))
