"""The ``/metrics`` listener: a small HTTP(S) server of its own (prometheus-client), separate
from the gRPC port, and what it exposes besides the call and token metrics.

* One process (``workers = 1``): the serving process exposes its own metric families.
* Several workers: the supervisor makes a fresh ``PROMETHEUS_MULTIPROC_DIR`` (under the
  home's ``state/``, emptied at start and removed at stop) before it spawns the workers;
  each worker writes its values there and the supervisor's listener adds them up
  (:class:`prometheus_client.multiprocess.MultiProcessCollector`). A dead worker's live
  gauges are dropped (``mark_process_dead``); its counters still count.
* Either way, :class:`RegistryCollector` reads the registry at scrape time: TPK versions by
  state, the age of the current TPK and the configured maximum, registry sizes, build info.
  It reads through the configured store backend (``[store] backend``): the SQLite file of
  the home, or in cluster mode the PostgreSQL database every replica shares.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import shutil
import socket
import sqlite3
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from kms.server.config import KmsConfig, split_listen
from kms.server.metrics_expiry import ExpiryCollector
from kms.server.metrics_tls import TlsMetrics
from kms.server.tls_files import DEFAULT_RECHECK_S, TlsFileError, TlsMaterial, TlsWatch
from kms.store.registry import Registry, RegistryError, TpkState, TpkVersion

log = logging.getLogger("kms.server.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MULTIPROC_DIR = "metrics-mp"  # under <home>/state


def kms_version() -> str:
    try:
        return importlib.metadata.version("mikey-ticket-kms")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class RegistryCollector(Collector):
    """Gauges read from the registry on each scrape (the registry is shared by every worker
    and, in a cluster, by every replica: query them with ``max``)."""

    def __init__(
        self,
        registry_path: Path,
        config: KmsConfig,
        open_registry: Callable[[], Registry] | None = None,
    ) -> None:
        """``open_registry``: a registry handle of the process's own store backend (cluster
        mode); without it a PostgreSQL backend is opened here at the first scrape."""
        self._path = registry_path
        self._config = config
        self._open = open_registry
        self._stores: Any = None  # kms.server.stores.Stores opened here, closed by close()
        # One connection for every scrape (scrapes come on threads of their own, one at a
        # time under the lock); SQLite: read-only, no write lock, no migration check.
        self._lock = threading.Lock()
        self._registry: Registry | None = None

    @property
    def cluster(self) -> bool:
        return self._config.store.backend == "postgresql"

    def _open_registry(self) -> Registry:
        if self._open is not None:
            return self._open()
        if self.cluster:
            if self._stores is None:
                from kms.server.stores import open_stores

                self._stores = open_stores(self._config)
            reg: Registry = self._stores.open_registry()
            return reg
        if not self._path.exists():
            raise RegistryError(f"registry {self._path} does not exist")
        conn = sqlite3.connect(
            f"file:{self._path}?mode=ro", uri=True, check_same_thread=False,
            timeout=2.0, isolation_level=None,
        )
        return Registry(conn, self._path)

    def _read(self) -> tuple[list[TpkVersion], dict[str, int]]:
        with self._lock:
            if self._registry is None:
                self._registry = self._open_registry()
            reg = self._registry
            try:
                return reg.tpk_versions(), {
                    "endpoints": len(reg.list_endpoints()),
                    "groups": len(reg.list_groups()),
                    "peers": len(reg.list_peers()),
                    "applications": len(reg.list_applications()),
                }
            except Exception:
                with contextlib.suppress(Exception):
                    reg.close()
                self._registry = None
                raise

    def close(self) -> None:
        with self._lock:
            if self._registry is not None:
                with contextlib.suppress(Exception):
                    self._registry.close()
                self._registry = None
            if self._stores is not None:
                with contextlib.suppress(Exception):
                    self._stores.close()
                self._stores = None

    def collect(self) -> Iterable[Any]:
        build = GaugeMetricFamily(
            "kms_build_info", "Version of this KMS (value 1)",
            labels=("version", "python_version"),
        )
        build.add_metric((kms_version(), platform.python_version()), 1)
        yield build
        max_age = GaugeMetricFamily(
            "kms_tpk_max_age_seconds",
            "[metrics] tpk_max_age_s: how long a TPK may stay current before rotation is due",
        )
        max_age.add_metric((), float(self._config.metrics.tpk_max_age_s))
        yield max_age
        up = GaugeMetricFamily(
            "kms_registry_up", "1 when the registry could be read for this scrape"
        )
        try:
            tpks, sizes = self._read()
        except Exception as exc:  # SQLite, or the database of a cluster (unavailable, ...)
            # The type only: a driver's message may quote the DSN.
            log.warning("registry unreadable for metrics",
                        extra={"fields": {"error": type(exc).__name__}})
            up.add_metric((), 0)
            yield up
            return
        up.add_metric((), 1)
        yield up
        states = GaugeMetricFamily(
            "kms_tpk_versions", "Ticket Protection Key versions by state", labels=("state",)
        )
        for state in TpkState:
            states.add_metric((state.value,), sum(1 for t in tpks if t.state is state))
        yield states
        current = [t for t in tpks if t.state is TpkState.CURRENT]
        if current:
            version = GaugeMetricFamily(
                "kms_tpk_current_version", "Version number of the current TPK"
            )
            version.add_metric((), current[0].version)
            yield version
            created = GaugeMetricFamily(
                "kms_tpk_current_created_timestamp_seconds",
                "When the current TPK was made (Unix time); rotation resets it",
            )
            created.add_metric((), float(current[0].created_at))
            yield created
        entries = GaugeMetricFamily(
            "kms_registry_entries", "Registry sizes by kind", labels=("kind",)
        )
        for kind, n in sizes.items():
            entries.add_metric((kind,), n)
        yield entries


@dataclass(frozen=True)
class MetricsListen:
    """Where and how ``/metrics`` is served (picklable)."""

    listen: str
    tls_cert: Path | None = None
    tls_key: Path | None = None


class _SilentHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No line per scrape."""


