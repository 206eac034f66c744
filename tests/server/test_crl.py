"""Certificate revocation (``[pk] crl``) for PK endpoints and certificate peers, against the
real KMS core, a SoftHSM2 token and CRLs made here with ``cryptography``: a revoked leaf or
intermediate is refused with Invalid Cert (8) before the token is touched, a CRL is re-read
when its file changes, an expired or unverifiable CRL fails closed, and a certificate peer
is checked like an endpoint."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from kms.core.api import KmsReply, Outcome
from kms.endpoint.initiator import DEFAULT_FLAGS, DesiredPolicy, TicketGrant
from kms.endpoint.pk import PkCredentials, PkResponder
from kms.endpoint.session import CryptoSession
from kms.home import HomeError
from kms.mikey.constants import ErrorNo
from kms.mikey.message import Message
from kms.mikey.payloads import Error
from kms.mikey.ticket import TpFlag
from kms.server.compose import build_handler
from kms.server.config import load_config, parse_config
from kms.server.crl import CrlError, CrlStore
from tests.pki import Ca, Pki, der, rsa_key
from tests.server.test_pk import PkWorld, enable_pk, pki  # noqa: F401 - the pki fixture
from tests.server.world import ALICE, BOB, KMS_ID, World, make_world

HOUR = dt.timedelta(hours=1)
PEER_ID = "kms:b.example"
BOB_B = b"sip:bob@b.example"


def make_crl(
    ca: Ca,
    revoked: Sequence[x509.Certificate] = (),
    *,
    now: dt.datetime,
    next_update: dt.timedelta = 24 * HOUR,
    issuer: x509.Name | None = None,
    key: rsa.RSAPrivateKey | None = None,
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer or ca.cert.subject)
        .last_update(now - HOUR)
        .next_update(now + next_update)
    )
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(now - HOUR)
            .build()
        )
    return builder.sign(key or ca.key, hashes.SHA256())


def pem_of(*crls: x509.CertificateRevocationList) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls)


def write(path: Path, data: bytes) -> None:
    """Replace a file the way an operator's tooling does (new inode: a change for sure)."""
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def configure_crl(world: World, crl_path: Path) -> None:
    toml = world.home.path / "kms.toml"
    text = toml.read_text()
    assert '# crl = "crls"' in text
    toml.write_text(text.replace('# crl = "crls"', f'crl = "{crl_path}"'))
    world.home.config = load_config(world.home.path)


@pytest.fixture
def crl_world(tmp_path: Path, pki: Pki) -> Iterator[tuple[PkWorld, Path]]:  # noqa: F811
    """PK enabled, ``[pk] crl`` a single PEM file holding the CAs' (empty) CRLs."""
    for world in make_world(tmp_path / "home"):
        crl_file = tmp_path / "ca.crl.pem"
        write(
            crl_file,
            pem_of(make_crl(pki.root, now=pki.now), make_crl(pki.intermediate, now=pki.now)),
        )
        configure_crl(world, crl_file)
        yield enable_pk(world, pki), crl_file


def alice_creds(pw: PkWorld, leaf: x509.Certificate) -> PkCredentials:
    return pw.creds(cert_chain_der=(der(leaf), der(pw.pki.intermediate.cert)))


def request(pw: PkWorld, creds: PkCredentials) -> KmsReply:
    wire, _ = pw.initiator(creds).request_ticket(DesiredPolicy((BOB,), lifetime_s=600), pw.now)
    return pw.request(wire)


def assert_invalid_cert(reply: KmsReply, reason: str) -> None:
    assert reply.outcome is Outcome.UNAUTHENTICATED, reply.audit
    assert reply.error_message is not None
    assert Message.decode(reply.error_message).one(Error).error_no == ErrorNo.INVALID_CERT
    assert reply.detail == "certificate not accepted"
    assert reason in str(reply.audit["reason"]), reply.audit["reason"]


def new_leaf(p: Pki, who: bytes = ALICE) -> x509.Certificate:
    return p.intermediate.endpoint(who, rsa_key(who.decode()), p.now)


# --- endpoints -------------------------------------------------------------------------


