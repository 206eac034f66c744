"""The PKCS#11 key store: :class:`kms.keystore.KeyStore` over a token (SoftHSM2, openCryptoki
or a hardware HSM), composed from the package's parts.

The request-path operations (:class:`kms.keystore.KeyOps`) run here on a pooled session of
the process's shared :class:`~hsm.pkcs11.connection.Token`; long-term secrets through their
working copies and per-message keys as session objects (hsm.pkcs11.working); key
administration (:class:`kms.keystore.KeyAdmin`) is in hsm.pkcs11.admin. PKCS#11 errors become
key-store errors in one place (hsm.pkcs11.errors).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import pkcs11.exceptions as p11e
from pkcs11 import MGF, Mechanism, ObjectClass

from hsm._common import (
    MAX_SECRET_BYTES,
    SEALED_DATA_MESSAGE,
    check_aes_cm,
    raw_ecdsa_to_der,
    scheme_digest,
)
from hsm.config import TokenConfig, TokenConfigError
from hsm.pkcs11 import admin, registry
from hsm.pkcs11.catalogue import lookup
from hsm.pkcs11.connection import DEFAULT_POOL_SIZE, Token
from hsm.pkcs11.mechanisms import MechanismPlan, MechInfo, Operation, Way
from hsm.pkcs11.raw import RawCalls
from hsm.pkcs11.raw import calls_for as raw_calls
from hsm.pkcs11.token_ops import aes_cm_by_ctr, aes_cm_by_ecb, rsa_sign
from kms.keystore import (
    Digest,
    InvalidSealedData,
    Key,
    KeyInfo,
    KeyNotFound,
    KeyRef,
    KeyStoreError,
    KeyType,
    RsaPadding,
    SignScheme,
    UnsupportedOperation,
)
from kms.mikey.prf import HmacFn, prf_over, split_in_key

_R = TypeVar("_R")

HMAC_MECHANISM = {
    Digest.SHA1: Mechanism.SHA_1_HMAC,
    Digest.SHA256: Mechanism.SHA256_HMAC,
}
_HMAC_RAW = {d: (int(m), 32 if d == Digest.SHA256 else 20) for d, m in HMAC_MECHANISM.items()}


class _RawKey:
    """A per-message AES key by handle, with the one method hsm.pkcs11.token_ops uses."""

    __slots__ = ("_handle", "_raw", "_session")

    def __init__(self, raw: RawCalls, session: int, handle: int) -> None:
        self._raw, self._session, self._handle = raw, session, handle

    def encrypt(self, data: bytes, *, mechanism: Mechanism,
                mechanism_param: bytes | None = None, buffer_size: int = 0) -> bytes:
        return self._raw.encrypt(self._session, self._handle, int(mechanism), mechanism_param,
                                 data)


def _handle(obj: Any) -> int:
    """The PKCS#11 handle of a python-pkcs11 object (working copy or stored key)."""
    return int(obj.wrapper.handle)


