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
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from kms.server.config import KmsConfig, split_listen
from kms.store.registry import Registry, RegistryError, TpkState, TpkVersion

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

    def __init__(self, registry_path: Path, config: KmsConfig) -> None:
        self._path = registry_path
        self._config = config
        # One read-only connection for every scrape (scrapes come on threads of their own,
        # one at a time under the lock): no write lock, no migration check per scrape.
        self._lock = threading.Lock()
        self._registry: Registry | None = None

    def _read(self) -> tuple[list[TpkVersion], dict[str, int]]:
        with self._lock:
            if self._registry is None:
                if not self._path.exists():
                    raise RegistryError(f"registry {self._path} does not exist")
                conn = sqlite3.connect(
                    f"file:{self._path}?mode=ro", uri=True, check_same_thread=False,
                    timeout=2.0, isolation_level=None,
                )
                self._registry = Registry(conn, self._path)
            reg = self._registry
            try:
                return reg.tpk_versions(), {
                    "endpoints": len(reg.list_endpoints()),
                    "groups": len(reg.list_groups()),
                    "peers": len(reg.list_peers()),
                    "applications": len(reg.list_applications()),
                }
            except (sqlite3.Error, RegistryError):
                reg.close()
                self._registry = None
                raise

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
        except (sqlite3.Error, RegistryError):
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


class MetricsServer:
    """A running ``/metrics`` listener."""

    def __init__(self, spec: MetricsListen, registry: CollectorRegistry) -> None:
        host, port = split_listen(spec.listen)
        try:
            self._httpd, self._thread = start_http_server(
                port,
                addr=host,
                registry=registry,
                certfile=None if spec.tls_cert is None else str(spec.tls_cert),
                keyfile=None if spec.tls_key is None else str(spec.tls_key),
            )
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot serve metrics on {spec.listen}: {exc.strerror}"
            ) from None
        self.port: int = int(self._httpd.server_port)
        self.tls = spec.tls_cert is not None

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def exposition_registry(
    config: KmsConfig, registry_path: Path, multiproc_dir: Path | None
) -> CollectorRegistry:
    """What the listener serves: the registry-derived gauges, plus the workers' values when
    ``multiproc_dir`` is given (else the caller registers its own families)."""
    reg = CollectorRegistry()
    if multiproc_dir is not None:
        MultiProcessCollector(reg, path=str(multiproc_dir))  # type: ignore[no-untyped-call]
    reg.register(RegistryCollector(registry_path, config))
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
    "MetricsServer",
    "RegistryCollector",
    "exposition_registry",
    "kms_version",
    "multiproc_dir",
    "worker_exited",
]