def test_revoked_leaf_is_refused_and_others_pass(crl_world: tuple[PkWorld, Path]) -> None:
    pw, crl_file = crl_world
    p = pw.pki
    revoked, fine = new_leaf(p), new_leaf(p)
    write(
        crl_file,
        pem_of(make_crl(p.root, now=p.now), make_crl(p.intermediate, [revoked], now=p.now)),
    )
    reply = request(pw, alice_creds(pw, revoked))
    assert_invalid_cert(reply, f"certificate revoked (certificate serial {revoked.serial_number:x}")
    assert pw.counting.rsa_decrypts == 0  # refused before the token was touched
    record = pw.world.audit()[-1]
    assert record["event"] == "refused" and record["error_no"] == ErrorNo.INVALID_CERT
    assert request(pw, alice_creds(pw, fine)).ok


def test_revoked_intermediate_is_refused(crl_world: tuple[PkWorld, Path]) -> None:
    pw, crl_file = crl_world
    p = pw.pki
    write(crl_file, pem_of(make_crl(p.root, [p.intermediate.cert], now=p.now)))
    assert_invalid_cert(request(pw, alice_creds(pw, new_leaf(p))), "certificate revoked")


def test_crl_change_takes_effect_without_restart(crl_world: tuple[PkWorld, Path]) -> None:
    pw, crl_file = crl_world
    p = pw.pki
    leaf = new_leaf(p)
    assert request(pw, alice_creds(pw, leaf)).ok
    write(crl_file, pem_of(make_crl(p.intermediate, [leaf], now=p.now)))
    assert_invalid_cert(request(pw, alice_creds(pw, leaf)), "certificate revoked")
    write(crl_file, pem_of(make_crl(p.intermediate, now=p.now)))  # un-revoked (hold lifted)
    assert request(pw, alice_creds(pw, leaf)).ok


def test_crl_folder_picks_up_new_files(tmp_path: Path, pki: Pki) -> None:  # noqa: F811
    for world in make_world(tmp_path / "home"):
        folder = tmp_path / "crls"
        folder.mkdir()
        write(
            folder / "root.crl",
            make_crl(pki.root, now=pki.now).public_bytes(serialization.Encoding.DER),
        )
        configure_crl(world, folder)
        pw = enable_pk(world, pki)
        leaf = new_leaf(pki)
        assert request(pw, alice_creds(pw, leaf)).ok
        write(folder / "endpoint-ca.pem", pem_of(make_crl(pki.intermediate, [leaf], now=pki.now)))
        assert_invalid_cert(request(pw, alice_creds(pw, leaf)), "certificate revoked")
        (folder / "endpoint-ca.pem").unlink()
        assert request(pw, alice_creds(pw, leaf)).ok


def test_expired_crl_fails_closed(crl_world: tuple[PkWorld, Path]) -> None:
    pw, crl_file = crl_world
    p = pw.pki
    write(crl_file, pem_of(make_crl(p.intermediate, now=p.now, next_update=-0.5 * HOUR)))
    assert_invalid_cert(
        request(pw, alice_creds(pw, new_leaf(p))), "revocation status unknown (CRL expired"
    )
    # A newer CRL next to the expired one is what counts.
    write(
        crl_file,
        pem_of(
            make_crl(p.intermediate, now=p.now - 48 * HOUR, next_update=24 * HOUR),
            make_crl(p.intermediate, now=p.now),
        ),
    )
    assert request(pw, alice_creds(pw, new_leaf(p))).ok


def test_crl_not_signed_by_the_issuer_fails_closed(crl_world: tuple[PkWorld, Path]) -> None:
    pw, crl_file = crl_world
    p = pw.pki
    forged = make_crl(p.intermediate, now=p.now, key=p.other.key)  # right name, wrong key
    write(crl_file, pem_of(forged))
    assert_invalid_cert(request(pw, alice_creds(pw, new_leaf(p))), "does not verify")


def test_unparsable_crl_fails_closed_until_fixed(crl_world: tuple[PkWorld, Path]) -> None:
    pw, crl_file = crl_world
    p = pw.pki
    good = pem_of(make_crl(p.intermediate, now=p.now))
    write(crl_file, good[: len(good) // 2])  # a truncated download
    assert_invalid_cert(request(pw, alice_creds(pw, new_leaf(p))), "CRLs unusable")
    write(crl_file, good)
    assert request(pw, alice_creds(pw, new_leaf(p))).ok


def test_issuer_without_crl_is_not_checked(tmp_path: Path, pki: Pki) -> None:  # noqa: F811
    # Only the root's CRL is configured: the intermediate's certificates are not checked.
    store_path = tmp_path / "root.pem"
    write(store_path, pem_of(make_crl(pki.root, now=pki.now)))
    store = CrlStore(store_path)
    leaf = new_leaf(pki)
    status, why = store.check(leaf, [pki.intermediate.cert], pki.now.timestamp())
    assert (status.value, why) == ("good", "no CRL for the issuer")


def test_unusable_crl_configuration_stops_the_composition_root(
    tmp_path: Path,
    pki: Pki,  # noqa: F811
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CrlError, match="no CRL file"):
        CrlStore(empty)
    for world in make_world(tmp_path / "home"):
        configure_crl(world, tmp_path / "missing.pem")
        with pytest.raises(HomeError, match=r"\[pk\] cannot be enabled: .*missing.pem"):
            enable_pk(world, pki)


# --- certificate peers ----------------------------------------------------------------------


def _peer_cert(now: dt.datetime) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """A peer KMS's self-signed signing certificate (as `kms init` makes them)."""
    key = rsa_key(PEER_ID)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, PEER_ID)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - HOUR)
        .not_valid_after(now + 240 * HOUR)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(PEER_ID)]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


