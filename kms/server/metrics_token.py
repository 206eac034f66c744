"""Token metrics: what the observed key store (:class:`kms.server.observed.ObservedKeyStore`)
records into (:class:`TokenMetrics`, implemented by :class:`kms.server.metrics.ServerMetrics`),
error kinds, and a probe that keeps ``kms_token_up`` current without traffic.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol, TypeVar

from kms.keystore import (
    InvalidSealedData,
    KeyExists,
    KeyNotFound,
    KeyStoreError,
    TokenUnavailable,
    UnsupportedOperation,
)

T = TypeVar("T")

# Token error kinds (kms.keystore's error tree).
_ERROR_KINDS: tuple[tuple[type[KeyStoreError], str], ...] = (
    (TokenUnavailable, "unavailable"),
    (KeyNotFound, "not_found"),
    (InvalidSealedData, "invalid_data"),
    (UnsupportedOperation, "unsupported"),
    (KeyExists, "exists"),
)


def error_kind(exc: KeyStoreError) -> str:
    for cls, name in _ERROR_KINDS:
        if isinstance(exc, cls):
            return name
    return "error"


class TokenMetrics(Protocol):
    """What the metered key store records into (implemented by ServerMetrics)."""

    token_seconds: Any  # Histogram by operation
    token_errors: Any  # Counter by operation and error

    @property
    def token_down(self) -> bool: ...

    def token_ok(self) -> None: ...

    def token_unavailable(self) -> None: ...


class Probed(Protocol):
    """A key store that can probe the token (kms.server.observed.ObservedKeyStore)."""

    def probe(self) -> bool: ...


class TokenProbe:
    """Probes the token every ``interval`` seconds, so that ``kms_token_up`` falls to 0
    while no call arrives too."""

    def __init__(self, store: Probed, interval: float = 5.0) -> None:
        self._store = store
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kms-token-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        self._store.probe()
        while not self._stop.wait(self._interval):
            self._store.probe()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self._interval + 1.0)


__all__ = ["Probed", "TokenMetrics", "TokenProbe", "error_kind"]
