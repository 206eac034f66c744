"""KeyStore over a PKCS#11 token (SoftHSM2 in tests). The only module that imports pkcs11.

Design (facts: /work/shared/notes/pkcs11-softhsm-facts.md):

* Locking: python-pkcs11 calls ``C_Initialize(NULL)``, which makes SoftHSM turn its internal
  locking off; concurrent sessions then crash. Right after python-pkcs11 loads the module we
  re-run ``C_Finalize`` / ``C_Initialize`` through ctypes on the *same* loaded module with
  ``CK_C_INITIALIZE_ARGS.flags = CKF_OS_LOCKING_OK`` (PKCS#11 v2.40 section 5.4 / 11.4), so
  the module's own mutexes protect its state and several sessions may run in parallel.
  python-pkcs11 never calls C_Initialize again (we never use ``lib.reinitialize()``).
* One login session per process, kept open for the process lifetime (closing the session
  that logged in logs out every session), plus a fixed pool of sessions for operations; a
  session is used by one thread at a time.
* Key handles are found in one scan per connection (in each pooled session, because
  python-pkcs11 binds an object to the session it was found in) and cached by label; requests
  never search the token. generate/import/delete update the cache.
* Object creation and destruction go through one lock (SoftHSM issue #573, fixed in 2.7.0).
* :class:`hsm.locking.Gate`: operations hold it shared; connect / reconnect / close / key
  management / fork() hold it exclusive.
* Lost token: device/session errors (and a stale handle for a cached long-term key, which is
  how SoftHSM reports a token directory that disappeared) mark the connection broken and
  raise TokenUnavailable. The next call reconnects (finalise, initialise, log in, rescan),
  at most once per RECONNECT_INTERVAL.
* fork(): os.register_at_fork holds the gate exclusive across fork (so no token call is in
  flight and no module mutex is held), and the child re-initialises the module lazily.
* True secret length: SoftHSM refuses HMAC keys shorter than the digest (20 / 32 bytes), so
  secrets are stored zero-padded to 32 bytes (HMAC zero-pads keys to the block size anyway,
  so HMAC(K || 0..0) == HMAC(K), and keys <= 32 bytes are a single PRF slice). The real
  length is recorded in CKA_ID as ``b"mikey-kms/len=<n>"``: CKA_ID is a standard, searchable
  byte-string attribute that is free for secret keys and survives backups; CKA_VALUE_LEN has
  to be the stored length. Objects without the marker count at their CKA_VALUE_LEN.
"""

from __future__ import annotations

import contextlib
import ctypes
import hmac
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import pkcs11
import pkcs11.exceptions as p11e
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import MGF, Attribute, Mechanism, ObjectClass
from pkcs11 import KeyType as P11KeyType
from pkcs11.util.ec import encode_named_curve_parameters

from hsm import TokenConfig, TokenConfigError
from hsm._common import (
    CURVE_BITS,
    MAX_SECRET_BYTES,
    SEALED_DATA_MESSAGE,
    canonical_curve,
    check_aes_cm,
    check_label,
    check_rsa_bits,
    check_secret_length,
    raw_ecdsa_to_der,
    scheme_digest,
)
from hsm.locking import Gate
from hsm.mechanisms import MechanismPlan, MechInfo, Operation, Way, plan_for, read_mechanisms
from hsm.token_ops import aes_cm_by_ctr, aes_cm_by_ecb, rsa_sign
from kms.keystore import (
    Digest,
    InvalidSealedData,
    Key,
    KeyExists,
    KeyInfo,
    KeyNotFound,
    KeyRef,
    KeyStoreError,
    KeyType,
    RsaPadding,
    SignScheme,
    TokenUnavailable,
    UnsupportedOperation,
)
from kms.mikey.prf import HmacFn, prf_over, split_in_key

log = logging.getLogger(__name__)

T = TypeVar("T")

RECONNECT_INTERVAL = 0.5
"""Seconds between reconnect attempts while the token is gone."""

CONNECT_TRIES_INITIAL = 5
CONNECT_TRIES_RECONNECT = 3
CONNECT_RETRY_DELAY = 0.02
"""Quick retries inside one connect attempt (SoftHSM token.object rewrite race)."""

DEFAULT_POOL_SIZE = 4
"""Operation sessions per process (threads beyond this wait for a free session)."""

PADDED_SECRET_BYTES = 32
"""Stored length of secrets: SoftHSM's minimum for CKM_SHA256_HMAC (20 for SHA-1)."""

LEN_MARKER = b"mikey-kms/len="
"""CKA_ID prefix recording a secret's true length (see module docstring)."""

UNAVAILABLE_MESSAGE = "token unavailable"

_HMAC_MECHANISM = {
    Digest.SHA1: Mechanism.SHA_1_HMAC,
    Digest.SHA256: Mechanism.SHA256_HMAC,
}

_CKF_OS_LOCKING_OK = 0x00000002
_CKR_OK = 0
_CKR_CRYPTOKI_NOT_INITIALIZED = 0x190


# --- error conversion: the ONE place where PKCS#11 errors become key-store errors -----------

# The token / session went away: transient, the store reconnects on a later call.
_UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.SessionCount,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.DeviceRemoved,
    p11e.DeviceError,
    p11e.DeviceMemory,
    p11e.UserNotLoggedIn,
    p11e.SlotIDInvalid,
    p11e.NoSuchToken,
)
# A cached long-term key's handle is no longer valid: SoftHSM reports a removed token
# directory this way (measured). Our own deletes update the cache, so this means the token
# changed under us: reconnect and rescan.
_STALE_HANDLE_ERRORS: tuple[type[Exception], ...] = (
    p11e.ObjectHandleInvalid,
    p11e.KeyHandleInvalid,
)
# Bad ciphertext / parameters: the data is wrong, never retried.
_SEALED_ERRORS: tuple[type[Exception], ...] = (
    p11e.EncryptedDataInvalid,
    p11e.EncryptedDataLenRange,
    p11e.DataInvalid,
    p11e.DataLenRange,
    p11e.MechanismParamInvalid,
    p11e.WrappedKeyInvalid,
    p11e.WrappedKeyLenRange,
)
_UNSUPPORTED_ERRORS: tuple[type[Exception], ...] = (
    p11e.MechanismInvalid,
    p11e.KeySizeRange,
    p11e.KeyTypeInconsistent,
    p11e.FunctionNotSupported,
)


