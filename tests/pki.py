"""A small test PKI made with ``cryptography``: a root CA, an intermediate CA, endpoint
certificates whose subjectAltName URI is the MIKEY identity, and the bad ones the KMS must
refuse (expired, wrong identity, issued by another CA).

Certificates follow RFC 5280 / CA/B-style profiles closely enough for cryptography's
X.509 verifier (basicConstraints critical on CAs, keyUsage, SKI/AKI, RSA-2048, SHA-256).
RSA key generation dominates the cost, so keys are made once per process and reused.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

DAY = dt.timedelta(days=1)


@functools.cache
def rsa_key(name: str) -> rsa.RSAPrivateKey:
    """One RSA-2048 key per name for the whole test run (generation is the slow part)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass(frozen=True)
class Ca:
    """A CA certificate with its private key; issues CA and endpoint certificates."""

    cert: x509.Certificate
    key: rsa.RSAPrivateKey

    @classmethod
    def root(cls, name: str, now: dt.datetime) -> Ca:
        key = rsa_key(name)
        subject = _name(name)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - 30 * DAY)
            .not_valid_after(now + 3650 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    def _builder(
        self, subject: x509.Name, public_key: rsa.RSAPublicKey, start: dt.datetime, end: dt.datetime
    ) -> x509.CertificateBuilder:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(aki, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )

    def intermediate(self, name: str, now: dt.datetime) -> Ca:
        key = rsa_key(name)
        cert = (
            self._builder(_name(name), key.public_key(), now - 10 * DAY, now + 1000 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        return Ca(cert, key)

    def endpoint(
        self,
        identity: bytes,
        key: rsa.RSAPrivateKey,
        now: dt.datetime,
        *,
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        extra_uris: tuple[bytes, ...] = (),
    ) -> x509.Certificate:
        """An end-entity certificate: SAN URI = the MIKEY identity, digitalSignature."""
        uris = [x509.UniformResourceIdentifier(u.decode("ascii")) for u in (identity, *extra_uris)]
        return (
            self._builder(
                _name(identity.decode("ascii")),
                key.public_key(),
                start if start is not None else now - DAY,
                end if end is not None else now + 365 * DAY,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectAlternativeName(uris), critical=False)
            .sign(self.key, hashes.SHA256())
        )


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class Pki:
    """Everything the PK tests need. ``root`` is what the KMS trusts (its CA bundle);
    endpoints chain to it through ``intermediate``; ``other`` is a CA the KMS does not know."""

    root: Ca
    intermediate: Ca
    other: Ca
    now: dt.datetime

    def chain(
        self, identity: bytes, key_name: str | None = None
    ) -> tuple[rsa.RSAPrivateKey, tuple[bytes, ...]]:
        """A valid key and chain (own certificate first, then the intermediate)."""
        key = rsa_key(key_name or identity.decode())
        leaf = self.intermediate.endpoint(identity, key, self.now)
        return key, (der(leaf), der(self.intermediate.cert))


def make_pki(now: dt.datetime) -> Pki:
    root = Ca.root("MIKEY Test Root CA", now)
    return Pki(
        root=root,
        intermediate=root.intermediate("MIKEY Test Endpoint CA", now),
        other=Ca.root("Some Other Root CA", now),
        now=now,
    )