class _TlsWsgiServer(ThreadingWSGIServer):
    """prometheus-client's threaded WSGI server with TLS whose certificate follows renewed
    files: each accepted connection is wrapped with the context of the set last taken by
    the watch (checked there, at most once per recheck interval). The handshake runs in the
    connection's own thread (on its first read), so a client that connects and stays silent
    does not hold up the accept loop."""

    watch: TlsWatch
    context: ssl.SSLContext

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = self.socket.accept()
        try:
            new = self.watch.poll()
        except Exception:  # a bug here must not stop the listener: keep what is served
            log.exception("TLS reload check failed", extra={"fields": {"listener": "metrics"}})
            new = None
        if new is not None:
            self.context = ssl_context(new)
        return self.context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        ), addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A failed handshake (a plaintext or untrusting client) is not the server's error:
        one debug line, no traceback on stderr."""
        log.debug("metrics connection failed", extra={"fields": {"peer": str(client_address)}})


def ssl_context(material: TlsMaterial) -> ssl.SSLContext:
    """A server context for one validated set, loaded from memory (an anonymous file) so
    that what is served is exactly what was validated, even if the files change again."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    fd = os.memfd_create("kms-metrics-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, material.key_pem + b"\n" + material.cert_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return ctx


class MetricsServer:
    """A running ``/metrics`` listener. With TLS, renewed certificate files are taken without
    a restart (:mod:`kms.server.tls_files`, ``listener="metrics"``)."""

    def __init__(
        self,
        spec: MetricsListen,
        registry: CollectorRegistry,
        tls_events: TlsMetrics | None = None,
        *,
        recheck_s: float = DEFAULT_RECHECK_S,
    ) -> None:
        host, port = split_listen(spec.listen)
        self.tls = spec.tls_cert is not None
        self.watch: TlsWatch | None = None
        try:
            if spec.tls_cert is None or spec.tls_key is None:
                self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
            else:
                try:
                    self.watch = TlsWatch(
                        "metrics", spec.tls_cert, spec.tls_key, recheck_s=recheck_s
                    )
                except TlsFileError as exc:
                    raise OSError(f"cannot serve metrics on {spec.listen}: {exc}") from None
                if tls_events is not None:
                    tls_events.watching("metrics")
                    self.watch.set_events(tls_events)
                self._httpd, self._thread = self._start_tls(host, port, registry, self.watch)
        except OSError as exc:
            if exc.errno is None:
                raise
            raise OSError(
                exc.errno, f"cannot serve metrics on {spec.listen}: {exc.strerror}"
            ) from None
        self.port: int = int(self._httpd.server_port)

    @staticmethod
    def _start_tls(
        host: str, port: int, registry: CollectorRegistry, watch: TlsWatch
    ) -> tuple[Any, threading.Thread]:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]

        class Server(_TlsWsgiServer):
            address_family = family

        Server.watch = watch
        Server.context = ssl_context(watch.current)
        httpd = make_server(host, port, make_wsgi_app(registry), Server,
                            handler_class=_SilentHandler)
        thread = threading.Thread(target=httpd.serve_forever, name="kms-metrics", daemon=True)
        thread.start()
        return httpd, thread

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


