"""Session objects in the pooled sessions: per-message keys and working copies.

Per-message keys (MPK, TGK, derived encr/auth/salt keys, the KEMAC AES key) become session
objects (CKA_TOKEN false) for one operation and are destroyed afterwards, so that PRF, forking
and KEMAC wrapping all run on the token. Long-term secrets are used through *working copies*
(:meth:`SessionObjects.working`). Object creation and destruction go through one lock
(SoftHSM issue #573, fixed in 2.7.0: concurrent C_CreateObject / C_DestroyObject corrupt its
object store).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pkcs11.exceptions as p11e
from pkcs11 import Attribute, ObjectClass
from pkcs11 import KeyType as P11KeyType

from hsm.pkcs11.catalogue import PADDED_SECRET_BYTES, lookup
from hsm.pkcs11.errors import STALE_HANDLE_ERRORS, UNAVAILABLE_ERRORS
from hsm.pkcs11.raw import RawCalls
from hsm.pkcs11.state import Connection, KeyMeta, PooledSession
from kms.keystore import KeyType

log = logging.getLogger(__name__)

MAX_WORKING_COPIES = 1024  # per pooled session
WORKING_COPY_CHECK_S = 2.0  # how often a working copy's stored object is checked to exist


class SessionObjects:
    """Creates and destroys session objects under the one object lock of a token."""

    # CKA_PRIVATE is false for per-message keys: a session object is visible only inside
    # this process, which holds the same bytes in its own memory, so SoftHSM's in-memory
    # encryption of private attributes protects nothing here, and costs ~15 us per object and
    # ~3 us per HMAC (measured, docs/performance.md). Sensitive and non-extractable as ever.
    EPHEMERAL: ClassVar[dict[Attribute, Any]] = {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.TOKEN: False,
        Attribute.PRIVATE: False,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
    }

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def after_fork(self) -> None:
        """A fresh lock in a forked child (the parent's holder does not exist there)."""
        self.lock = threading.Lock()

    def create_secret(self, ps: PooledSession, value: bytes) -> Any:
        """A generic secret session object for HMAC (C_Sign) holding ``value``."""
        # Zero-pad to the SHA-256 HMAC minimum of SoftHSM: HMAC pads keys with zeros
        # (RFC 2104 section 2), so the result is the same.
        if len(value) < PADDED_SECRET_BYTES:
            value = value + bytes(PADDED_SECRET_BYTES - len(value))
        with self.lock:
            return ps.session.create_object({
                **self.EPHEMERAL,
                Attribute.KEY_TYPE: P11KeyType.GENERIC_SECRET,
                Attribute.SIGN: True,
                Attribute.VALUE: value,
            })

    def create_aes(self, ps: PooledSession, key: bytes) -> Any:
        """An AES session object for encryption (AES-CM keystream) holding ``key``."""
        with self.lock:
            return ps.session.create_object({
                **self.EPHEMERAL,
                Attribute.KEY_TYPE: P11KeyType.AES,
                Attribute.ENCRYPT: True,
                Attribute.VALUE: bytes(key),
            })

    def destroy(self, obj: Any) -> None:
        with self.lock:
            obj.destroy()

    # Per-message keys by handle (hsm.pkcs11.raw: no python-pkcs11 object per key).
    def create_raw(self, ps: PooledSession, raw: RawCalls, value: bytes, *, aes: bool) -> int:
        """:meth:`create_aes` / :meth:`create_secret` as a bare handle."""
        if not aes and len(value) < PADDED_SECRET_BYTES:
            value = value + bytes(PADDED_SECRET_BYTES - len(value))  # as create_secret
        with self.lock:
            return raw.create_session_key(ps.session.handle, value, aes=aes)

    def destroy_raw(self, ps: PooledSession, raw: RawCalls, handle: int) -> None:
        with self.lock:
            raw.destroy(ps.session.handle, handle)

    @contextlib.contextmanager
    def ephemeral_raw(
        self, ps: PooledSession, raw: RawCalls, values: list[bytes]
    ) -> Iterator[list[int]]:
        """:meth:`ephemeral` by handle: HMAC session objects for ``values``, destroyed after."""
        handles: list[int] = []
        try:
            for v in values:
                handles.append(self.create_raw(ps, raw, v, aes=False))
            yield handles
        finally:
            for h in handles:
                with contextlib.suppress(p11e.PKCS11Error):
                    self.destroy_raw(ps, raw, h)

    @contextlib.contextmanager
    def ephemeral(self, ps: PooledSession, values: list[bytes]) -> Iterator[list[Any]]:
        """Session objects for ``values`` for the duration of the block, destroyed after."""
        objs: list[Any] = []
        try:
            for v in values:
                objs.append(self.create_secret(ps, v))
            yield objs
        finally:
            for o in objs:
                with contextlib.suppress(p11e.PKCS11Error):
                    self.destroy(o)

    def working(self, conn: Connection, ps: PooledSession, label: str) -> tuple[KeyMeta, Any]:
        """The object to compute HMACs with for the long-term secret ``label``.

        That is a *working copy*: C_CopyObject of the stored object into a session object of
        this pooled session (CKA_TOKEN false, empty label so that scans ignore it). The copy
        is made inside the token, keeps CKA_SENSITIVE and CKA_EXTRACTABLE (SoftHSM refuses to
        weaken either, measured) and dies with the session, so the key still never leaves
        the token. Why: SoftHSM's file store re-reads an object's
        generation file (open, lock, read, close) on every use of a stored object; a session
        object has no file. HMAC under the stored object 24.7 us, under the copy 11.5 us
        (measured, docs/performance.md). A key deleted here drops its copies; a key replaced
        by another process gets a new label (labels are never reused), so a copy can never
        stand for a different key. Tokens that refuse the copy are used as before.
        """
        meta, stored = lookup(conn, ps, label, ObjectClass.SECRET_KEY, (KeyType.SECRET,))
        entry = ps.working.get(label)
        if entry is not None:
            obj, checked = entry
            now = time.monotonic()
            if now - checked >= WORKING_COPY_CHECK_S:
                # Labels are never reused by the KMS's own tools, but a key deleted or
                # replaced with other tools must not live on in its copy: touch the stored
                # object now and then. A stale handle raises, and the caller reconnects and
                # rescans (which drops every copy).
                stored[Attribute.CLASS]
                ps.working[label] = (obj, now)
            return meta, obj
        if label in conn.no_copy:
            return meta, stored
        try:
            with self.lock:
                obj = stored.copy({Attribute.TOKEN: False, Attribute.LABEL: ""})
        except p11e.PKCS11Error as exc:
            if isinstance(exc, UNAVAILABLE_ERRORS + STALE_HANDLE_ERRORS):
                raise
            log.info("token refused a working copy of %r (%s); using the stored object",
                     label, type(exc).__name__)
            conn.no_copy.add(label)
            return meta, stored
        if len(ps.working) >= MAX_WORKING_COPIES:
            # Bounded: a KMS with many endpoints must not keep a session object per key per
            # pooled session forever. Drop the oldest copy (remade on its next use).
            oldest = next(iter(ps.working))
            old_obj, _ = ps.working.pop(oldest)
            with contextlib.suppress(p11e.PKCS11Error), self.lock:
                old_obj.destroy()
        ps.working[label] = (obj, time.monotonic())
        return meta, obj

    @staticmethod
    def drop_working(conn: Connection, label: str | None = None) -> None:
        """Destroy the working copies of ``label`` (of every key if None).

        Called with the token's gate held exclusive (and the object lock, for a delete).
        """
        for ps in conn.sessions:
            labels = list(ps.working) if label is None else [label]
            for name in labels:
                entry = ps.working.pop(name, None)
                if entry is not None:
                    with contextlib.suppress(p11e.PKCS11Error):
                        entry[0].destroy()
        if label is None:
            conn.no_copy.clear()
        else:
            conn.no_copy.discard(label)


__all__ = ["MAX_WORKING_COPIES", "WORKING_COPY_CHECK_S", "SessionObjects"]