def _is_not_initialized(exc: BaseException) -> bool:
    # python-pkcs11 has no class for CKR_CRYPTOKI_NOT_INITIALIZED; it raises PKCS11Error with
    # a fixed text.
    return type(exc) is p11e.PKCS11Error and "not initialized" in str(exc)


@dataclass(frozen=True)
class _Converted:
    error: KeyStoreError
    broken: bool  # the connection must be rebuilt


def _convert(exc: BaseException, *, what: str, sealed: bool, cached_handle: bool) -> _Converted:
    """Map a PKCS#11 error deliberately (facts note: never treat every error as transient).

    Messages name the operation and the PKCS#11 error class only: never data or key values.
    """
    name = type(exc).__name__
    if isinstance(exc, _UNAVAILABLE_ERRORS) or _is_not_initialized(exc):
        return _Converted(TokenUnavailable(f"{UNAVAILABLE_MESSAGE} ({what}: {name})"), True)
    if isinstance(exc, _STALE_HANDLE_ERRORS) and cached_handle:
        return _Converted(TokenUnavailable(f"{UNAVAILABLE_MESSAGE} ({what}: {name})"), True)
    if sealed:
        # rsa_decrypt: one fixed message whatever the token said (no padding oracle).
        return _Converted(InvalidSealedData(SEALED_DATA_MESSAGE), False)
    if isinstance(exc, _SEALED_ERRORS):
        return _Converted(KeyStoreError(f"{what} rejected its input ({name})"), False)
    if isinstance(exc, _UNSUPPORTED_ERRORS):
        return _Converted(UnsupportedOperation(f"{what} not supported by the token ({name})"),
                          False)
    return _Converted(KeyStoreError(f"{what} failed ({name})"), False)


# --- ctypes: re-initialise the loaded module with CKF_OS_LOCKING_OK -------------------------


class _CkCInitializeArgs(ctypes.Structure):
    _fields_ = (
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    )


class _CkVersion(ctypes.Structure):
    _fields_ = (("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte))


_CkInitFn = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)


class _CkFunctionListHead(ctypes.Structure):
    # The first members of CK_FUNCTION_LIST: enough to reach C_Initialize and C_Finalize.
    _fields_ = (
        ("version", _CkVersion),
        ("C_Initialize", _CkInitFn),
        ("C_Finalize", _CkInitFn),
    )


class _ModuleControl:
    """C_Initialize / C_Finalize of a loaded module through its function list.

    ctypes.CDLL on the path python-pkcs11 loaded returns the same dlopen handle, so this
    drives the very instance python-pkcs11 uses. Holding the CDLL also keeps the module
    mapped across ``pkcs11.unload()``, which is harmless: after C_Finalize it is clean.
    """

    def __init__(self, path: str) -> None:
        self._dll = ctypes.CDLL(path)
        get = self._dll.C_GetFunctionList
        get.argtypes = [ctypes.POINTER(ctypes.POINTER(_CkFunctionListHead))]
        get.restype = ctypes.c_ulong
        ptr = ctypes.POINTER(_CkFunctionListHead)()
        rv = get(ctypes.byref(ptr))
        if rv != _CKR_OK or not ptr:
            raise TokenConfigError(f"C_GetFunctionList failed (CKR 0x{rv:x})")
        self._fl = ptr.contents
        self._args = _CkCInitializeArgs(flags=_CKF_OS_LOCKING_OK)

    def finalize(self) -> int:
        return int(self._fl.C_Finalize(None))

    def initialize_with_os_locking(self) -> int:
        return int(self._fl.C_Initialize(ctypes.addressof(self._args)))


# --- connection state ---------------------------------------------------------------------


@dataclass
class _KeyMeta:
    info: KeyInfo
    handles: dict[int, int]  # ObjectClass -> object handle (same in every session)
    secret_len: int = 0  # true length of a secret key
    stored_len: int = 0
    public_der: bytes | None = None


@dataclass(eq=False)
class _PooledSession:
    session: Any  # pkcs11.Session
    # label -> {ObjectClass: pkcs11 Object bound to THIS session}
    bound: dict[str, dict[int, Any]] = field(default_factory=dict)
    # label -> (this session's working copy of a long-term secret, when its stored object
    # was last seen valid); see _Token._working
    working: dict[str, tuple[Any, float]] = field(default_factory=dict)


@dataclass(eq=False)
class _Connection:
    lib: Any
    token: Any
    login_session: Any
    sessions: list[_PooledSession]
    idle: queue.SimpleQueue[_PooledSession]
    keys: dict[str, _KeyMeta]
    pid: int
    broken: bool = False
    # Labels whose working copy the token refused (CKA_COPYABLE false, or no C_CopyObject):
    # those keys are used as the stored objects themselves.
    no_copy: set[str] = field(default_factory=set)
    # How each operation is done on this module (hsm.mechanisms), read once per connection.
    plan: MechanismPlan = field(default_factory=lambda: MechanismPlan({}))


MAX_WORKING_COPIES = 1024  # per pooled session
WORKING_COPY_CHECK_S = 2.0  # how often a working copy's stored object is checked to exist
MISSING_KEY_RESCAN_S = 1.0  # at most one rescan per second after handle-cache misses
_R = TypeVar("_R")

_LIVE_TOKENS: weakref.WeakSet[_Token] = weakref.WeakSet()
_REGISTRY_LOCK = threading.Lock()
_OPEN: dict[str, _Shared] = {}  # module path -> the one open token of this process


@dataclass(eq=False)
class _Shared:
    token: _Token
    users: int


def _before_fork() -> None:
    # Lock order everywhere: _REGISTRY_LOCK, then a token's gate.
    _REGISTRY_LOCK.acquire()
    for tok in list(_LIVE_TOKENS):
        tok._fork_prepare()


def _after_fork_parent() -> None:
    for tok in list(_LIVE_TOKENS):
        tok._fork_parent()
    _REGISTRY_LOCK.release()


def _after_fork_child() -> None:
    global _REGISTRY_LOCK
    for tok in list(_LIVE_TOKENS):
        tok._fork_child()
    _REGISTRY_LOCK = threading.Lock()  # the parent's holder does not exist here


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_parent, after_in_child=_after_fork_child
)