class MergedCollector(Collector):
    """The families of several collectors, those of one name merged into one (their label
    sets differ): the workers' values (multiprocess files) and the supervisor's own (its
    ``/metrics`` listener's ``kms_tls_*{listener="metrics"}``) under one family each, as
    the text format requires."""

    def __init__(self, *parts: Any) -> None:
        self._parts = parts

    def collect(self) -> Iterable[Any]:
        families: dict[str, Any] = {}
        for part in self._parts:
            for family in part.collect():  # fresh objects on every collect
                known = families.get(family.name)
                if known is None:
                    families[family.name] = family
                else:
                    known.samples.extend(family.samples)
        return list(families.values())


def exposition_registry(
    config: KmsConfig,
    registry_path: Path,
    multiproc_dir: Path | None,
    collector: RegistryCollector | None = None,
    own: CollectorRegistry | None = None,
) -> CollectorRegistry:
    """What the listener serves: the registry-derived gauges (``collector``, by default one
    on ``registry_path`` or the configured store backend), plus the workers' values when
    ``multiproc_dir`` is given, merged with the supervisor's ``own`` families (else the
    caller registers its own families)."""
    reg = CollectorRegistry()
    if multiproc_dir is not None:
        workers = MultiProcessCollector(None, path=str(multiproc_dir))  # type: ignore[no-untyped-call]
        reg.register(workers if own is None else MergedCollector(workers, own))
    reg.register(collector or RegistryCollector(registry_path, config))
    reg.register(ExpiryCollector(config))
    return reg


@contextlib.contextmanager
def multiproc_dir(state: Path) -> Iterator[Path]:
    """A fresh, empty ``PROMETHEUS_MULTIPROC_DIR`` in ``state`` for the duration, set in the
    environment (spawned workers inherit it) and removed afterwards. Leftovers of a previous
    run (a killed supervisor) are removed first: their counters belong to dead processes."""
    path = state / MULTIPROC_DIR
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700, parents=True)
    old = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = old
        shutil.rmtree(path, ignore_errors=True)


def worker_exited(path: Path, pid: int) -> None:
    """Drop a dead worker's live gauges (its counters and histograms stay)."""
    with contextlib.suppress(OSError):
        mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


__all__ = [
    "MULTIPROC_ENV",
    "MetricsListen",
    "MergedCollector",
    "MetricsServer",
    "RegistryCollector",
    "exposition_registry",
    "kms_version",
    "multiproc_dir",
    "ssl_context",
    "worker_exited",
]
