"""Certificate peers (RFC 6043 9): two `kms serve` domains that know each other by certificate
only, no shared key. B forwards Bob's resolve of A's ticket as a RESOLVE_INIT_PK signed by
B's token-held signing key, env_key encrypted to A's envelope key (RFC 6043 9, 4.2.3.1).

    A (kms:a.example)  Alice       peer B by --cert (B's kms-cert.pem + kms-signing-cert.pem),
                                   may resolve for sip:*@b.example
    B (kms:b.example)  Bob, Eve    peer A by --cert (A's two certificates)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from hsm.software import SoftwareKeyStore
from kms.endpoint.client import KmsClient, KmsRefused, obtain_ticket
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DEFAULT_FLAGS, DesiredPolicy, Initiator, TicketGrant
from kms.endpoint.pk import PkCredentials, PkResponder
from kms.endpoint.responder import Responder
from kms.endpoint.session import CryptoSession
from kms.mikey.constants import DataType, ErrorNo, IdType
from kms.mikey.message import Message
from kms.mikey.payloads import Error
from kms.mikey.ticket import TpFlag
from tests.e2e.harness import check_srtp, free_port, run_kms
from tests.federation.conftest import A_ID, ALICE, B_ID, BOB, PSKS, Domain, _enable_mtls
from tests.federation.pki import TestCa

EVE = b"sip:eve@elsewhere.example"  # a user of B that A does not trust B for
EVE_PSK = bytes.fromhex("e5" * 16)
FORKING = TpFlag.E | TpFlag.F | TpFlag.G | TpFlag.H | TpFlag.I
SESSIONS = (CryptoSession(1, 0xCE470001),)


@dataclass
class Pair:
    a: Domain
    b: Domain
    ca: TestCa
    clients: dict[str, KmsClient]
    ks: SoftwareKeyStore

    def pem(self, d: Domain, name: str) -> bytes:
        return (d.home / name).read_bytes()

    def der(self, d: Domain, name: str) -> bytes:
        cert = x509.load_pem_x509_certificate(self.pem(d, name))
        return cert.public_bytes(serialization.Encoding.DER)


def _enable_pk(home: Path, ca: Path) -> None:
    """[pk] ca_bundle: the issuing KMS accepts RESOLVE_INIT_PK (here from its peer only)."""
    path = home / "kms.toml"
    text, n = re.subn(
        r"^# ca_bundle = .*$", f'ca_bundle = "{ca}"', path.read_text(), flags=re.MULTILINE
    )
    assert n == 1
    path.write_text(text)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    assert shutil.which("softhsm2-util"), "softhsm2-util is required (scripts/setup.sh)"
    root = tmp_path_factory.mktemp("certpeers")
    ca = TestCa(root / "pki")
    a = Domain("A", A_ID, root / "A", free_port(), ca.issue("kms-a"))
    b = Domain("B", B_ID, root / "B", free_port(), ca.issue("kms-b"))
    users = {a.name: {ALICE: PSKS[ALICE]}, b.name: {BOB: PSKS[BOB], EVE: EVE_PSK}}

    def init(d: Domain) -> None:
        run_kms(d.home, "init", "--kms-id", d.kms_id)
        for who, psk in users[d.name].items():
            run_kms(d.home, "endpoint", "add", who.decode(), "--psk-hex", psk.hex())

    with futures.ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(init, d) for d in (a, b)]:
            f.result()
    # Each operator gives the other its two KMS certificates (never a key).
    for me, other, trusted in ((a, b, "sip:*@b.example"), (b, a, "sip:*@a.example")):
        bundle = root / f"{other.name}-kms-certs.pem"
        bundle.write_bytes(
            (other.home / "kms-cert.pem").read_bytes()
            + (other.home / "kms-signing-cert.pem").read_bytes()
        )
        out = run_kms(
            me.home, "peer", "add", other.kms_id, "--address", other.target,
            "--cert", str(bundle), "--ca", str(ca.path), "--resolve-for", trusted,
        ).stdout  # fmt: skip
        assert "not implemented" not in out and "certificate" in out
        _enable_mtls(me.home, me.cert, ca.path)
        if me is b:
            # A runs without [pk] ca_bundle: certificate peers need none (pinned certificates).
            _enable_pk(me.home, ca.path)
    endpoint_cert = ca.issue("endpoints")
    with contextlib.ExitStack() as stack:  # everything started is stopped, even half-way
        for d in (a, b):
            stack.callback(d.kill)
        clients: dict[str, KmsClient] = {}
        for d in (a, b):
            clients[d.name] = KmsClient(
                d.target,
                root_certificates=ca.path,
                certificate_chain=endpoint_cert.cert,
                private_key=endpoint_cert.key,
                timeout=10.0,
            )
            stack.callback(clients[d.name].close)
        with futures.ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(d.start) for d in (a, b)]:
                f.result()
        yield Pair(a, b, ca, clients, SoftwareKeyStore())


def cid() -> str:
    return "cert-" + uuid.uuid4().hex[:16]


def grant_for(
    pair: Pair, to: bytes, flags: TpFlag = DEFAULT_FLAGS
) -> tuple[Initiator, TicketGrant]:
    ini = Initiator(Credentials(ALICE, PSKS[ALICE], A_ID.encode(), IdType.URI), pair.ks)
    return ini, obtain_ticket(pair.clients["A"], ini, DesiredPolicy(responders=(to,), flags=flags))


def error_no(refused: KmsRefused) -> int:
    assert refused.error_message is not None, refused
    return Message.decode(refused.error_message).one(Error).error_no


@pytest.mark.parametrize("flags", [DEFAULT_FLAGS, FORKING], ids=["plain", "forking"])
def test_alice_at_a_calls_bob_at_b_by_certificate(pair: Pair, flags: TpFlag) -> None:
    ini, grant = grant_for(pair, BOB, flags)
    correlation = cid()
    ti, pending = ini.transfer_init(grant, time.time(), BOB, SESSIONS)
    bob = Responder(Credentials(BOB, PSKS[BOB], B_ID.encode(), IdType.URI), pair.ks)
    wire, pr = bob.receive_transfer_init(ti, time.time())
    answer = pair.clients["B"].resolve_ticket(wire, correlation_id=correlation)
    call = bob.accept_resolve(pr, answer, time.time())
    alice = ini.establish(pending, call.transfer_resp, time.time())
    assert call.initiator == ALICE
    assert [k.key_and_salt for k in alice.srtp] == [k.key_and_salt for k in call.srtp]
    check_srtp(alice.srtp[0], call.srtp[0])

    (b_rec,) = pair.b.audit(correlation)
    (a_rec,) = pair.a.audit(correlation)
    assert b_rec["event"] == a_rec["event"] == "ticket.resolved"
    assert b_rec["via_peer"] is True and b_rec["peer"] == A_ID and b_rec["peer_auth"] == "pk"
    assert b_rec["sender"] == BOB.decode() and b_rec["method"] == "psk"
    assert a_rec["method"] == "peer" and a_rec["data_type"] == "RESOLVE_INIT_PK"
    assert a_rec["peer"] == B_ID
    assert a_rec["sender"] == BOB.decode() and a_rec["hops"] == 1
    assert a_rec["forking"] is (flags == FORKING) is b_rec["forking"]


def test_peer_not_trusted_for_the_identity(pair: Pair) -> None:
    """A trusts B (by certificate) only for sip:*@b.example: Eve's resolve through B is
    authenticated by A, then refused, and B passes the refusal on."""
    ini, grant = grant_for(pair, EVE)
    correlation = cid()
    ti, _pending = ini.transfer_init(grant, time.time(), EVE, SESSIONS)
    eve = Responder(Credentials(EVE, EVE_PSK, B_ID.encode(), IdType.URI), pair.ks)
    wire, _pr = eve.receive_transfer_init(ti, time.time())
    with pytest.raises(KmsRefused) as info:
        pair.clients["B"].resolve_ticket(wire, correlation_id=correlation)
    assert info.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert error_no(info.value) == ErrorNo.INVALID_ID
    (a_rec,) = pair.a.audit(correlation)
    assert a_rec["reason"] == f"peer {B_ID} not trusted for {EVE.decode()}"
    (b_rec,) = pair.b.audit(correlation)
    assert b_rec["reason"].startswith("peer refused (PERMISSION_DENIED)")


def _self_signed(uri: str) -> tuple[rsa.RSAPrivateKey, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, uri)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert.public_bytes(serialization.Encoding.DER)


def _as_peer_b(pair: Pair, cert_der: bytes, key: rsa.RSAPrivateKey) -> tuple[str, KmsRefused]:
    """Send A, directly, a RESOLVE_INIT_PK shaped like B's (IDRr Bob, signed over IDRr,
    CHASH/PKE to A's envelope certificate) with the given CERT and signing key."""
    ini, grant = grant_for(pair, BOB)
    ti, _pending = ini.transfer_init(grant, time.time(), BOB, SESSIONS)
    creds = PkCredentials(
        identity=BOB,
        cert_chain_der=(cert_der,),
        private_key=key,
        kms_id=A_ID.encode(),
        kms_cert_der=pair.der(pair.a, "kms-cert.pem"),
    )
    wire, _pr = PkResponder(creds, pair.ks).receive_transfer_init(ti, time.time())
    assert Message.decode(wire).data_type == DataType.RESOLVE_INIT_PK
    correlation = cid()
    with pytest.raises(KmsRefused) as info:
        pair.clients["A"].resolve_ticket(wire, correlation_id=correlation)
    return correlation, info.value


