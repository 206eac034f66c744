"""One initialised module, its login and its session pool: connecting, losing the token,
reconnecting, and fork().

* One login session per process, kept open for the process lifetime (closing the session
  that logged in logs out every session, PKCS#11 v2.40 section 5.6: C_CloseSession), plus a
  fixed pool of sessions for operations; a session is used by one thread at a time.
* :class:`hsm.locking.Gate`: operations hold it shared; connect / reconnect / close / key
  administration / fork() hold it exclusive, so the module is never finalised under a running
  operation.
* Lost token: device/session errors (and a stale handle for a cached long-term key, which is
  how SoftHSM reports a token directory that disappeared) mark the connection broken and
  raise TokenUnavailable (hsm.pkcs11.errors). The next call reconnects (finalise, initialise,
  log in, rescan), at most once per RECONNECT_INTERVAL.
* fork(): the process-global hooks (hsm.pkcs11.registry) hold the gate exclusive across fork
  (so no token call is in flight and no module mutex is held), and the child re-initialises
  the module lazily (a PKCS#11 library must be initialised again in a forked child).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pkcs11
import pkcs11.exceptions as p11e

from hsm.config import TokenConfig, TokenConfigError
from hsm.locking import Gate
from hsm.pkcs11.catalogue import scan
from hsm.pkcs11.errors import (
    UNAVAILABLE_MESSAGE,
    InitFailedError,
    TransientConnectError,
    convert,
)
from hsm.pkcs11.mechanisms import MechanismPlan, MechInfo, plan_for, read_mechanisms
from hsm.pkcs11.module import Module
from hsm.pkcs11.state import Connection, PooledSession
from hsm.pkcs11.working import SessionObjects
from kms.keystore import KeyStoreError, TokenUnavailable

log = logging.getLogger(__name__)


class _Borrowed:
    """``with token.session(what) as (conn, ps)``: a pooled session under the shared gate,
    PKCS#11 errors raised in the block converted once (hsm.pkcs11.errors.convert; a lost
    token marks the connection broken before the session goes back to the pool)."""

    __slots__ = ("_conn", "_gate", "_ps", "_sealed", "_tok", "_what")

    def __init__(self, tok: Token, what: str, sealed: bool) -> None:
        self._tok, self._what, self._sealed = tok, what, sealed

    def __enter__(self) -> tuple[Connection, PooledSession]:
        tok = self._tok
        if tok._closed:
            raise KeyStoreError("key store is closed")
        gate, conn = tok._enter(exclusive=False)
        try:
            ps = conn.idle.get()
        except BaseException:
            gate.release_shared()
            raise
        self._gate, self._conn, self._ps = gate, conn, ps
        return conn, ps

    def __exit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        conn = self._conn
        error: KeyStoreError | None = None
        try:
            if isinstance(exc, p11e.PKCS11Error):
                converted = convert(exc, what=self._what, sealed=self._sealed,
                                    cached_handle=True)
                if converted.broken:
                    conn.broken = True
                    log.warning("token lost during %s (%s)", self._what, type(exc).__name__)
                error = converted.error
        finally:
            try:
                conn.idle.put(self._ps)
            finally:
                self._gate.release_shared()
        if error is not None:
            raise error from None

RECONNECT_INTERVAL = 0.5
"""Seconds between reconnect attempts while the token is gone."""

CONNECT_TRIES_INITIAL = 5
CONNECT_TRIES_RECONNECT = 3
CONNECT_RETRY_DELAY = 0.02
"""Quick retries inside one connect attempt (SoftHSM token.object rewrite race)."""

DEFAULT_POOL_SIZE = 4
"""Operation sessions per process (threads beyond this wait for a free session)."""

MISSING_KEY_RESCAN_S = 1.0
"""At most one rescan per second after handle-cache misses."""


class Token:
    """One initialised module + login + session pool + handle catalogue: one per module and
    process.

    C_Initialize / C_Finalize and the login state are per process and per module, so every
    Pkcs11KeyStore of a process that names the same module shares this object
    (hsm.pkcs11.registry).
    """

    def __init__(self, config: TokenConfig, pool_size: int) -> None:
        self._config = config
        self._pool_size = pool_size
        self._gate = Gate()
        self.objects = SessionObjects()  # per-message keys and working copies
        self._rescan_lock = threading.Lock()
        self._last_rescan = -MISSING_KEY_RESCAN_S
        self._conn: Connection | None = None
        self._module = Module(config)
        self._next_attempt = 0.0
        self._last_failure = "connection lost"
        self._closed = False
        self._pid = os.getpid()
        self._fork_held = False
        self._plan = MechanismPlan({})
        self._table: dict[int, MechInfo] = {}
        with self._gate.exclusive():
            self._conn = self._connect(initial=True)

    def __repr__(self) -> str:
        who = self._config.token_label or self._config.token_serial
        state = "closed" if self._closed else ("up" if self.conn_ok() else "down")
        return f"<Token {who!r} {state}>"

    @property
    def plan(self) -> MechanismPlan:
        """The mechanism plan of the last connection (no token call)."""
        return self._plan

    @property
    def table(self) -> dict[int, MechInfo]:
        """The module's mechanism table read at the last connect (no token call)."""
        return self._table

    @property
    def config(self) -> TokenConfig:
        return self._config

    @property
    def closed(self) -> bool:
        return self._closed

    # --- connection lifecycle -------------------------------------------------------------
    def conn_ok(self) -> bool:
        """Whether the connection is believed to be up (no token call)."""
        c = self._conn
        return c is not None and not c.broken

    def _find_token(self, lib: Any) -> Any:
        cfg = self._config
        kwargs: dict[str, str] = {}
        if cfg.token_label is not None:
            kwargs["token_label"] = cfg.token_label
        if cfg.token_serial is not None:
            kwargs["token_serial"] = cfg.token_serial
        query: dict[str, str | bytes] = dict(kwargs)
        if cfg.token_serial is not None:
            # python-pkcs11 0.10 exposes Token.serial as bytes and compares with ==.
            query["token_serial"] = cfg.token_serial.encode("ascii", "replace")
        try:
            return lib.get_token(**query)
        except p11e.NoSuchToken:
            raise TransientConnectError(f"no token matching {_describe(kwargs)}") from None
        except p11e.MultipleTokensReturned:
            raise TokenConfigError(f"several tokens match {_describe(kwargs)}") from None

    def _connect(self, *, initial: bool) -> Connection:
        """Connect, retrying briefly while the token looks transiently absent. Exclusive.

        SoftHSM 2.6.1 rewrites token.object on every C_Login (measured: its mtime changes),
        so a process initialising while another one logs in can read a torn file and see
        "no such token" or CKR_GENERAL_ERROR. A few quick retries absorb that; PIN errors
        are never retried (a real HSM counts failed logins).
        """
        tries = CONNECT_TRIES_INITIAL if initial else CONNECT_TRIES_RECONNECT
        delay = CONNECT_RETRY_DELAY
        for attempt in range(1, tries + 1):
            try:
                return self._connect_once()
            except TransientConnectError as exc:
                if attempt == tries:
                    raise TokenConfigError(str(exc)) from None
                log.info("token not ready (%s); retrying", exc)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _connect_once(self) -> Connection:
        """Load + initialise the module, log in once, open the pool, scan keys."""
        try:
            lib = self._module.load()
        except InitFailedError as exc:
            with contextlib.suppress(Exception):
                self._module.unload()
            raise TransientConnectError(
                f"C_Initialize of {self._config.module} failed (CKR 0x{exc.rv:x})"
            ) from None
        except p11e.PKCS11Error as exc:
            with contextlib.suppress(Exception):
                self._module.unload()
            raise TransientConnectError(
                f"cannot initialise PKCS#11 module {self._config.module} ({type(exc).__name__})"
            ) from None
        try:
            token = self._find_token(lib)
            table = read_mechanisms(token.slot)
            plan = plan_for(table, has_rng=bool(token.flags & pkcs11.TokenFlag.RNG))
            try:
                login = token.open(rw=True, user_pin=self._config.pin)
            except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange) as exc:
                raise TokenConfigError(
                    f"login to token {token.label!r} failed: PIN rejected ({type(exc).__name__})"
                ) from None
            except p11e.PinLocked:
                raise TokenConfigError(f"login to token {token.label!r} failed: PIN locked") \
                    from None
            except p11e.UserPinNotInitialized:
                raise TokenConfigError(
                    f"login to token {token.label!r} failed: user PIN not initialised"
                ) from None
            # Operation sessions: opened without a PIN, they share the login (PKCS#11 login
            # state is per application and token, not per session).
            sessions = [PooledSession(token.open(rw=True)) for _ in range(self._pool_size)]
            keys = scan(sessions)
        except TokenConfigError:
            with contextlib.suppress(Exception):
                self._module.unload()
            raise
        except p11e.PKCS11Error as exc:
            with contextlib.suppress(Exception):
                self._module.unload()
            raise TransientConnectError(f"cannot open token ({type(exc).__name__})") from None
        idle: queue.SimpleQueue[PooledSession] = queue.SimpleQueue()
        for ps in sessions:
            idle.put(ps)
        log.info("token %s: connected, %d keys cached", token.label, len(keys))
        self._plan = plan
        self._table = table
        return Connection(lib, token, login, sessions, idle, keys, os.getpid(), plan=plan)

    def _teardown(self, conn: Connection | None) -> None:
        """Forget a connection and finalise the module. Exclusive."""
        if conn is not None and conn.pid == os.getpid() and not conn.broken:
            # Orderly: close operation sessions, then the login session (logs out).
            for ps in conn.sessions:
                with contextlib.suppress(Exception):
                    ps.session.close()
            with contextlib.suppress(Exception):
                conn.login_session.close()
        with contextlib.suppress(Exception):
            self._module.unload()

    def _usable_connection(self) -> Connection:
        """The live connection, reconnecting (rate-limited) if it is broken. No lock held."""
        if os.getpid() != self._pid:
            self.fork_child()  # forked without our hooks (e.g. os.fork from C): start over
        conn = self._conn
        if conn is not None and not conn.broken:
            return conn
        with self._gate.exclusive():
            if self._closed:
                raise KeyStoreError("key store is closed")
            conn = self._conn
            if conn is not None and not conn.broken:
                return conn
            now = time.monotonic()
            if now < self._next_attempt:
                raise TokenUnavailable(f"{UNAVAILABLE_MESSAGE} ({self._last_failure})")
            self._next_attempt = now + RECONNECT_INTERVAL
            self._conn = None
            self._teardown(conn)
            try:
                self._conn = self._connect(initial=False)
            except (KeyStoreError, p11e.PKCS11Error, OSError) as exc:
                # Our messages and python-pkcs11's carry no secrets; keep the reason.
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                log.warning("token reconnect failed (%s)", reason)
                self._last_failure = reason
                raise TokenUnavailable(f"{UNAVAILABLE_MESSAGE} (reconnect: {reason})") from None
            log.info("token reconnected")
            return self._conn

    def session(self, what: str, *, sealed: bool = False) -> _Borrowed:
        """Borrow a pooled session under the shared gate; convert PKCS#11 errors once.
        (A plain class, not a generator context manager: it runs on every token call.)"""
        return _Borrowed(self, what, sealed)

    def _enter(self, *, exclusive: bool) -> tuple[Gate, Connection]:
        """Take the gate with a live connection (reconnecting first if needed).

        Another thread may replace the connection between our check and taking the gate;
        then check again rather than fail a call on a token that is fine.
        """
        for _ in range(3):
            conn = self._usable_connection()
            gate = self._gate
            if exclusive:
                gate.acquire_exclusive()
            else:
                gate.acquire_shared()
            if self._conn is conn and not conn.broken:
                return gate, conn
            if exclusive:
                gate.release_exclusive()
            else:
                gate.release_shared()
        raise TokenUnavailable(f"{UNAVAILABLE_MESSAGE} ({self._last_failure})")

    # --- fork -----------------------------------------------------------------------------
    def fork_prepare(self) -> None:
        # No token call may be in flight across fork(): the child could inherit a module
        # mutex held by a thread that does not exist there, and C_Finalize would deadlock.
        if not self._closed:
            self._gate.acquire_exclusive()
            self._fork_held = True

    def fork_parent(self) -> None:
        if self._fork_held:
            self._fork_held = False
            self._gate.release_exclusive()

    def fork_child(self) -> None:
        # Fresh locks (other parent threads do not exist here); the inherited sessions and
        # login belong to the parent: re-initialise the module on the next call.
        self._gate = Gate()
        self.objects.after_fork()
        self._fork_held = False
        self._pid = os.getpid()
        if self._conn is not None:
            self._conn.broken = True
        self._next_attempt = 0.0

    @contextlib.contextmanager
    def manage(self, what: str) -> Iterator[tuple[Connection, PooledSession]]:
        """Exclusive section for key management: no operation runs while the cache changes.

        Creating a stored object costs ~8 ms on SoftHSM (measured); administration is rare.
        """
        if self._closed:
            raise KeyStoreError("key store is closed")
        gate, conn = self._enter(exclusive=True)
        try:
            with self.objects.lock:
                yield conn, conn.sessions[0]
        except p11e.PKCS11Error as exc:
            converted = convert(exc, what=what, sealed=False, cached_handle=False)
            if converted.broken:
                conn.broken = True
            raise converted.error from None
        finally:
            gate.release_exclusive()

    def rescan_for_missing(self) -> bool:
        """Rescan after a cache miss, at most once per MISSING_KEY_RESCAN_S; True if done."""
        now = time.monotonic()
        with self._rescan_lock:
            if now - self._last_rescan < MISSING_KEY_RESCAN_S:
                return False
            self._last_rescan = now
        self.refresh()
        return True

    def refresh(self) -> None:
        """Rescan the token (picks up keys created by other processes, e.g. the admin CLI)."""
        with self.manage("refresh") as (conn, _ps):
            # Copies of keys deleted elsewhere must not outlive them; the rest are remade
            # on first use.
            self.objects.drop_working(conn)
            for ps in conn.sessions:
                ps.bound.clear()
            conn.keys.clear()
            conn.keys.update(scan(conn.sessions))

    def close(self) -> None:
        if self._closed:
            return
        with self._gate.exclusive():
            if self.closed:  # closed by another thread meanwhile (the property re-reads)
                return
            self._closed = True
            conn, self._conn = self._conn, None
            self._teardown(conn)


def _describe(kwargs: dict[str, str]) -> str:
    return ", ".join(f"{k.removeprefix('token_')}={v!r}" for k, v in kwargs.items())


__all__ = [
    "CONNECT_RETRY_DELAY",
    "CONNECT_TRIES_INITIAL",
    "CONNECT_TRIES_RECONNECT",
    "DEFAULT_POOL_SIZE",
    "MISSING_KEY_RESCAN_S",
    "RECONNECT_INTERVAL",
    "Token",
]