class PeerWorld:
    """This KMS (the issuer) with certificate peer kms:b.example trusted for *@b.example."""

    def __init__(
        self,
        world: World,
        pki: Pki,  # noqa: F811
        crl_file: Path | None,
        rate_limit: float = 0.0,
    ) -> None:
        self.world = world
        self.key, self.cert = _peer_cert(pki.now)
        world.home.add_peer(
            PEER_ID.encode(),
            "127.0.0.1:1",
            cert_pem=self.cert.public_bytes(serialization.Encoding.PEM).decode(),
            resolve_for=("sip:*@b.example",),
            rate_limit=rate_limit,
        )
        if crl_file is not None:
            configure_crl(world, crl_file)
        world.kms = build_handler(world.home)  # certificate peers switch PK on
        self.kms_cert_der = der(
            x509.load_pem_x509_certificate((world.home.path / "kms-cert.pem").read_bytes())
        )

    def grant(self) -> TicketGrant:
        """A reusable ticket (J) for Bob@b from Alice."""
        flags = DEFAULT_FLAGS | TpFlag.J
        return self.world.grant(DesiredPolicy((BOB_B,), flags=flags, lifetime_s=600))

    def forwarded_resolve(self, grant: TicketGrant | None = None) -> bytes:
        """A RESOLVE_INIT_PK as peer B sends it for Bob@b (signed by B's key over IDRr)."""
        w = self.world
        grant = grant or self.grant()
        ti, _ = w.initiator().transfer_init(grant, w.now, BOB_B, (CryptoSession(1, 9),))
        creds = PkCredentials(BOB_B, (der(self.cert),), self.key, KMS_ID, self.kms_cert_der)
        wire, _ = PkResponder(creds, w.sw).receive_transfer_init(ti, w.now)
        return wire


def test_revoked_certificate_peer_is_refused(tmp_path: Path, pki: Pki) -> None:  # noqa: F811
    crl_file = tmp_path / "peers.pem"
    for world in make_world(tmp_path / "home"):
        # No CRL for the peer's issuer yet (only the test root's): it resolves.
        write(crl_file, pem_of(make_crl(pki.root, now=pki.now)))
        pw = PeerWorld(world, pki, crl_file)
        reply = world.resolve(pw.forwarded_resolve())
        assert reply.ok, reply.audit
        assert reply.audit["method"] == "peer"
        # The peer's own CRL (self-issued certificate: signed by its own key) revokes it.
        peer_ca = Ca(pw.cert, pw.key)
        write(crl_file, pem_of(make_crl(peer_ca, [pw.cert], now=pki.now)))
        reply = world.resolve(pw.forwarded_resolve())
        serial = pw.cert.serial_number
        assert_invalid_cert(reply, f"peer certificate revoked (certificate serial {serial:x}")
        # Expired: fail closed for the peer too.
        write(crl_file, pem_of(make_crl(peer_ca, now=pki.now, next_update=-HOUR / 2)))
        reply = world.resolve(pw.forwarded_resolve())
        assert_invalid_cert(reply, "peer certificate revocation status unknown")


def test_crl_setting_is_parsed_relative_to_the_home(tmp_path: Path) -> None:
    base = "\n".join(
        [
            "[kms]",
            'id = "kms:a.example"',
            "[token]",
            'module = "/usr/lib/softhsm/libsofthsm2.so"',
            'label = "kms"',
            'pin_env = "KMS_PIN"',
            "",
        ]
    )
    assert parse_config(base + '[pk]\ncrl = "crls"\n', tmp_path).pk.crl == tmp_path / "crls"
    assert parse_config(base, tmp_path).pk.crl is None
