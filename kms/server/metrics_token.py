"""The metered key store: every key-store (PKCS#11 token) operation timed by kind, failures
counted by kind, and whether the token answers (``kms_token_up``, reconnects), plus a probe
that keeps that gauge current without traffic. Built around the real store in the
composition root (:mod:`kms.server.observe`); metric families live in
:class:`kms.server.metrics.ServerMetrics`, seen here through :class:`TokenMetrics`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from kms.keystore import (
    Digest,
    InvalidSealedData,
    Key,
    KeyExists,
    KeyInfo,
    KeyNotFound,
    KeyRef,
    KeyStore,
    KeyStoreError,
    RsaPadding,
    SignScheme,
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


class MeteredKeyStore:
    """A :class:`KeyStore` that times every operation of the store it wraps and tracks
    whether the token answers. Values and labels of keys never reach a metric."""

    def __init__(self, inner: KeyStore, metrics: TokenMetrics) -> None:
        self._inner = inner
        self._m = metrics
        self._hist = {
            op: metrics.token_seconds.labels(op)
            for op in ("hmac", "prf", "prf_many", "aes_cm", "random", "rsa_decrypt", "sign",
                       "public_key_der", "manage")
        }

    @property
    def inner(self) -> KeyStore:
        return self._inner

    def _op(self, op: str, fn: Callable[..., T], *args: Any) -> T:
        t0 = time.perf_counter()
        try:
            result = fn(*args)
        except KeyStoreError as exc:
            self._hist[op].observe(time.perf_counter() - t0)
            kind = error_kind(exc)
            self._m.token_errors.labels(op, kind).inc()
            if kind == "unavailable":
                self._m.token_unavailable()
            else:
                self._m.token_ok()  # the token answered, with an error
            raise
        self._hist[op].observe(time.perf_counter() - t0)
        if self._m.token_down:
            self._m.token_ok()
        return result

    def probe(self) -> bool:
        """One cheap token operation (C_GenerateRandom of 1 byte): is the token there?"""
        try:
            self._op("random", self._inner.random, 1)
        except KeyStoreError:
            return False
        self._m.token_ok()
        return True

    # --- operations -----------------------------------------------------------------------
    def hmac(self, key: Key, data: bytes, func: Digest) -> bytes:
        return self._op("hmac", self._inner.hmac, key, data, func)

    def prf(self, key: Key, label: bytes, out_len: int, func: Digest) -> bytes:
        return self._op("prf", self._inner.prf, key, label, out_len, func)

    def prf_many(
        self, key: Key, requests: Sequence[tuple[bytes, int]], func: Digest
    ) -> list[bytes]:
        return self._op("prf_many", self._inner.prf_many, key, requests, func)

    def aes_cm(self, key: bytes, iv: bytes, data: bytes) -> bytes:
        return self._op("aes_cm", self._inner.aes_cm, key, iv, data)

    def random(self, length: int) -> bytes:
        return self._op("random", self._inner.random, length)

    def rsa_decrypt(self, key: KeyRef, data: bytes, padding: RsaPadding) -> bytes:
        return self._op("rsa_decrypt", self._inner.rsa_decrypt, key, data, padding)

    def sign(self, key: KeyRef, data: bytes, scheme: SignScheme) -> bytes:
        return self._op("sign", self._inner.sign, key, data, scheme)

    def public_key_der(self, key: KeyRef) -> bytes:
        return self._op("public_key_der", self._inner.public_key_der, key)

    # --- management (rare while serving: one label for all) ---------------------------------
    def generate_secret(self, label: str, length: int) -> KeyInfo:
        return self._op("manage", self._inner.generate_secret, label, length)

    def import_secret(self, label: str, value: bytes) -> KeyInfo:
        return self._op("manage", self._inner.import_secret, label, value)

    def generate_rsa(self, label: str, bits: int) -> KeyInfo:
        return self._op("manage", self._inner.generate_rsa, label, bits)

    def generate_ec(self, label: str, curve: str) -> KeyInfo:
        return self._op("manage", self._inner.generate_ec, label, curve)

    def delete(self, label: str) -> None:
        self._op("manage", self._inner.delete, label)

    def list_keys(self) -> list[KeyInfo]:
        return self._op("manage", self._inner.list_keys)

    def key_info(self, label: str) -> KeyInfo:
        return self._op("manage", self._inner.key_info, label)

    def close(self) -> None:
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        # Anything else an implementation offers (e.g. batch helpers) passes through.
        return getattr(self._inner, name)


class TokenProbe:
    """Probes the token every ``interval`` seconds, so that ``kms_token_up`` falls to 0
    while no call arrives too."""

    def __init__(self, store: MeteredKeyStore, interval: float = 5.0) -> None:
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


__all__ = ["MeteredKeyStore", "TokenMetrics", "TokenProbe", "error_kind"]
