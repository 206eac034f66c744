"""Metrics and traces wiring for ``kms serve`` (composition root): which process serves
``/metrics``, and the one observing layer (:mod:`kms.server.observed`: metrics and traces
together) around the token, the peer resolver and the handler.

* One process: it keeps its metric families in memory and serves them itself, with the
  process collector (CPU, memory, open files of the KMS process).
* Several workers: the supervisor serves ``/metrics`` from the workers' multiprocess files
  (:mod:`kms.server.metrics_http`); a worker only writes its values.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, ProcessCollector

from kms.core.api import KmsHandler
from kms.core.ports import PeerResolver
from kms.home import Home
from kms.keystore import KeyStore
from kms.server.compose import STATE_DIR, build_handler
from kms.server.config import load_config
from kms.server.grpc_server import KmsServer
from kms.server.metrics import ServerMetrics
from kms.server.metrics_http import (
    MULTIPROC_ENV,
    MetricsListen,
    MetricsServer,
    RegistryCollector,
    exposition_registry,
    multiproc_dir,
    worker_exited,
)
from kms.server.metrics_tls import TlsMetrics
from kms.server.metrics_token import Probed
from kms.server.observed import ObservedHandler, ObservedKeyStore, ObservedPeers
from kms.server.slots import CoreSlots
from kms.server.tls_files import TlsWatch
from kms.server.tracing import OtlpJsonExporter, Tracer
from kms.store.registry import REGISTRY_FILE

log = logging.getLogger("kms.server.metrics")


class ObservedProcess:
    """Metrics and/or traces of one serving process (a worker, or the only process)."""

    def __init__(self, spec: MetricsListen | None, workers: int, home: Home) -> None:
        self.home = home
        self.server: MetricsServer | None = None
        self.metrics: ServerMetrics | None = None
        self.tracer: Tracer | None = None
        # The metered key store, which the worker's token probe uses (kms_token_up).
        self.probed: Probed | None = None
        # kms_tls_* (certificate reloads) of this process, with metrics on.
        self.tls: TlsMetrics | None = None
        self._collector: RegistryCollector | None = None
        t = home.config.tracing
        if t.otlp_endpoint is not None:
            self.tracer = Tracer(OtlpJsonExporter(t.otlp_endpoint, t.service_name),
                                 record_identities=t.record_identities)
        if spec is None:
            return
        if workers > 1 and os.environ.get(MULTIPROC_ENV):
            self.metrics = ServerMetrics(None)  # values go to the multiprocess files
            self.tls = TlsMetrics(None)
            return
        # Cluster mode: the registry gauges read the shared database through this
        # process's own store backend (its connection pool).
        self._collector = RegistryCollector(
            home.registry.path, home.config,
            home.stores.open_registry if home.config.store.backend == "postgresql" else None,
        )
        registry = exposition_registry(home.config, home.registry.path, None, self._collector)
        ProcessCollector(registry=registry)
        self.metrics = ServerMetrics(registry)
        self.tls = TlsMetrics(registry)
        self.server = MetricsServer(spec, registry, self.tls)
        log.info(
            "serving metrics",
            extra={"fields": {"metrics_listen": spec.listen, "port": self.server.port,
                              "tls": self.server.tls}},
        )

    def slots(self, n: int) -> CoreSlots:
        return CoreSlots(n) if self.metrics is None else self.metrics.slots(n)

    def peers(self, inner: PeerResolver) -> PeerResolver:
        if self.metrics is None and self.tracer is None:
            return inner
        return ObservedPeers(inner, self.metrics, self.tracer)

    def build_handler(
        self, peers: PeerResolver, workers: int | None = None, slots: CoreSlots | None = None
    ) -> KmsHandler:
        """The core with one observing layer (metrics and/or traces) around its key store
        and around itself."""
        store: KeyStore = self.home.keystore()
        if self.metrics is not None or self.tracer is not None:
            observed = ObservedKeyStore(store, self.metrics, self.tracer)
            if self.metrics is not None:
                self.probed = observed  # probes are metered, not traced
            store = observed
        handler = build_handler(
            self.home, peers=peers, workers=workers, keystore=store, slots=slots,
            wrap_replay=None if self.metrics is None else self.metrics.replay_cache,
        )
        if self.metrics is None and self.tracer is None:
            return handler
        return ObservedHandler(handler, self.metrics, self.tracer)

    def watch_server(self, server: KmsServer) -> None:
        """Export the call guard's and the adapter's event counts (stalled calls timed
        out, waiting calls shed, per-peer and health Watch refusals, undecodable bodies)
        and the event loop's lag."""
        if self.metrics is None:
            return
        server.guard.counters.listener = self.metrics.guard_event
        server.servicer.counters.listener = self.metrics.guard_event
        server.watch_lag(self.metrics.loop_lag.observe)

    def watch_tls(self, watch: TlsWatch) -> None:
        """Report ``watch``'s reloads and served certificate (kms_tls_*)."""
        if self.tls is not None:
            self.tls.watching(watch.listener)
            watch.set_events(self.tls)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self._collector is not None:
            self._collector.close()
        if self.tracer is not None:
            self.tracer.exporter.close()


def supervise_with_metrics(
    home: Path,
    spec: MetricsListen,
    workers: int,
    run: Callable[[Callable[[int], None]], int],
) -> int:
    """Run the supervisor (``run``, given the hook to call with each exited worker's pid)
    with a multiprocess metrics folder and the ``/metrics`` listener, started before any
    worker: a busy port is refused up front."""
    config = load_config(home)
    with multiproc_dir(home / STATE_DIR) as folder:
        # Cluster mode: the collector opens the database at the first scrape.
        collector = RegistryCollector(home / REGISTRY_FILE, config)
        # The listener's own TLS reloads (kms_tls_*{listener="metrics"}), merged into the
        # families the workers write.
        own = CollectorRegistry()
        tls = TlsMetrics(own)
        registry = exposition_registry(config, home / REGISTRY_FILE, folder, collector, own)
        server = MetricsServer(spec, registry, tls)
        log.info(
            "serving metrics",
            extra={"fields": {"metrics_listen": spec.listen, "port": server.port,
                              "tls": server.tls, "workers": workers}},
        )
        try:
            return run(lambda pid: worker_exited(folder, pid))
        finally:
            server.close()
            collector.close()


__all__ = ["ObservedProcess", "supervise_with_metrics"]
