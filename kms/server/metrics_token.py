"""Token metrics: what the observed key store (:class:`kms.server.observed.ObservedKeyStore`)
records into (:class:`TokenMetrics`, implemented by :class:`kms.server.metrics.ServerMetrics`),
error kinds, and a probe that keeps ``kms_token_up`` current without traffic.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from kms.home import DUMMY_PSK_LABEL
from kms.keystore import (
    Digest,
    InvalidSealedData,
    Key,
    KeyExists,
    KeyNotFound,
    KeyOps,
    KeyRef,
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


TOKEN_PROBE_S = 5.0
"""How often a worker probes its token while serving (``kms_token_up``, readiness)."""


PROBE_KEY = KeyRef(DUMMY_PSK_LABEL)
"""The key a probe computes an HMAC with (one C_SignInit + C_Sign): an operation on an object
of the token, as every exchange makes. C_GenerateRandom is no probe: SoftHSM kept answering
it with its token directory gone. The dummy PSK (the unknown-identity refusal's key) is in
every serving home and protects nothing; the HMAC is thrown away."""


def probe_token(hmac: Callable[[Key, bytes, Digest], bytes]) -> bool:
    """One probe through ``hmac`` (a key store's, metered or not): False when the token does
    not answer (TokenUnavailable); any other key-store error is an answer: the token is up."""
    try:
        hmac(PROBE_KEY, b"", Digest.SHA256)
    except TokenUnavailable:
        return False
    except KeyStoreError:
        pass  # e.g. no such key
    return True


class PlainProbe:
    """:class:`Probed` for a key store without metrics."""

    def __init__(self, store: KeyOps) -> None:
        self._store = store

    def probe(self) -> bool:
        return probe_token(self._store.hmac)


class Pingable(Protocol):
    """The shared state's readiness (kms.server.stores.Stores)."""

    def ping(self) -> bool: ...


class ServingProbe:
    """:class:`Probed` for readiness: the token answers and so does the shared state (the
    database in cluster mode). Both are asked every time, so that ``kms_token_up`` stays
    current while the database is down."""

    def __init__(self, token: Probed, stores: Pingable) -> None:
        self._token = token
        self._stores = stores

    def probe(self) -> bool:
        token_up = self._token.probe()
        return self._stores.ping() and token_up


class TokenProbe:
    """Probes the token every ``interval`` seconds on a thread of its own (a token that
    hangs holds this thread, not the worker's signal handling or its event loop), so that
    ``kms_token_up`` falls to 0 while no call arrives too, and ``on_change`` hears each
    change of the answer (the first answer included): the server's readiness."""

    def __init__(
        self, store: Probed, interval: float = TOKEN_PROBE_S,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self._store = store
        self._interval = interval
        self._on_change = on_change
        self._last: bool | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kms-token-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        self._once()
        while not self._stop.wait(self._interval):
            self._once()

    def _once(self) -> None:
        up = self._store.probe()
        if up is not self._last and self._on_change is not None:
            self._on_change(up)
        self._last = up

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self._interval + 1.0)


__all__ = ["Probed", "TokenMetrics", "TokenProbe", "error_kind"]
