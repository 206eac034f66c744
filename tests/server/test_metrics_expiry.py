"""The expiry gauges: certificates' notAfter and CRLs' nextUpdate, read from the files the
configuration names, again when a file changes, and no sample for a file that does not
parse (the others stay)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client import CollectorRegistry

from kms.home import CERT_FILE, SIGNING_CERT_FILE
from kms.server.config import KmsConfig, MetricsSettings, PkSettings, TokenSettings
from kms.server.metrics_expiry import ExpiryCollector
from tests.pki import Ca, make_pki, pem

CERT = "kms_certificate_not_after_timestamp_seconds"
CRL = "kms_crl_next_update_timestamp_seconds"


def crl(ca: Ca, now: dt.datetime, next_update: dt.datetime) -> bytes:
    built = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(next_update)
        .sign(ca.key, hashes.SHA256())
    )
    return built.public_bytes(Encoding.PEM)


def test_expiry_gauges_follow_the_files(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    pki = make_pki(now)
    (tmp_path / CERT_FILE).write_bytes(pem(pki.root.cert))
    (tmp_path / SIGNING_CERT_FILE).write_bytes(pem(pki.intermediate.cert))
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(pem(pki.other.cert, pki.intermediate.cert))
    crls = tmp_path / "crls"
    crls.mkdir()
    (crls / "root-old.pem").write_bytes(crl(pki.root, now, now + dt.timedelta(days=1)))
    (crls / "root-new.pem").write_bytes(crl(pki.root, now, now + dt.timedelta(days=7)))
    (crls / "other.pem").write_bytes(crl(pki.other, now, now + dt.timedelta(days=2)))
    config = KmsConfig(
        home=tmp_path, kms_id="kms:kms.example.org", token=TokenSettings(module="softhsm"),
        pk=dataclasses.replace(PkSettings(), ca_bundle=bundle, crl=crls),
    )  # fmt: skip
    reg = CollectorRegistry()
    reg.register(ExpiryCollector(config))

    def value(name: str, **labels: str) -> float | None:
        return reg.get_sample_value(name, labels)

    assert value(CERT, certificate="kms") == pki.root.cert.not_valid_after_utc.timestamp()
    assert value(CERT, certificate="kms_signing") == (
        pki.intermediate.cert.not_valid_after_utc.timestamp())
    assert value(CERT, certificate="ca_bundle") == min(
        c.not_valid_after_utc.timestamp() for c in (pki.other.cert, pki.intermediate.cert))
    assert value(CERT, certificate="tls_server") is None  # not configured
    root_issuer = pki.root.cert.subject.rfc4514_string()
    # An issuer's newest CRL is the one that counts; each issuer once.
    assert value(CRL, issuer=root_issuer) == (now + dt.timedelta(days=7)).timestamp()
    assert value(CRL, issuer=pki.other.cert.subject.rfc4514_string()) == (
        now + dt.timedelta(days=2)).timestamp()

    # A certificate replaced in place is read again.
    (tmp_path / CERT_FILE).write_bytes(pem(pki.other.cert))
    st = (tmp_path / CERT_FILE).stat()
    os.utime(tmp_path / CERT_FILE, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert value(CERT, certificate="kms") == pki.other.cert.not_valid_after_utc.timestamp()
    # A file that no longer parses gives no sample; the others are still there.
    (tmp_path / SIGNING_CERT_FILE).write_text("not a certificate\n")
    assert value(CERT, certificate="kms_signing") is None
    assert value(CERT, certificate="kms") is not None
    assert value(CRL, issuer=root_issuer) is not None


def test_metrics_listener_certificate_is_covered(tmp_path: Path) -> None:
    pki = make_pki(dt.datetime.now(dt.UTC).replace(microsecond=0))
    cert = tmp_path / "metrics.pem"
    cert.write_bytes(pem(pki.other.cert))
    config = KmsConfig(
        home=tmp_path, kms_id="kms:kms.example.org", token=TokenSettings(module="softhsm"),
        metrics=dataclasses.replace(MetricsSettings(), tls_cert=cert, tls_key=cert),
    )  # fmt: skip
    reg = CollectorRegistry()
    reg.register(ExpiryCollector(config))
    assert reg.get_sample_value(CERT, {"certificate": "metrics_tls"}) == (
        pki.other.cert.not_valid_after_utc.timestamp())
