"""Metrics of TLS certificate reloads (:mod:`kms.server.tls_files`), per listener (``grpc``:
the KMS port, ``federation_client``: the certificate presented to peer KMSs, ``metrics``: the
``/metrics`` listener):

* ``kms_tls_served_certificate_not_after_timestamp_seconds{listener}``: notAfter of the
  certificate being served now (lowest over live worker processes). Unlike
  ``kms_certificate_not_after_timestamp_seconds`` (read from the files at scrape time) this
  is what clients get: after a refused reload the file is new but the served certificate is
  the old one. A family of its own: the file gauges are computed at scrape time by the
  exposing process, this one is set by each worker and combined over workers (``livemin``);
  the ``KmsCertificateExpiresSoon`` alert reads both (``certificate="served_<listener>"``).
* ``kms_tls_reloads_total{listener}``: new certificate sets taken;
* ``kms_tls_reload_rejections_total{listener,reason}``: new sets refused (one per version of
  the files, not per retry), by :data:`kms.server.tls_files.REASONS`;
* ``kms_tls_reload_rejected{listener}``: 1 while the files on disk are refused and an older
  set is served (highest over live workers): the "rejected reload persists" alert.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from kms.server.tls_files import REASONS

LISTENERS = ("grpc", "federation_client", "metrics")


class TlsMetrics:
    """:class:`kms.server.tls_files.TlsEvents` into Prometheus families. ``registry`` None
    in a multiprocess worker (the supervisor collects the worker's files)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.not_after = Gauge(
            "kms_tls_served_certificate_not_after_timestamp_seconds",
            "notAfter of the TLS certificate being served (Unix time; lowest over live "
            "workers)",
            ("listener",),
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.reloads = Counter(
            "kms_tls_reloads_total",
            "Renewed TLS certificate files taken without a restart",
            ("listener",),
            registry=registry,
        )
        self.rejections = Counter(
            "kms_tls_reload_rejections_total",
            "Renewed TLS certificate files refused (the previous certificate stays served), "
            "by reason: " + ", ".join(REASONS),
            ("listener", "reason"),
            registry=registry,
        )
        self.rejected_now = Gauge(
            "kms_tls_reload_rejected",
            "1 while the TLS files on disk are refused and an older certificate is served",
            ("listener",),
            registry=registry,
            multiprocess_mode="livemax",
        )

    def watching(self, listener: str) -> None:
        """Counters present at 0 for a watched listener, so that increase() sees the 1st."""
        self.reloads.labels(listener)
        for reason in REASONS:
            self.rejections.labels(listener, reason)

    # --- TlsEvents ------------------------------------------------------------------------
    def served(self, listener: str, not_after: float) -> None:
        self.not_after.labels(listener).set(not_after)

    def reloaded(self, listener: str) -> None:
        self.reloads.labels(listener).inc()

    def rejected(self, listener: str, reason: str) -> None:
        self.rejections.labels(listener, reason).inc()

    def pending(self, listener: str, rejected: bool) -> None:
        self.rejected_now.labels(listener).set(1 if rejected else 0)


__all__ = ["LISTENERS", "TlsMetrics"]
