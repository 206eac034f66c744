"""Throw-away certificates for the TLS reload tests: CAs, leaves for 127.0.0.1 (server and
client auth), expired ones, and the files written the way renewal tools write them (a new
file renamed into place)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def pem(obj: Any) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return bytes(obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))


@dataclass(frozen=True)
class Leaf:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return pem(self.cert)

    @property
    def key_pem(self) -> bytes:
        return pem(self.key)


class Ca:
    """A self-signed ECDSA P-256 CA."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return pem(self.cert)

    def issue(self, name: str, *, days: float = 1.0, expired: bool = False) -> Leaf:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
        if expired:
            start, end = now - dt.timedelta(days=2), now - dt.timedelta(days=1)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        return Leaf(cert, key)


def replace(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as a renewal tool does: a new file renamed over the old."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def install(folder: Path, leaf: Leaf) -> tuple[Path, Path]:
    """Write (or replace) ``folder``/tls.crt and tls.key; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "tls.crt", folder / "tls.key"
    replace(cert, leaf.cert_pem)
    replace(key, leaf.key_pem)
    return cert, key


def peer_serial(port: int, client: Leaf | None = None, tmp: Path | None = None) -> int:
    """The serial number of the certificate a NEW TLS connection to 127.0.0.1:``port`` gets
    (no verification: only which certificate is served; ALPN h2 as gRPC clients offer)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    if client is not None:
        assert tmp is not None
        both = tmp / "client-both.pem"
        both.write_bytes(client.key_pem + client.cert_pem)
        ctx.load_cert_chain(both)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


__all__ = ["Ca", "Leaf", "install", "peer_serial", "pem", "replace"]
