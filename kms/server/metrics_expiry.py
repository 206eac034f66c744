"""Expiry gauges: when the certificates and CRLs the KMS depends on stop being valid.

Read from their files on each scrape by the process that serves ``/metrics`` (a file is
parsed again only when its size or modification time changed), so that an alert can fire
days before a certificate's notAfter or a CRL's nextUpdate, not when calls start failing:

* ``kms_certificate_not_after_timestamp_seconds{certificate}``: the KMS certificate
  (envelope key, RFC 3830 4.2.5 / RFC 6043 5.1), the KMS signing certificate (SIGNkms), the
  gRPC server's TLS certificate, the federation client certificate, the ``/metrics``
  listener's certificate, and the earliest notAfter of the ``[pk] ca_bundle``. These are the
  files; what is being served after a refused renewal is
  ``kms_tls_served_certificate_not_after_timestamp_seconds`` (:mod:`kms.server.metrics_tls`);
* ``kms_crl_next_update_timestamp_seconds{issuer}``: each CRL of ``[pk] crl`` (RFC 5280
  5.1.2.5); the KMS refuses certificates of an issuer whose CRL is past it (fail closed).

A file that cannot be read or parsed gives no sample, and one log line naming the file (the
KMS itself refuses to start without its own certificates).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cryptography import x509
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kms.home import CERT_FILE, SIGNING_CERT_FILE
from kms.server.config import KmsConfig
from kms.server.crl import CrlError, CrlStore
from kms.server.tls_files import Stamp, file_stamp

log = logging.getLogger("kms.server.metrics")

def earliest_not_after(path: Path) -> float:
    """The earliest notAfter (Unix time) of the PEM certificates in ``path``."""
    certs = x509.load_pem_x509_certificates(path.read_bytes())
    return min(c.not_valid_after_utc.timestamp() for c in certs)


class ExpiryCollector(Collector):
    """The gauges above for one home's configuration."""

    def __init__(self, config: KmsConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._certs: dict[Path, tuple[Stamp, float]] = {}
        self._crl: CrlStore | None = None

    def certificate_files(self) -> Iterator[tuple[str, Path]]:
        c = self._config
        yield "kms", c.home / CERT_FILE
        yield "kms_signing", c.home / SIGNING_CERT_FILE
        if c.server.tls_cert is not None:
            yield "tls_server", c.server.tls_cert
        if c.federation.client_cert is not None:
            yield "federation_client", c.federation.client_cert
        if c.metrics.tls_cert is not None:
            yield "metrics_tls", c.metrics.tls_cert
        if c.pk.ca_bundle is not None:
            yield "ca_bundle", c.pk.ca_bundle

    def _not_after(self, path: Path) -> float | None:
        stamp = file_stamp(path)
        if stamp is None:
            return None
        known = self._certs.get(path)
        if known is not None and known[0] == stamp:
            return known[1]
        try:
            value = earliest_not_after(path)
        except (OSError, ValueError) as exc:
            log.warning("certificate unreadable for metrics",
                        extra={"fields": {"path": str(path), "error": type(exc).__name__}})
            return None
        self._certs[path] = (stamp, value)
        return value

    def _crls(self) -> Iterable[x509.CertificateRevocationList]:
        path = self._config.pk.crl
        if path is None:
            return ()
        try:
            if self._crl is None:
                self._crl = CrlStore(path)
            else:
                self._crl.reload()  # a stat per file when nothing changed
        except (CrlError, OSError) as exc:
            log.warning("CRLs unreadable for metrics",
                        extra={"fields": {"path": str(path), "error": type(exc).__name__}})
            return ()
        return self._crl.crls

    def collect(self) -> Iterable[Any]:
        certs = GaugeMetricFamily(
            "kms_certificate_not_after_timestamp_seconds",
            "When a certificate the KMS uses expires (Unix time; ca_bundle: its earliest)",
            labels=("certificate",),
        )
        crls = GaugeMetricFamily(
            "kms_crl_next_update_timestamp_seconds",
            "nextUpdate of each CRL of [pk] crl (Unix time): past it, the KMS refuses "
            "certificates of that issuer",
            labels=("issuer",),
        )
        with self._lock:
            for name, path in self.certificate_files():
                value = self._not_after(path)
                if value is not None:
                    certs.add_metric((name,), value)
            newest: dict[str, float] = {}  # per issuer: its newest CRL is the one used
            for crl in self._crls():
                if crl.next_update_utc is not None:
                    issuer = crl.issuer.rfc4514_string()
                    at = crl.next_update_utc.timestamp()
                    newest[issuer] = max(at, newest.get(issuer, at))
            for issuer, at in sorted(newest.items()):
                crls.add_metric((issuer,), at)
        yield certs
        yield crls


__all__ = ["ExpiryCollector", "earliest_not_after"]