def test_forged_signature_is_refused(pair: Pair) -> None:
    """B's real signing certificate, but a signature by another key: Auth failure."""
    other_key, _ = _self_signed(B_ID)
    correlation, refused = _as_peer_b(pair, pair.der(pair.b, "kms-signing-cert.pem"), other_key)
    assert refused.code is grpc.StatusCode.UNAUTHENTICATED
    assert error_no(refused) == ErrorNo.AUTH_FAILURE
    (a_rec,) = pair.a.audit(correlation)
    assert a_rec["reason"] == "peer signature verification failed"
    assert a_rec["outcome"] != "ok"


def test_unknown_certificate_is_refused(pair: Pair) -> None:
    """A certificate naming kms:b.example that is not the one registered for B (correctly
    self-signed and signing): Invalid Cert."""
    key, der = _self_signed(B_ID)
    correlation, refused = _as_peer_b(pair, der, key)
    assert refused.code is grpc.StatusCode.UNAUTHENTICATED
    assert error_no(refused) == ErrorNo.INVALID_CERT
    (a_rec,) = pair.a.audit(correlation)
    assert a_rec["reason"] == "not the registered signing certificate of this peer KMS"


def test_unregistered_kms_certificate_is_refused(pair: Pair) -> None:
    """A KMS certificate A has no peer entry for goes the endpoint way, and A (no [pk]
    ca_bundle) accepts public-key messages from certificate peers only."""
    key, der = _self_signed("kms:c.example")
    correlation, refused = _as_peer_b(pair, der, key)
    assert refused.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error_no(refused) == ErrorNo.UNSUPPORTED_MESSAGE_TYPE
    (a_rec,) = pair.a.audit(correlation)
    assert a_rec["reason"] == "public-key messages are not enabled on this KMS"