def _same_config(a: TokenConfig, b: TokenConfig) -> bool:
    return (
        (a.module, a.token_label, a.token_serial, a.softhsm_conf)
        == (b.module, b.token_label, b.token_serial, b.softhsm_conf)
        and hmac.compare_digest(a.pin.encode(), b.pin.encode())
    )


class _Token:
    """One initialised module + login + session pool + handle cache: one per module/process.

    C_Initialize / C_Finalize and the login state are per process and per module, so every
    Pkcs11KeyStore of a process that names the same module shares this object.
    """

    def __init__(self, config: TokenConfig, pool_size: int) -> None:
        self._config = config
        self._pool_size = pool_size
        self._gate = Gate()
        self._object_lock = threading.Lock()  # SoftHSM #573: create/destroy serialised
        self._rescan_lock = threading.Lock()
        self._last_rescan = -MISSING_KEY_RESCAN_S
        self._conn: _Connection | None = None
        self._ctl: _ModuleControl | None = None
        self._next_attempt = 0.0
        self._last_failure = "connection lost"
        self._closed = False
        self._pid = os.getpid()
        self._fork_held = False
        self._plan = MechanismPlan({})
        self._table: dict[int, MechInfo] = {}
        with self._gate.exclusive():
            self._conn = self._connect(initial=True)
        _LIVE_TOKENS.add(self)

    def __repr__(self) -> str:
        who = self._config.token_label or self._config.token_serial
        state = "closed" if self._closed else ("up" if self._conn_ok() else "down")
        return f"<_Token {who!r} {state}>"

    @property
    def plan(self) -> MechanismPlan:
        """The mechanism plan of the last connection (no token call)."""
        return self._plan

    # --- connection lifecycle -------------------------------------------------------------
    def _conn_ok(self) -> bool:
        c = self._conn
        return c is not None and not c.broken

    def _load_module(self) -> Any:
        cfg = self._config
        if cfg.softhsm_conf is not None:
            # SoftHSM reads SOFTHSM2_CONF in C_Initialize: set it before every (re)load.
            os.environ["SOFTHSM2_CONF"] = cfg.softhsm_conf
        lib = pkcs11.lib(cfg.module)
        if self._ctl is None:
            self._ctl = _ModuleControl(cfg.module)
        # python-pkcs11 initialised with NULL args (no locking); redo it with OS locking.
        self._ctl.finalize()
        rv = self._ctl.initialize_with_os_locking()
        if rv != _CKR_OK:
            raise _InitFailedError(rv)
        return lib

    def _unload_module(self) -> None:
        if self._ctl is not None:
            # Ignore the result: the module may already be uninitialised (lost token, child
            # after fork that never connected).
            self._ctl.finalize()
        # python-pkcs11 still believes it initialised the module; unload() forgets that (its
        # own C_Finalize then returns CKR_CRYPTOKI_NOT_INITIALIZED, which it ignores).
        pkcs11.unload(self._config.module)

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
            raise _TransientConnectError(f"no token matching {_describe(kwargs)}") from None
        except p11e.MultipleTokensReturned:
            raise TokenConfigError(f"several tokens match {_describe(kwargs)}") from None

    def _connect(self, *, initial: bool) -> _Connection:
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
            except _TransientConnectError as exc:
                if attempt == tries:
                    raise TokenConfigError(str(exc)) from None
                log.info("token not ready (%s); retrying", exc)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _connect_once(self) -> _Connection:
        """Load + initialise the module, log in once, open the pool, scan keys."""
        try:
            lib = self._load_module()
        except _InitFailedError as exc:
            with contextlib.suppress(Exception):
                self._unload_module()
            raise _TransientConnectError(
                f"C_Initialize of {self._config.module} failed (CKR 0x{exc.rv:x})"
            ) from None
        except p11e.PKCS11Error as exc:
            with contextlib.suppress(Exception):
                self._unload_module()
            raise _TransientConnectError(
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
            sessions = [_PooledSession(token.open(rw=True)) for _ in range(self._pool_size)]
            keys = self._scan(sessions)
        except TokenConfigError:
            with contextlib.suppress(Exception):
                self._unload_module()
            raise
        except p11e.PKCS11Error as exc:
            with contextlib.suppress(Exception):
                self._unload_module()
            raise _TransientConnectError(f"cannot open token ({type(exc).__name__})") from None
        idle: queue.SimpleQueue[_PooledSession] = queue.SimpleQueue()
        for ps in sessions:
            idle.put(ps)
        log.info("token %s: connected, %d keys cached", token.label, len(keys))
        self._plan = plan
        self._table = table
        return _Connection(lib, token, login, sessions, idle, keys, os.getpid(), plan=plan)

    def _scan(self, sessions: list[_PooledSession]) -> dict[str, _KeyMeta]:
        """The one scan of the token: metadata from session 0, bindings in every session."""
        keys: dict[str, _KeyMeta] = {}
        first = sessions[0]
        for obj in first.session.get_objects():
            self._remember(keys, first, obj)
        wanted = {h for m in keys.values() for h in m.handles.values()}
        for ps in sessions[1:]:
            self._bind_all(ps, keys, wanted)
        return keys

    def _bind_all(self, ps: _PooledSession, keys: dict[str, _KeyMeta], wanted: set[int]) -> None:
        by_handle = {h: (label, cls) for label, m in keys.items() for cls, h in m.handles.items()}
        for obj in ps.session.get_objects():
            if obj.handle in wanted:
                label, cls = by_handle[obj.handle]
                ps.bound.setdefault(label, {})[cls] = obj

    def _remember(self, keys: dict[str, _KeyMeta], ps: _PooledSession, obj: Any) -> None:
        """Describe one object found on the token (no values read) and bind it in ``ps``."""
        try:
            cls = obj[Attribute.CLASS]
            label = obj[Attribute.LABEL]
        except p11e.PKCS11Error:
            return
        if not label or cls not in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY,
                                    ObjectClass.PUBLIC_KEY):
            return  # certificates, data objects, unlabelled keys: not ours to serve
        meta = keys.get(label)
        if meta is not None and int(cls) in meta.handles:
            log.warning("token holds several %s objects labelled %r; using the first",
                        cls.name, label)
            return
        if cls == ObjectClass.SECRET_KEY:
            if meta is not None:
                log.warning("label %r names a secret and a key pair; ignoring the secret", label)
                return
            meta = self._describe_secret(label, obj)
        elif cls == ObjectClass.PRIVATE_KEY:
            if meta is not None and meta.info.key_type == KeyType.SECRET:
                return
            described = self._describe_private(label, obj)
            if described is None:
                return
            if meta is not None:  # the public half came first
                described.handles.update(meta.handles)
                described.public_der = meta.public_der or described.public_der
            meta = described
        else:  # public key
            der = _public_der(obj)
            if meta is None:
                # Placeholder until the private half shows up; dropped if it never does.
                meta = _KeyMeta(KeyInfo(label, KeyType.RSA, 0, False, True), {}, public_der=der)
            elif meta.info.key_type == KeyType.SECRET:
                return
            else:
                meta.public_der = der or meta.public_der
        meta.handles[int(cls)] = obj.handle
        keys[label] = meta
        ps.bound.setdefault(label, {})[int(cls)] = obj

    @staticmethod
    def _describe_secret(label: str, obj: Any) -> _KeyMeta:
        attrs = obj.get_attributes([
            Attribute.KEY_TYPE, Attribute.VALUE_LEN, Attribute.ID, Attribute.SENSITIVE,
            Attribute.EXTRACTABLE, Attribute.ALWAYS_SENSITIVE, Attribute.NEVER_EXTRACTABLE,
        ])
        stored = int(attrs.get(Attribute.VALUE_LEN, 0))
        true_len = _true_length(attrs.get(Attribute.ID), stored)
        kt = KeyType.AES if attrs.get(Attribute.KEY_TYPE) == P11KeyType.AES else KeyType.SECRET
        info = KeyInfo(
            label, kt, true_len * 8,
            sensitive=bool(attrs.get(Attribute.SENSITIVE, False)),
            extractable=bool(attrs.get(Attribute.EXTRACTABLE, True)),
            always_sensitive=bool(attrs.get(Attribute.ALWAYS_SENSITIVE, False)),
            never_extractable=bool(attrs.get(Attribute.NEVER_EXTRACTABLE, False)),
        )
        return _KeyMeta(info, {}, secret_len=true_len, stored_len=stored)

    @staticmethod
    def _describe_private(label: str, obj: Any) -> _KeyMeta | None:
        attrs = obj.get_attributes([
            Attribute.KEY_TYPE, Attribute.SENSITIVE, Attribute.EXTRACTABLE,
            Attribute.ALWAYS_SENSITIVE, Attribute.NEVER_EXTRACTABLE,
        ])
        kt = attrs.get(Attribute.KEY_TYPE)
        der: bytes | None = None
        if kt == P11KeyType.RSA:
            n = obj[Attribute.MODULUS]
            e = obj[Attribute.PUBLIC_EXPONENT]
            bits = int.from_bytes(n, "big").bit_length()
            der = _rsa_der(n, e)
            key_type = KeyType.RSA
        elif kt == P11KeyType.EC:
            curve = _curve_from_params(obj[Attribute.EC_PARAMS])
            if curve is None:
                return None
            bits = CURVE_BITS[curve]
            key_type = KeyType.EC
        else:
            return None
        info = KeyInfo(
            label, key_type, bits,
            sensitive=bool(attrs.get(Attribute.SENSITIVE, False)),
            extractable=bool(attrs.get(Attribute.EXTRACTABLE, True)),
            always_sensitive=bool(attrs.get(Attribute.ALWAYS_SENSITIVE, False)),
            never_extractable=bool(attrs.get(Attribute.NEVER_EXTRACTABLE, False)),
        )
        return _KeyMeta(info, {}, public_der=der)

    def _teardown(self, conn: _Connection | None) -> None:
        """Forget a connection and finalise the module. Exclusive."""
        if conn is not None and conn.pid == os.getpid() and not conn.broken:
            # Orderly: close operation sessions, then the login session (logs out).
            for ps in conn.sessions:
                with contextlib.suppress(Exception):
                    ps.session.close()
            with contextlib.suppress(Exception):
                conn.login_session.close()
        with contextlib.suppress(Exception):
            self._unload_module()

    def _usable_connection(self) -> _Connection:
        """The live connection, reconnecting (rate-limited) if it is broken. No lock held."""
        if os.getpid() != self._pid:
            self._fork_child()  # forked without our hooks (e.g. os.fork from C): start over
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

    @contextlib.contextmanager
    def _session(self, what: str, *, sealed: bool = False) -> Iterator[
            tuple[_Connection, _PooledSession]]:
        """Borrow a pooled session under the shared gate; convert PKCS#11 errors once."""
        if self._closed:
            raise KeyStoreError("key store is closed")
        gate, conn = self._enter(exclusive=False)
        try:
            ps = conn.idle.get()
            try:
                yield conn, ps
            except p11e.PKCS11Error as exc:
                converted = _convert(exc, what=what, sealed=sealed, cached_handle=True)
                if converted.broken:
                    conn.broken = True
                    log.warning("token lost during %s (%s)", what, type(exc).__name__)
                raise converted.error from None
            finally:
                conn.idle.put(ps)
        finally:
            gate.release_shared()

    def _enter(self, *, exclusive: bool) -> tuple[Gate, _Connection]:
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
    def _fork_prepare(self) -> None:
        # No token call may be in flight across fork(): the child could inherit a module
        # mutex held by a thread that does not exist there, and C_Finalize would deadlock.
        if not self._closed:
            self._gate.acquire_exclusive()
            self._fork_held = True

    def _fork_parent(self) -> None:
        if self._fork_held:
            self._fork_held = False
            self._gate.release_exclusive()

    def _fork_child(self) -> None:
        # Fresh locks (other parent threads do not exist here); the inherited sessions and
        # login belong to the parent: re-initialise the module on the next call.
        self._gate = Gate()
        self._object_lock = threading.Lock()
        self._fork_held = False
        self._pid = os.getpid()
        if self._conn is not None:
            self._conn.broken = True
        self._next_attempt = 0.0

    # --- session-object helpers (ephemeral keys) ------------------------------------------
    # Per-message keys (MPK, TGK, derived encr/auth/salt keys) become session objects for
    # one operation. CKA_PRIVATE is false for them: a session object is visible only inside
    # this process, which holds the same bytes in its own memory, so SoftHSM's in-memory
    # encryption of private attributes protects nothing here, and costs ~15 us per object and
    # ~3 us per HMAC (measured, docs/performance.md). Sensitive and non-extractable as ever.
    _EPHEMERAL: ClassVar[dict[Attribute, Any]] = {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.TOKEN: False,
        Attribute.PRIVATE: False,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
    }

    def _create_session_secret(self, ps: _PooledSession, value: bytes) -> Any:
        # Zero-pad to the SHA-256 HMAC minimum (facts note): HMAC pads keys with zeros.
        if len(value) < PADDED_SECRET_BYTES:
            value = value + bytes(PADDED_SECRET_BYTES - len(value))
        with self._object_lock:
            return ps.session.create_object({
                **self._EPHEMERAL,
                Attribute.KEY_TYPE: P11KeyType.GENERIC_SECRET,
                Attribute.SIGN: True,
                Attribute.VALUE: value,
            })

    def _destroy(self, obj: Any) -> None:
        with self._object_lock:
            obj.destroy()

    @contextlib.contextmanager
    def _ephemeral(self, ps: _PooledSession, values: list[bytes]) -> Iterator[list[Any]]:
        objs: list[Any] = []
        try:
            for v in values:
                objs.append(self._create_session_secret(ps, v))
            yield objs
        finally:
            for o in objs:
                with contextlib.suppress(p11e.PKCS11Error):
                    self._destroy(o)

    def _working(self, conn: _Connection, ps: _PooledSession,
                 label: str) -> tuple[_KeyMeta, Any]:
        """The object to compute HMACs with for the long-term secret ``label``.

        That is a *working copy*: C_CopyObject of the stored object into a session object of
        this pooled session (CKA_TOKEN false, empty label so that scans ignore it). The copy
        is made inside the token, keeps CKA_SENSITIVE and CKA_EXTRACTABLE (SoftHSM refuses to
        weaken either, measured) and dies with the session, so the key still never leaves
        the token. Why: SoftHSM's file store re-reads an object's generation file (open,
        lock, read, close) on every use of a stored object; a session object has no file.
        HMAC under the stored object 24.7 us, under the copy 11.5 us (measured,
        docs/performance.md). A key deleted here drops its copies; a key replaced by another
        process gets a new label (labels are never reused), so a copy can never stand for a
        different key. Tokens that refuse the copy are used as before.
        """
        meta, stored = self._bound(conn, ps, label, ObjectClass.SECRET_KEY, (KeyType.SECRET,))
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
            with self._object_lock:
                obj = stored.copy({Attribute.TOKEN: False, Attribute.LABEL: ""})
        except p11e.PKCS11Error as exc:
            if isinstance(exc, _UNAVAILABLE_ERRORS + _STALE_HANDLE_ERRORS):
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
            with contextlib.suppress(p11e.PKCS11Error), self._object_lock:
                old_obj.destroy()
        ps.working[label] = (obj, time.monotonic())
        return meta, obj

    def _drop_working(self, conn: _Connection, label: str | None = None) -> None:
        """Destroy the working copies of ``label`` (of every key if None). Exclusive."""
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

    def _bound(self, conn: _Connection, ps: _PooledSession, label: str, cls: ObjectClass,
               kinds: tuple[KeyType, ...]) -> tuple[_KeyMeta, Any]:
        meta = conn.keys.get(label)
        if meta is None:
            raise KeyNotFound(f"no key labelled {label!r}")
        if meta.info.key_type not in kinds or int(cls) not in meta.handles:
            raise UnsupportedOperation(f"key {label!r} cannot be used for this operation")
        return meta, ps.bound[label][int(cls)]

    # --- operations -----------------------------------------------------------------------
    def hmac(self, key: Key, data: bytes, func: Digest) -> bytes:
        mech = _HMAC_MECHANISM[Digest(func)]
        with self._session("hmac") as (conn, ps):
            if isinstance(key, KeyRef):
                _, obj = self._working(conn, ps, key.label)
                return bytes(obj.sign(data, mechanism=mech))
            with self._ephemeral(ps, [bytes(key)]) as (obj,):
                return bytes(obj.sign(data, mechanism=mech))

    def prf(self, key: Key, label: bytes, out_len: int, func: Digest) -> bytes:
        return self.prf_many(key, [(label, out_len)], func)[0]

    def prf_many(
        self, key: Key, requests: Sequence[tuple[bytes, int]], func: Digest
    ) -> list[bytes]:
        func = Digest(func)
        mech = _HMAC_MECHANISM[func]

        def signer(obj: Any) -> HmacFn:
            def fn(data: bytes) -> bytes:
                return bytes(obj.sign(data, mechanism=mech))
            return fn

        if any(n <= 0 for _, n in requests):
            raise ValueError("PRF output length must be positive")
        with self._session("prf") as (conn, ps):
            if isinstance(key, KeyRef):
                meta, obj = self._working(conn, ps, key.label)
                if meta.secret_len > MAX_SECRET_BYTES:
                    # Would need one token object per 256-bit slice (reference section 12).
                    raise UnsupportedOperation(
                        f"key {key.label!r} is longer than one PRF slice (32 bytes)"
                    )
                fns = [signer(obj)]
                return [prf_over(fns, label, n, func) for label, n in requests]
            # Ephemeral in-key: one session object per 256-bit slice for all the outputs.
            with self._ephemeral(ps, split_in_key(bytes(key))) as objs:
                fns = [signer(o) for o in objs]
                return [prf_over(fns, label, n, func) for label, n in requests]

    def aes_cm(self, key: bytes, iv: bytes, data: bytes) -> bytes:
        check_aes_cm(key, iv)
        if not data:
            return b""
        op = Operation.AES_CM_128 if len(key) == 16 else Operation.AES_CM_256
        with self._session("aes_cm") as (conn, ps):
            method = conn.plan.method(op)
            with self._object_lock:
                obj = ps.session.create_object({
                    **self._EPHEMERAL,
                    Attribute.KEY_TYPE: P11KeyType.AES,
                    Attribute.ENCRYPT: True,
                    Attribute.VALUE: bytes(key),
                })
            try:
                if method.way is Way.ECB_COUNTER_BLOCKS:
                    return aes_cm_by_ecb(obj, iv, data)
                return aes_cm_by_ctr(obj, iv, data)
            finally:
                with contextlib.suppress(p11e.PKCS11Error):
                    self._destroy(obj)

    def random(self, length: int) -> bytes:
        if length < 0:
            raise ValueError("random length must be >= 0")
        if length == 0:
            return b""
        with self._session("random") as (_conn, ps):
            return bytes(ps.session.generate_random(length * 8))

    def rsa_decrypt(self, key: KeyRef, data: bytes, padding: RsaPadding) -> bytes:
        if padding == RsaPadding.PKCS1V15:
            op, mech, param = Operation.RSA_DECRYPT_PKCS1V15, Mechanism.RSA_PKCS, None
        elif padding == RsaPadding.OAEP_SHA1:
            # SoftHSM: OAEP with SHA-1 / MGF1-SHA-1 and no label only (facts note).
            op, mech = Operation.RSA_DECRYPT_OAEP_SHA1, Mechanism.RSA_PKCS_OAEP
            param = (Mechanism.SHA_1, MGF.SHA1, None)
        else:
            raise InvalidSealedData(SEALED_DATA_MESSAGE)
        self._plan.method(op)  # a padding the module lacks: UnsupportedOperation, not sealed
        with self._session("rsa_decrypt", sealed=True) as (conn, ps):
            _, obj = self._bound(conn, ps, key.label, ObjectClass.PRIVATE_KEY, (KeyType.RSA,))
            return bytes(obj.decrypt(data, mechanism=mech, mechanism_param=param))

    def sign(self, key: KeyRef, data: bytes, scheme: SignScheme) -> bytes:
        scheme = SignScheme(scheme)
        with self._session("sign") as (conn, ps):
            if scheme == SignScheme.ECDSA_SHA256:
                _, obj = self._bound(conn, ps, key.label, ObjectClass.PRIVATE_KEY, (KeyType.EC,))
                conn.plan.method(Operation.SIGN_ECDSA_SHA256)
                # SoftHSM has no CKM_ECDSA_SHA256: hash here, sign the digest raw (facts note).
                raw = obj.sign(scheme_digest(scheme, data), mechanism=Mechanism.ECDSA)
                return raw_ecdsa_to_der(bytes(raw))
            _, obj = self._bound(conn, ps, key.label, ObjectClass.PRIVATE_KEY, (KeyType.RSA,))
            return rsa_sign(obj, conn.plan, scheme, data)

    def public_key_der(self, key: KeyRef) -> bytes:
        with self._session("public_key_der") as (conn, _ps):
            meta = conn.keys.get(key.label)
            if meta is None:
                raise KeyNotFound(f"no key labelled {key.label!r}")
            if meta.public_der is None:
                raise UnsupportedOperation(f"key {key.label!r} has no public half")
            return meta.public_der

    # --- management -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _manage(self, what: str) -> Iterator[tuple[_Connection, _PooledSession]]:
        """Exclusive section for key management: no operation runs while the cache changes.

        Creating a stored object costs ~8 ms (facts note); management is rare.
        """
        if self._closed:
            raise KeyStoreError("key store is closed")
        gate, conn = self._enter(exclusive=True)
        try:
            with self._object_lock:
                yield conn, conn.sessions[0]
        except p11e.PKCS11Error as exc:
            converted = _convert(exc, what=what, sealed=False, cached_handle=False)
            if converted.broken:
                conn.broken = True
            raise converted.error from None
        finally:
            gate.release_exclusive()

    def _check_new_label(self, conn: _Connection, label: str) -> None:
        check_label(label)
        if label in conn.keys:
            raise KeyExists(f"a key labelled {label!r} already exists")

    def _adopt(self, conn: _Connection, label: str, objs: list[Any]) -> KeyInfo:
        """Put freshly created objects into the cache and bind them in every session."""
        first = conn.sessions[0]
        for obj in objs:
            self._remember(conn.keys, first, obj)
        meta = conn.keys[label]
        for ps in conn.sessions[1:]:
            for obj in ps.session.get_objects({Attribute.LABEL: label}):
                for cls, h in meta.handles.items():
                    if obj.handle == h:
                        ps.bound.setdefault(label, {})[cls] = obj
        return meta.info

    _SECRET_TEMPLATE: ClassVar[dict[Attribute, Any]] = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        # HMAC only: C_Sign / C_Verify (PKCS#11 "generic secret" with SIGN/VERIFY).
        Attribute.SIGN: True,
        Attribute.VERIFY: True,
        Attribute.ENCRYPT: False,
        Attribute.DECRYPT: False,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }

    def generate_secret(self, label: str, length: int) -> KeyInfo:
        check_secret_length(length)
        with self._manage("generate_secret") as (conn, ps):
            self._check_new_label(conn, label)
            ident = LEN_MARKER + str(length).encode()
            if length == PADDED_SECRET_BYTES:
                # Generated inside the token: ALWAYS_SENSITIVE / NEVER_EXTRACTABLE stay true.
                obj = ps.session.generate_key(
                    P11KeyType.GENERIC_SECRET, 8 * length, label=label, id=ident, store=True,
                    template=dict(self._SECRET_TEMPLATE),
                )
            else:
                # A shorter key must be zero-padded, which C_GenerateKey cannot do: take the
                # token's RNG and import. The value passes host memory once, so the token
                # reports ALWAYS_SENSITIVE = NEVER_EXTRACTABLE = false.
                value = bytearray(ps.session.generate_random(8 * length))
                obj = self._create_secret(ps, label, ident, value)
            return self._adopt(conn, label, [obj])

    def import_secret(self, label: str, value: bytes) -> KeyInfo:
        check_secret_length(len(value))
        with self._manage("import_secret") as (conn, ps):
            self._check_new_label(conn, label)
            ident = LEN_MARKER + str(len(value)).encode()
            obj = self._create_secret(ps, label, ident, bytearray(value))
            return self._adopt(conn, label, [obj])

    def _create_secret(self, ps: _PooledSession, label: str, ident: bytes,
                       value: bytearray) -> Any:
        padded = bytes(value) + bytes(PADDED_SECRET_BYTES - len(value))
        try:
            attrs: dict[Attribute, Any] = dict(self._SECRET_TEMPLATE)
            attrs.update({
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: P11KeyType.GENERIC_SECRET,
                Attribute.LABEL: label,
                Attribute.ID: ident,
                Attribute.VALUE: padded,
            })
            return ps.session.create_object(attrs)
        finally:
            value[:] = bytes(len(value))  # best effort: bytes copies cannot be wiped

    def generate_rsa(self, label: str, bits: int) -> KeyInfo:
        check_rsa_bits(bits)
        with self._manage("generate_rsa") as (conn, ps):
            self._check_new_label(conn, label)
            ident = os.urandom(16)  # CKA_ID links the two halves (PKCS#11 convention)
            pub, priv = ps.session.generate_keypair(
                P11KeyType.RSA, bits, label=label, id=ident, store=True,
                public_template={
                    Attribute.TOKEN: True, Attribute.VERIFY: True, Attribute.ENCRYPT: True,
                    Attribute.WRAP: False, Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01",
                },
                private_template={
                    Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False, Attribute.DECRYPT: True, Attribute.SIGN: True,
                    Attribute.UNWRAP: False, Attribute.SIGN_RECOVER: False,
                    Attribute.DERIVE: False,
                },
            )
            return self._adopt(conn, label, [priv, pub])

    def generate_ec(self, label: str, curve: str) -> KeyInfo:
        name = canonical_curve(curve)
        with self._manage("generate_ec") as (conn, ps):
            self._check_new_label(conn, label)
            conn.plan.method(Operation.GENERATE_EC)
            ident = os.urandom(16)
            params = ps.session.create_domain_parameters(
                P11KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(name)},
                local=True,
            )
            pub, priv = params.generate_keypair(
                label=label, id=ident, store=True,
                public_template={Attribute.TOKEN: True, Attribute.VERIFY: True,
                                 Attribute.DERIVE: False},
                private_template={
                    Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False, Attribute.SIGN: True, Attribute.DERIVE: False,
                },
            )
            return self._adopt(conn, label, [priv, pub])

    def delete(self, label: str) -> None:
        with self._manage("delete") as (conn, ps):
            # A search here is fine (management path): also catches objects with this label
            # that the cache ignores (certificates, data objects).
            found = list(ps.session.get_objects({Attribute.LABEL: label}))
            if not found and label not in conn.keys:
                raise KeyNotFound(f"no key labelled {label!r}")
            self._drop_working(conn, label)
            for obj in found:
                obj.destroy()
            conn.keys.pop(label, None)
            for s in conn.sessions:
                s.bound.pop(label, None)

    def list_keys(self) -> list[KeyInfo]:
        with self._session("list_keys") as (conn, _ps):
            return [conn.keys[k].info for k in sorted(conn.keys)
                    if conn.keys[k].handles.keys() - {int(ObjectClass.PUBLIC_KEY)}]

    def key_info(self, label: str) -> KeyInfo:
        with self._session("key_info") as (conn, _ps):
            meta = conn.keys.get(label)
            if meta is None or not meta.handles.keys() - {int(ObjectClass.PUBLIC_KEY)}:
                raise KeyNotFound(f"no key labelled {label!r}")
            return meta.info

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
        with self._manage("refresh") as (conn, _ps):
            # Copies of keys deleted elsewhere must not outlive them; the rest are remade
            # on first use.
            self._drop_working(conn)
            for ps in conn.sessions:
                ps.bound.clear()
            conn.keys.clear()
            conn.keys.update(self._scan(conn.sessions))

    def close(self) -> None:
        if self._closed:
            return
        with self._gate.exclusive():
            if self._closed:
                return
            self._closed = True
            conn, self._conn = self._conn, None
            self._teardown(conn)
        _LIVE_TOKENS.discard(self)


