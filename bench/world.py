"""The benchmark's KMS home and endpoints.

One throwaway KMS home (embedded SoftHSM2 token, made by ``init_home`` exactly like
``kms init``), configured so that the KMS's protective state cannot distort a throughput
measurement:

* ``rate_limit_per_s = 0``: the per-identity token bucket is off (rate <= 0 means
  unlimited in :class:`kms.store.memory.TokenBucketRateLimiter`); the bench drives one
  Initiator and one Responder identity far above the production default of 50/s.
* ``timestamp_window_s = 3600``: messages are generated before the timed window starts and
  must still be fresh when they are sent.
* ``replay_cache_size = 2000000``: every message is distinct (fresh RAND, CSB ID, T), so the
  replay cache never refuses one; the size keeps it from pruning during the run (pruning
  still runs every 1000 inserts, as in production).

Everything else (SQLite replay cache and resolve ledger, JSON-lines audit log, registry
lookups per request) is the production configuration.

PK: a small PKI (root CA -> endpoint certificates whose SAN URI is the identity) made with
``cryptography``; the root goes into ``[pk] ca_bundle``.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from kms.home import CERT_FILE, Home, init_home
from kms.mikey.constants import IdType

KMS_ID = "sip:kms.bench.example"
ALICE = b"sip:alice@bench.example"  # Initiator
BOB = b"sip:bob@bench.example"  # Responder
PSKS = {ALICE: bytes.fromhex("a1" * 16), BOB: bytes.fromhex("b0" * 16)}
CA_FILE = "bench-ca.pem"

POLICY_OVERRIDES = {
    "rate_limit_per_s": "0",
    "timestamp_window_s": "3600",
    "replay_cache_size": "2000000",
}


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )


def make_ca(now: dt.datetime) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = _rsa()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("MIKEY Bench Root CA"))
        .issuer_name(_name("MIKEY Bench Root CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_endpoint_cert(
    ca_key: rsa.RSAPrivateKey, ca: x509.Certificate, identity: bytes, now: dt.datetime
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = _rsa()
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(identity.decode()))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(aki, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(ca=False), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.decode())]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def self_signed(key: rsa.RSAPrivateKey, cn: str) -> x509.Certificate:
    """A certificate for the software key store's envelope key (the token's is kms-cert.pem)."""
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class PkEndpoint:
    """Picklable PK material of one endpoint (crosses into the load processes)."""

    identity: bytes
    key_pem: bytes = field(repr=False)
    chain_der: tuple[bytes, ...] = field(repr=False)


@dataclass(frozen=True)
class BenchSetup:
    home: Path
    kms_cert_der: bytes = field(repr=False)
    ca_der: bytes = field(repr=False)
    pk: dict[bytes, PkEndpoint] = field(repr=False)


def _set_policy(text: str, key: str, value: str) -> str:
    new, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
    if n != 1:
        raise RuntimeError(f"kms.toml has no single '{key}' line")
    return new


def create_home(path: Path) -> BenchSetup:
    """Initialise the bench home (token, TPK, envelope key), register the two endpoints,
    write the policy overrides and the PK CA bundle."""
    home = init_home(path, KMS_ID)
    try:
        for ident, psk in PSKS.items():
            home.add_endpoint(ident, IdType.URI, psk)
    finally:
        home.close()
    now = dt.datetime.now(dt.UTC)
    ca_key, ca = make_ca(now)
    (path / CA_FILE).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    conf = path / "kms.toml"
    text = conf.read_text()
    for k, v in POLICY_OVERRIDES.items():
        text = _set_policy(text, k, v)
    text = text.replace('# ca_bundle = "endpoint-ca.pem"', f'ca_bundle = "{CA_FILE}"', 1)
    conf.write_text(text)
    pk: dict[bytes, PkEndpoint] = {}
    for ident in PSKS:
        key, cert = make_endpoint_cert(ca_key, ca, ident, now)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        pk[ident] = PkEndpoint(ident, pem, (der(cert),))
    kms_cert = x509.load_pem_x509_certificate((path / CERT_FILE).read_bytes())
    return BenchSetup(path, der(kms_cert), der(ca), pk)


def open_bench_home(path: Path) -> Home:
    from kms.home import open_home

    return open_home(path)
