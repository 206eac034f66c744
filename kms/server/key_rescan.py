"""A key the registry names but the token's handle catalogue lacks: rescan the token at
once, the first time that key is missed.

The catalogue (hsm.pkcs11.catalogue) is filled by one scan; a key created by another process
(`kms node add`, `kms endpoint add`, `rotate-psk` while `kms serve` runs) is found by a
rescan on its first use. The key store rate-limits those rescans process-wide (one per
``MISSING_KEY_RESCAN_S``), so a key registered within that time of another miss was refused
once. Every KeyRef the core hands the key store comes from a registry read made for the
request (an endpoint's, node's or peer's PSK, a TPK) or is one of the KMS's own keys, so a
miss means "the registry says the key exists and the catalogue does not have it": this
decorator then rescans without the rate limit, once per label. Labels are fresh per
registration and rotation (kms.home.layout), so a caller cannot force more rescans than the
operator has created keys; a key that is still missing after its rescan falls back to the
store's rate-limited rescan (e.g. a token restored from a backup later).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from kms.keystore import Digest, Key, KeyNotFound, KeyOps, KeyRef, RsaPadding, SignScheme


class RescanOnFirstMiss:
    """A :class:`kms.keystore.KeyOps` over ``inner`` (which offers ``refresh()``, the
    token rescan): a KeyNotFound for a label not missed before rescans and retries once."""

    def __init__(self, inner: KeyOps) -> None:
        self._inner = inner
        self._missed: set[str] = set()
        self._lock = threading.Lock()
        self.rescans = 0  # how many first-miss rescans ran (for tests and diagnostics)

    def _first_miss(self, label: str) -> bool:
        with self._lock:
            if label in self._missed:
                return False
            self._missed.add(label)
            return True

    def _rescanned(self, key: Key) -> bool:
        """After a KeyNotFound for ``key``: rescan the token if this is the label's first
        miss (True: the caller retries once); False: the miss stands."""
        refresh = getattr(self._inner, "refresh", None)
        if not isinstance(key, KeyRef) or not callable(refresh):
            return False
        if not self._first_miss(key.label):
            return False
        refresh()
        self.rescans += 1
        return True

    # --- KeyOps ---------------------------------------------------------------------------
    # Each method calls the store directly and only on a KeyNotFound goes through the
    # rescan: these are on every exchange's path, so no closure or extra frame per call.
    def hmac(self, key: Key, data: bytes, func: Digest) -> bytes:
        try:
            return self._inner.hmac(key, data, func)
        except KeyNotFound:
            if not self._rescanned(key):
                raise
        return self._inner.hmac(key, data, func)

    def prf(self, key: Key, label: bytes, out_len: int, func: Digest) -> bytes:
        try:
            return self._inner.prf(key, label, out_len, func)
        except KeyNotFound:
            if not self._rescanned(key):
                raise
        return self._inner.prf(key, label, out_len, func)

    def prf_many(
        self, key: Key, requests: Sequence[tuple[bytes, int]], func: Digest
    ) -> list[bytes]:
        try:
            return self._inner.prf_many(key, requests, func)
        except KeyNotFound:
            if not self._rescanned(key):
                raise
        return self._inner.prf_many(key, requests, func)

    def aes_cm(self, key: bytes, iv: bytes, data: bytes) -> bytes:
        return self._inner.aes_cm(key, iv, data)

    def random(self, length: int) -> bytes:
        return self._inner.random(length)

    def rsa_decrypt(self, key: KeyRef, data: bytes, padding: RsaPadding) -> bytes:
        try:
            return self._inner.rsa_decrypt(key, data, padding)
        except KeyNotFound:
            if not self._rescanned(key):
                raise
        return self._inner.rsa_decrypt(key, data, padding)

    def sign(self, key: KeyRef, data: bytes, scheme: SignScheme) -> bytes:
        try:
            return self._inner.sign(key, data, scheme)
        except KeyNotFound:
            if not self._rescanned(key):
                raise
        return self._inner.sign(key, data, scheme)

    def public_key_der(self, key: KeyRef) -> bytes:
        try:
            return self._inner.public_key_der(key)
        except KeyNotFound:
            if not self._rescanned(key):
                raise
        return self._inner.public_key_der(key)

    def __getattr__(self, name: str) -> Any:
        # Anything else the store offers (refresh, close, batch helpers) passes through.
        return getattr(self._inner, name)


__all__ = ["RescanOnFirstMiss"]