class Pkcs11KeyStore:
    """:class:`kms.keystore.KeyStore` over a PKCS#11 token. Thread-safe and fork-aware.

    Stores of one process that name the same module share one initialised module, login and
    session pool (PKCS#11 initialisation and login are per process); they must then agree on
    the whole TokenConfig. The module is finalised when the last of them is closed.
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
        with _REGISTRY_LOCK:
            shared = _OPEN.get(config.module)
            if shared is not None and not shared.token._closed:
                if not _same_config(shared.token._config, config):
                    raise TokenConfigError(
                        f"PKCS#11 module {config.module} is already open in this process "
                        "with another token configuration"
                    )
                shared.users += 1
            else:
                shared = _Shared(_Token(config, pool_size), 1)
                _OPEN[config.module] = shared
        self._token = shared.token

    def __repr__(self) -> str:
        who = self._config.token_label or self._config.token_serial
        state = "closed" if self._closed else ("up" if self._token._conn_ok() else "down")
        return f"<Pkcs11KeyStore token={who!r} {state}>"

    def _t(self) -> _Token:
        if self._closed:
            raise KeyStoreError("key store is closed")
        return self._token

    # KeyStore protocol: every call goes to the shared token.
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

    def hmac(self, key: Key, data: bytes, func: Digest) -> bytes:
        return self._with_missing_refresh(key, lambda: self._t().hmac(key, data, func))

    def prf(self, key: Key, label: bytes, out_len: int, func: Digest) -> bytes:
        return self._with_missing_refresh(
            key, lambda: self._t().prf(key, label, out_len, func)
        )

    def prf_many(
        self, key: Key, requests: Sequence[tuple[bytes, int]], func: Digest
    ) -> list[bytes]:
        return self._with_missing_refresh(
            key, lambda: self._t().prf_many(key, requests, func)
        )

    def aes_cm(self, key: bytes, iv: bytes, data: bytes) -> bytes:
        return self._t().aes_cm(key, iv, data)

    def random(self, length: int) -> bytes:
        return self._t().random(length)

    def rsa_decrypt(self, key: KeyRef, data: bytes, padding: RsaPadding) -> bytes:
        return self._with_missing_refresh(
            key, lambda: self._t().rsa_decrypt(key, data, padding)
        )

    def sign(self, key: KeyRef, data: bytes, scheme: SignScheme) -> bytes:
        return self._with_missing_refresh(key, lambda: self._t().sign(key, data, scheme))

    def public_key_der(self, key: KeyRef) -> bytes:
        return self._with_missing_refresh(key, lambda: self._t().public_key_der(key))

    def generate_secret(self, label: str, length: int) -> KeyInfo:
        return self._t().generate_secret(label, length)

    def import_secret(self, label: str, value: bytes) -> KeyInfo:
        return self._t().import_secret(label, value)

    def generate_rsa(self, label: str, bits: int) -> KeyInfo:
        return self._t().generate_rsa(label, bits)

    def generate_ec(self, label: str, curve: str) -> KeyInfo:
        return self._t().generate_ec(label, curve)

    def delete(self, label: str) -> None:
        self._t().delete(label)

    def list_keys(self) -> list[KeyInfo]:
        return self._t().list_keys()

    def key_info(self, label: str) -> KeyInfo:
        return self._t().key_info(label)

    def refresh(self) -> None:
        """Rescan the token (picks up keys created by other processes, e.g. the admin CLI)."""
        self._t().refresh()

    @property
    def mechanisms(self) -> MechanismPlan:
        """How this module does each KMS operation (read at connect; hsm.mechanisms)."""
        return self._t().plan

    @contextlib.contextmanager
    def probe(self) -> Iterator[tuple[Any, Any, Any, dict[int, MechInfo]]]:
        """For ``kms token check`` (hsm.token_check) only: a pooled python-pkcs11 session with
        the module and token objects and the mechanism table, PKCS#11 errors converted."""
        tok = self._t()
        with tok._session("token check") as (conn, ps):
            yield conn.lib, conn.token, ps.session, dict(tok._table)

    def require(self, operations: Iterable[Operation | str]) -> None:
        """Refuse (TokenConfigError, one line naming the missing mechanism) a module that
        cannot do one of ``operations``; called when the KMS opens its token."""
        who = self._config.token_label or f"serial {self._config.token_serial}"
        self._t().plan.require(operations, who)

    @property
    def connected(self) -> bool:
        """Whether the token connection is currently believed to be up (no token call)."""
        return not self._closed and self._token._conn_ok()

    def close(self) -> None:
        with _REGISTRY_LOCK:
            if self._closed:
                return
            self._closed = True
            shared = _OPEN.get(self._config.module)
            if shared is None or shared.token is not self._token:
                self._token.close()
                return
            shared.users -= 1
            if shared.users > 0:
                return
            del _OPEN[self._config.module]
            self._token.close()

    def __enter__(self) -> Pkcs11KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _TransientConnectError(TokenConfigError):
    """Connecting failed in a way that may go away by itself (token file being rewritten)."""