class Pkcs11KeyStore:
    """:class:`kms.keystore.KeyStore` over a PKCS#11 token. Thread-safe and fork-aware.

    Stores of one process that name the same module share one initialised module, login and
    session pool (hsm.pkcs11.registry); they must then agree on the whole TokenConfig. The
    module is finalised when the last of them is closed.
    """

    def __init__(self, config: TokenConfig, *, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be >= 1")
        if config.token_label is None and config.token_serial is None:
            raise TokenConfigError("token_label or token_serial must be set")
        if not os.path.isfile(config.module):
            raise TokenConfigError(f"PKCS#11 module not found: {config.module}")
        self._config = config
        self._closed = False
        self._token = registry.acquire(config, pool_size)
        # Per-message keys and HMACs straight through the function list (hsm.pkcs11.raw).
        self._raw = raw_calls(config.module)

    def __repr__(self) -> str:
        who = self._config.token_label or self._config.token_serial
        state = "closed" if self._closed else ("up" if self._token.conn_ok() else "down")
        return f"<Pkcs11KeyStore token={who!r} {state}>"

    def _t(self) -> Token:
        if self._closed:
            raise KeyStoreError("key store is closed")
        return self._token

    def _with_missing_refresh(self, key: Key, op: Callable[[], _R]) -> _R:
        """Run ``op``; if a long-term key is not in the handle cache, rescan the token once
        and retry. Keys created by another process (``kms endpoint add`` while ``kms serve``
        runs) become usable without a restart, while the normal path never searches the
        token. Rescans are rate-limited process-wide (MISSING_KEY_RESCAN_S): callers only
        name keys the registry knows, and an unknown identity never reaches the store."""
        try:
            return op()
        except KeyNotFound:
            if not isinstance(key, KeyRef) or not self._token.rescan_for_missing():
                raise
            return op()

    # --- KeyOps: the request path ---------------------------------------------------------
    def hmac(self, key: Key, data: bytes, func: Digest) -> bytes:
        digest = Digest(func)
        return self._with_missing_refresh(key, lambda: self._hmac(key, data, digest))

    def _hmac(self, key: Key, data: bytes, digest: Digest) -> bytes:
        mech, out_len = _HMAC_RAW[digest]
        tok, raw = self._t(), self._raw
        with tok.session("hmac") as (conn, ps):
            sh = ps.session.handle
            if isinstance(key, KeyRef):
                _, obj = tok.objects.working(conn, ps, key.label)
                return raw.sign(sh, _handle(obj), mech, data, out_len)
            with tok.objects.ephemeral_raw(ps, raw, [bytes(key)]) as (h,):
                return raw.sign(sh, h, mech, data, out_len)

    def prf(self, key: Key, label: bytes, out_len: int, func: Digest) -> bytes:
        return self.prf_many(key, [(label, out_len)], func)[0]

    def prf_many(
        self, key: Key, requests: Sequence[tuple[bytes, int]], func: Digest
    ) -> list[bytes]:
        digest = Digest(func)
        if any(n <= 0 for _, n in requests):
            raise ValueError("PRF output length must be positive")
        return self._with_missing_refresh(key, lambda: self._prf_many(key, requests, digest))

    def _prf_many(
        self, key: Key, requests: Sequence[tuple[bytes, int]], digest: Digest
    ) -> list[bytes]:
        mech, out_len = _HMAC_RAW[digest]
        tok, raw = self._t(), self._raw

        def signer(session: int, handle: int) -> HmacFn:
            def fn(data: bytes) -> bytes:
                return raw.sign(session, handle, mech, data, out_len)
            return fn

        with tok.session("prf") as (conn, ps):
            sh = ps.session.handle
            if isinstance(key, KeyRef):
                meta, obj = tok.objects.working(conn, ps, key.label)
                if meta.secret_len > MAX_SECRET_BYTES:
                    # RFC 3830 4.1.2 splits a longer in-key in 256-bit slices: that would
                    # need one token object per slice.
                    raise UnsupportedOperation(
                        f"key {key.label!r} is longer than one PRF slice (32 bytes)"
                    )
                h, sign = _handle(obj), raw.sign
                # One slice and at most one output block, nearly every PRF of an exchange:
                # P = HMAC(s, HMAC(s, label) || label) (RFC 3830 4.1.2), as prf_over does.
                return [
                    sign(sh, h, mech, sign(sh, h, mech, label, out_len) + label, out_len)[:n]
                    if n <= out_len else prf_over([signer(sh, h)], label, n, digest)
                    for label, n in requests
                ]
            # Ephemeral in-key: one session object per 256-bit slice for all the outputs.
            with tok.objects.ephemeral_raw(ps, raw, split_in_key(bytes(key))) as handles:
                if len(handles) == 1:
                    h, sign = handles[0], raw.sign
                    return [
                        sign(sh, h, mech, sign(sh, h, mech, label, out_len) + label,
                             out_len)[:n]
                        if n <= out_len else prf_over([signer(sh, h)], label, n, digest)
                        for label, n in requests
                    ]
                fns = [signer(sh, h) for h in handles]
                return [prf_over(fns, label, n, digest) for label, n in requests]

    def aes_cm(self, key: bytes, iv: bytes, data: bytes) -> bytes:
        check_aes_cm(key, iv)
        if not data:
            return b""
        op = Operation.AES_CM_128 if len(key) == 16 else Operation.AES_CM_256
        tok, raw = self._t(), self._raw
        with tok.session("aes_cm") as (conn, ps):
            method = conn.plan.method(op)
            handle = tok.objects.create_raw(ps, raw, bytes(key), aes=True)
            obj = _RawKey(raw, ps.session.handle, handle)
            try:
                if method.way is Way.ECB_COUNTER_BLOCKS:
                    return aes_cm_by_ecb(obj, iv, data)
                return aes_cm_by_ctr(obj, iv, data)
            finally:
                with contextlib.suppress(p11e.PKCS11Error):
                    tok.objects.destroy_raw(ps, raw, handle)

    def random(self, length: int) -> bytes:
        if length < 0:
            raise ValueError("random length must be >= 0")
        if length == 0:
            return b""
        with self._t().session("random") as (_conn, ps):
            return bytes(ps.session.generate_random(length * 8))

    def rsa_decrypt(self, key: KeyRef, data: bytes, padding: RsaPadding) -> bytes:
        return self._with_missing_refresh(key, lambda: self._rsa_decrypt(key, data, padding))

    def _rsa_decrypt(self, key: KeyRef, data: bytes, padding: RsaPadding) -> bytes:
        oaep: tuple[int, int] | None
        if padding == RsaPadding.PKCS1V15:
            op, mech, oaep = Operation.RSA_DECRYPT_PKCS1V15, Mechanism.RSA_PKCS, None
        elif padding == RsaPadding.OAEP_SHA1:
            # OAEP with SHA-1 / MGF1-SHA-1 and no label: the one OAEP SoftHSM offers
            # (RFC 8017 7.1 with its default parameters).
            op, mech = Operation.RSA_DECRYPT_OAEP_SHA1, Mechanism.RSA_PKCS_OAEP
            oaep = (int(Mechanism.SHA_1), int(MGF.SHA1))
        else:
            raise InvalidSealedData(SEALED_DATA_MESSAGE)
        tok = self._t()
        tok.plan.method(op)  # a padding the module lacks: UnsupportedOperation, not sealed
        with tok.session("rsa_decrypt", sealed=True) as (conn, ps):
            meta, obj = lookup(conn, ps, key.label, ObjectClass.PRIVATE_KEY, (KeyType.RSA,))
            return self._raw.rsa_decrypt(ps.session.handle, _handle(obj), int(mech), data,
                                         (meta.info.length_bits + 7) // 8, oaep)

    def sign(self, key: KeyRef, data: bytes, scheme: SignScheme) -> bytes:
        return self._with_missing_refresh(key, lambda: self._sign(key, data, scheme))

    def _sign(self, key: KeyRef, data: bytes, scheme: SignScheme) -> bytes:
        scheme = SignScheme(scheme)
        with self._t().session("sign") as (conn, ps):
            if scheme == SignScheme.ECDSA_SHA256:
                _, obj = lookup(conn, ps, key.label, ObjectClass.PRIVATE_KEY, (KeyType.EC,))
                conn.plan.method(Operation.SIGN_ECDSA_SHA256)
                # SoftHSM has no CKM_ECDSA_SHA256: hash here, sign the digest with
                # CKM_ECDSA (which signs a given hash; the key stays in the token).
                raw = obj.sign(scheme_digest(scheme, data), mechanism=Mechanism.ECDSA)
                return raw_ecdsa_to_der(bytes(raw))
            _, obj = lookup(conn, ps, key.label, ObjectClass.PRIVATE_KEY, (KeyType.RSA,))
            return rsa_sign(obj, conn.plan, scheme, data)

    def public_key_der(self, key: KeyRef) -> bytes:
        return self._with_missing_refresh(key, lambda: self._public_key_der(key))

    def _public_key_der(self, key: KeyRef) -> bytes:
        with self._t().session("public_key_der") as (conn, _ps):
            meta = conn.keys.get(key.label)
            if meta is None:
                raise KeyNotFound(f"no key labelled {key.label!r}")
            if meta.public_der is None:
                raise UnsupportedOperation(f"key {key.label!r} has no public half")
            return meta.public_der

    # --- KeyAdmin -------------------------------------------------------------------------
    def generate_secret(self, label: str, length: int) -> KeyInfo:
        return admin.generate_secret(self._t(), label, length)

    def import_secret(self, label: str, value: bytes) -> KeyInfo:
        return admin.import_secret(self._t(), label, value)

    def generate_rsa(self, label: str, bits: int) -> KeyInfo:
        return admin.generate_rsa(self._t(), label, bits)

    def generate_ec(self, label: str, curve: str) -> KeyInfo:
        return admin.generate_ec(self._t(), label, curve)

    def delete(self, label: str) -> None:
        admin.delete(self._t(), label)

    def list_keys(self) -> list[KeyInfo]:
        return admin.list_keys(self._t())

    def key_info(self, label: str) -> KeyInfo:
        return admin.key_info(self._t(), label)

    # --- the token as a whole -------------------------------------------------------------
    def refresh(self) -> None:
        """Rescan the token (picks up keys created by other processes, e.g. the admin CLI)."""
        self._t().refresh()

    @property
    def mechanisms(self) -> MechanismPlan:
        """How this module does each KMS operation (read at connect; hsm.pkcs11.mechanisms)."""
        return self._t().plan

    @contextlib.contextmanager
    def probe(self) -> Iterator[tuple[Any, Any, Any, dict[int, MechInfo]]]:
        """For ``kms token check`` (hsm.pkcs11.token_check) only: a pooled python-pkcs11
        session with the module and token objects and the mechanism table, PKCS#11 errors
        converted."""
        tok = self._t()
        with tok.session("token check") as (conn, ps):
            yield conn.lib, conn.token, ps.session, dict(tok.table)

    def require(self, operations: Iterable[Operation | str]) -> None:
        """Refuse (TokenConfigError, one line naming the missing mechanism) a module that
        cannot do one of ``operations``; called when the KMS opens its token."""
        who = self._config.token_label or f"serial {self._config.token_serial}"
        self._t().plan.require(operations, who)

    @property
    def connected(self) -> bool:
        """Whether the token connection is currently believed to be up (no token call)."""
        return not self._closed and self._token.conn_ok()

    def close(self) -> None:
        with registry.lock():
            if self._closed:
                return
            self._closed = True
            registry.release_locked(self._config, self._token)

    def __enter__(self) -> Pkcs11KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["HMAC_MECHANISM", "Pkcs11KeyStore"]