class _InitFailedError(Exception):
    def __init__(self, rv: int) -> None:
        super().__init__(f"CKR 0x{rv:x}")
        self.rv = rv


def _describe(kwargs: dict[str, str]) -> str:
    return ", ".join(f"{k.removeprefix('token_')}={v!r}" for k, v in kwargs.items())


def _true_length(ident: Any, stored: int) -> int:
    # openCryptoki leaves CKA_VALUE_LEN at 0 for secrets made with C_CreateObject (measured):
    # then the marker is bounded by the padded length we always store.
    bound = stored or PADDED_SECRET_BYTES
    if isinstance(ident, bytes) and ident.startswith(LEN_MARKER):
        digits = ident[len(LEN_MARKER):]
        if digits.isdigit() and 0 < int(digits) <= bound:
            return int(digits)
    return stored


def _rsa_der(n: bytes, e: bytes) -> bytes:
    pub = rsa.RSAPublicNumbers(int.from_bytes(e, "big"), int.from_bytes(n, "big")).public_key()
    return pub.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


_CURVES: dict[str, Callable[[], ec.EllipticCurve]] = {
    "secp256r1": ec.SECP256R1,
    "secp384r1": ec.SECP384R1,
}


def _curve_from_params(params: bytes) -> str | None:
    for name in _CURVES:
        if params == encode_named_curve_parameters(name):
            return name
    return None


def _der_octet_string(data: bytes) -> bytes:
    """Content of a DER OCTET STRING (CKA_EC_POINT is one in PKCS#11 v2.40)."""
    if len(data) < 2 or data[0] != 0x04:
        raise ValueError("not an OCTET STRING")
    n = data[1]
    off = 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(data[2 : 2 + k], "big")
        off = 2 + k
    if off + n != len(data):
        raise ValueError("bad OCTET STRING length")
    return data[off:]


def _public_der(obj: Any) -> bytes | None:
    """SubjectPublicKeyInfo of a public key object (public attributes only)."""
    try:
        kt = obj[Attribute.KEY_TYPE]
        if kt == P11KeyType.RSA:
            return _rsa_der(obj[Attribute.MODULUS], obj[Attribute.PUBLIC_EXPONENT])
        if kt == P11KeyType.EC:
            name = _curve_from_params(obj[Attribute.EC_PARAMS])
            if name is None:
                return None
            point = _der_octet_string(obj[Attribute.EC_POINT])
            pub = ec.EllipticCurvePublicKey.from_encoded_point(_CURVES[name](), point)
            return pub.public_bytes(serialization.Encoding.DER,
                                    serialization.PublicFormat.SubjectPublicKeyInfo)
    except (p11e.PKCS11Error, ValueError):
        return None
    return None


__all__ = ["RECONNECT_INTERVAL", "Pkcs11KeyStore", "TokenConfigError"]
