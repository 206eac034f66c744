"""The per-message PKCS#11 calls made straight through the module's function list.

python-pkcs11 wraps every new object in a Python class it manufactures for that object (one
``type()`` per object, after a C_GetAttributeValue of ten attributes) and reads CKA_KEY_TYPE
again before the object's first operation: for a per-message key that lives for one or two
operations this costs more than the token's own work (create + destroy of an AES session
object 78-126 us through python-pkcs11, 25-47 us this way, measured side by side;
docs/performance.md, "In-process cost breakdown"). The calls here are the same PKCS#11 calls
on the same sessions and the same token (PKCS#11 v2.40 sections 5.7 C_CreateObject /
C_DestroyObject, 5.8 C_EncryptInit / C_Encrypt, 5.9 C_DecryptInit / C_Decrypt, 5.11
C_SignInit / C_Sign), only without the extra round trips and classes.

The RSA decryption of a PKE (RFC 3830 4.2.5) comes here too, for another reason: it runs in a
thread of its own next to the event loop, and every return from a foreign call must take the
GIL back from a loop that may hold it for a switch interval. python-pkcs11 makes three calls
(init, a length query, the decryption); here the output buffer is sized from the key, so two.

Keys still never leave the token: objects are created sensitive and non-extractable, exactly
as :class:`hsm.pkcs11.working.SessionObjects` did through python-pkcs11.

A failing call raises the python-pkcs11 exception for its return value, so that
:func:`hsm.pkcs11.errors.convert` maps it as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pkcs11.exceptions as p11e
from pkcs11 import Attribute, ObjectClass
from pkcs11 import KeyType as P11KeyType

from hsm.config import TokenConfigError

_ULONG = ctypes.c_ulong
_ULONG_P = ctypes.POINTER(_ULONG)


class _Attr(ctypes.Structure):  # CK_ATTRIBUTE
    _fields_ = (("type", _ULONG), ("value", ctypes.c_void_p), ("length", _ULONG))


class _Mech(ctypes.Structure):  # CK_MECHANISM
    _fields_ = (("mechanism", _ULONG), ("param", ctypes.c_void_p), ("length", _ULONG))


class _OaepParams(ctypes.Structure):  # CK_RSA_PKCS_OAEP_PARAMS
    _fields_ = (("hash_alg", _ULONG), ("mgf", _ULONG), ("source", _ULONG),
                ("source_data", ctypes.c_void_p), ("source_len", _ULONG))


_CKZ_DATA_SPECIFIED = 1  # PKCS#11 v2.40 section 2.1.8: the OAEP label is given (here: empty)


class _Version(ctypes.Structure):
    _fields_ = (("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte))


# CK_FUNCTION_LIST (PKCS#11 v2.40 section 3.6, pkcs11f.h order) up to C_Sign.
_NAMES = (
    "C_Initialize", "C_Finalize", "C_GetInfo", "C_GetFunctionList", "C_GetSlotList",
    "C_GetSlotInfo", "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo",
    "C_InitToken", "C_InitPIN", "C_SetPIN", "C_OpenSession", "C_CloseSession",
    "C_CloseAllSessions", "C_GetSessionInfo", "C_GetOperationState", "C_SetOperationState",
    "C_Login", "C_Logout", "C_CreateObject", "C_CopyObject", "C_DestroyObject",
    "C_GetObjectSize", "C_GetAttributeValue", "C_SetAttributeValue", "C_FindObjectsInit",
    "C_FindObjects", "C_FindObjectsFinal", "C_EncryptInit", "C_Encrypt", "C_EncryptUpdate",
    "C_EncryptFinal", "C_DecryptInit", "C_Decrypt", "C_DecryptUpdate", "C_DecryptFinal",
    "C_DigestInit", "C_Digest", "C_DigestUpdate", "C_DigestKey", "C_DigestFinal",
    "C_SignInit", "C_Sign",
)


class _FunctionList(ctypes.Structure):
    _fields_ = (("version", _Version), *((n, ctypes.c_void_p) for n in _NAMES))


_CREATE = ctypes.CFUNCTYPE(_ULONG, _ULONG, ctypes.POINTER(_Attr), _ULONG, _ULONG_P)
_DESTROY = ctypes.CFUNCTYPE(_ULONG, _ULONG, _ULONG)
_INIT = ctypes.CFUNCTYPE(_ULONG, _ULONG, ctypes.POINTER(_Mech), _ULONG)
_RUN = ctypes.CFUNCTYPE(_ULONG, _ULONG, ctypes.c_char_p, _ULONG, ctypes.c_void_p, _ULONG_P)

# Return values (PKCS#11 v2.40 section 3.6, pkcs11t.h) -> python-pkcs11's exception classes,
# as python-pkcs11 maps them itself.
_ERRORS: dict[int, type[p11e.PKCS11Error]] = {
    0x002: p11e.HostMemory, 0x003: p11e.SlotIDInvalid, 0x005: p11e.GeneralError,
    0x006: p11e.FunctionFailed, 0x007: p11e.ArgumentsBad, 0x010: p11e.AttributeReadOnly,
    0x011: p11e.AttributeSensitive, 0x012: p11e.AttributeTypeInvalid,
    0x013: p11e.AttributeValueInvalid, 0x020: p11e.DataInvalid, 0x021: p11e.DataLenRange,
    0x030: p11e.DeviceError, 0x031: p11e.DeviceMemory, 0x032: p11e.DeviceRemoved,
    0x040: p11e.EncryptedDataInvalid, 0x041: p11e.EncryptedDataLenRange,
    0x050: p11e.FunctionCancelled, 0x054: p11e.FunctionNotSupported,
    0x060: p11e.KeyHandleInvalid, 0x062: p11e.KeySizeRange, 0x063: p11e.KeyTypeInconsistent,
    0x070: p11e.MechanismInvalid, 0x071: p11e.MechanismParamInvalid,
    0x082: p11e.ObjectHandleInvalid, 0x090: p11e.OperationActive,
    0x091: p11e.OperationNotInitialized, 0x0B0: p11e.SessionClosed, 0x0B1: p11e.SessionCount,
    0x0B3: p11e.SessionHandleInvalid, 0x0B5: p11e.SessionReadOnly,
    0x0D0: p11e.TemplateIncomplete, 0x0D1: p11e.TemplateInconsistent,
    0x0E0: p11e.TokenNotPresent, 0x0E1: p11e.TokenNotRecognised,
    0x0E2: p11e.TokenWriteProtected, 0x101: p11e.UserNotLoggedIn,
}
_NOT_INITIALIZED = 0x190


def error_for(rv: int) -> p11e.PKCS11Error:
    """The exception python-pkcs11 raises for ``rv`` (CKR_CRYPTOKI_NOT_INITIALIZED: its
    plain PKCS11Error with the fixed text :func:`hsm.pkcs11.errors.is_not_initialized`
    recognises; an unknown value: PKCS11Error naming it)."""
    if rv == _NOT_INITIALIZED:
        return p11e.PKCS11Error(
            "Initialisation error (not initialized). Should never see this.")
    cls = _ERRORS.get(rv)
    if cls is None:
        return p11e.PKCS11Error(f"CKR 0x{rv:x}")
    return cls()


_TRUE = ctypes.c_ubyte(1)
_FALSE = ctypes.c_ubyte(0)
_SECRET = _ULONG(ObjectClass.SECRET_KEY)
_GENERIC = _ULONG(P11KeyType.GENERIC_SECRET)
_AES = _ULONG(P11KeyType.AES)


_PLAIN: dict[int, _Mech] = {}  # CK_MECHANISM without parameter, by mechanism type


def _bool(v: ctypes.c_ubyte) -> tuple[int, int]:
    return ctypes.addressof(v), 1


class RawCalls:
    """C_CreateObject / C_DestroyObject / C_SignInit+C_Sign / C_EncryptInit+C_Encrypt /
    C_DecryptInit+C_Decrypt of one loaded module, on python-pkcs11's sessions (by their
    handles)."""

    def __init__(self, module_path: str) -> None:
        # The same dlopen handle python-pkcs11 and hsm.pkcs11.module hold; holding it keeps
        # the module mapped (and these function pointers valid) across reconnects.
        self._dll = ctypes.CDLL(module_path)
        get = self._dll.C_GetFunctionList
        get.argtypes = [ctypes.POINTER(ctypes.POINTER(_FunctionList))]
        get.restype = _ULONG
        ptr = ctypes.POINTER(_FunctionList)()
        rv = get(ctypes.byref(ptr))
        if rv != 0 or not ptr:
            raise TokenConfigError(f"C_GetFunctionList failed (CKR 0x{rv:x})")
        fl = ptr.contents
        self._create = _CREATE(fl.C_CreateObject)
        self._destroy = _DESTROY(fl.C_DestroyObject)
        self._sign_init = _INIT(fl.C_SignInit)
        self._sign = _RUN(fl.C_Sign)
        self._encrypt_init = _INIT(fl.C_EncryptInit)
        self._encrypt = _RUN(fl.C_Encrypt)
        self._decrypt_init = _INIT(fl.C_DecryptInit)
        self._decrypt = _RUN(fl.C_Decrypt)

    # --- objects --------------------------------------------------------------------------
    def create_session_key(self, session: int, value: bytes, *, aes: bool) -> int:
        """A session object (CKA_TOKEN false, not private, sensitive, non-extractable)
        holding ``value``: a generic secret for C_Sign (HMAC), or an AES key for C_Encrypt.
        Returns its handle."""
        buf = ctypes.create_string_buffer(value, len(value))
        kind = _AES if aes else _GENERIC
        use = Attribute.ENCRYPT if aes else Attribute.SIGN
        template = (_Attr * 8)(
            _Attr(Attribute.CLASS, ctypes.addressof(_SECRET), ctypes.sizeof(_ULONG)),
            _Attr(Attribute.TOKEN, *_bool(_FALSE)),
            _Attr(Attribute.PRIVATE, *_bool(_FALSE)),
            _Attr(Attribute.SENSITIVE, *_bool(_TRUE)),
            _Attr(Attribute.EXTRACTABLE, *_bool(_FALSE)),
            _Attr(Attribute.KEY_TYPE, ctypes.addressof(kind), ctypes.sizeof(_ULONG)),
            _Attr(use, *_bool(_TRUE)),
            _Attr(Attribute.VALUE, ctypes.addressof(buf), len(value)),
        )
        handle = _ULONG()
        try:
            rv = self._create(session, template, 8, ctypes.byref(handle))
        finally:
            ctypes.memset(buf, 0, len(value))  # our copy of the key bytes
        if rv:
            raise error_for(rv)
        return int(handle.value)

    def destroy(self, session: int, handle: int) -> None:
        rv = self._destroy(session, handle)
        if rv:
            raise error_for(rv)

    # --- operations -----------------------------------------------------------------------
    def sign(self, session: int, key: int, mechanism: int, data: bytes, out_len: int) -> bytes:
        """C_SignInit + C_Sign (single part); ``out_len``: the largest result expected."""
        mech = _PLAIN.get(mechanism)
        if mech is None:  # a mechanism without parameter: one shared read-only struct
            mech = _PLAIN.setdefault(mechanism, _Mech(mechanism, None, 0))
        rv = self._sign_init(session, mech, key)
        if rv:
            raise error_for(rv)
        out = ctypes.create_string_buffer(out_len)
        n = _ULONG(out_len)
        rv = self._sign(session, data, len(data), out, ctypes.byref(n))
        if rv:
            raise error_for(rv)
        return out.raw[: n.value]

    def encrypt(
        self, session: int, key: int, mechanism: int, param: bytes | None, data: bytes
    ) -> bytes:
        """C_EncryptInit + C_Encrypt (single part) with the raw mechanism parameter bytes."""
        pbuf = ctypes.create_string_buffer(param, len(param)) if param else None
        mech = _Mech(mechanism, ctypes.addressof(pbuf) if pbuf is not None else None,
                     len(param) if param else 0)
        rv = self._encrypt_init(session, ctypes.byref(mech), key)
        if rv:
            raise error_for(rv)
        return self._finish(self._encrypt, session, data, len(data) + 32)

    def rsa_decrypt(
        self, session: int, key: int, mechanism: int, data: bytes, modulus_bytes: int,
        oaep: tuple[int, int] | None = None,
    ) -> bytes:
        """C_DecryptInit + C_Decrypt (single part) with an RSA private key: CKM_RSA_PKCS, or
        CKM_RSA_PKCS_OAEP with ``oaep`` = (hash mechanism, MGF) and an empty label. The
        plaintext is never longer than the modulus, so no length query is needed."""
        params = None
        if oaep is not None:
            params = _OaepParams(oaep[0], oaep[1], _CKZ_DATA_SPECIFIED, None, 0)
        mech = _Mech(mechanism, ctypes.addressof(params) if params is not None else None,
                     ctypes.sizeof(params) if params is not None else 0)
        with gil_back_soon():
            rv = self._decrypt_init(session, ctypes.byref(mech), key)
            if rv:
                raise error_for(rv)
            return self._finish(self._decrypt, session, data, modulus_bytes)

    @staticmethod
    def _finish(fn: Any, session: int, data: bytes, out_len: int) -> bytes:
        out = ctypes.create_string_buffer(out_len)
        n = _ULONG(out_len)
        rv = fn(session, data, len(data), out, ctypes.byref(n))
        if rv:
            raise error_for(rv)
        return out.raw[: n.value]


_lock = threading.Lock()
_by_path: dict[str, RawCalls] = {}

# While a thread is inside a long foreign call (an RSA decryption, ~1 ms of token work), a
# thread waiting for the GIL asks the holder for it after GIL_BACK_S instead of the switch
# interval (5 ms): the calling thread gets the GIL back soon after the token returns, instead
# of waiting up to 5 ms behind an event loop that computes. The interval is process-wide;
# nested and concurrent calls restore it when the last one leaves.
GIL_BACK_S = 0.0001
_boost_lock = threading.Lock()
_boosted = 0
_saved_interval = 0.0


@contextlib.contextmanager
def gil_back_soon() -> Iterator[None]:
    global _boosted, _saved_interval
    with _boost_lock:
        if _boosted == 0:
            _saved_interval = sys.getswitchinterval()
            sys.setswitchinterval(GIL_BACK_S)
        _boosted += 1
    try:
        yield
    finally:
        with _boost_lock:
            _boosted -= 1
            if _boosted == 0:
                sys.setswitchinterval(_saved_interval)


def calls_for(module_path: str) -> RawCalls:
    """The :class:`RawCalls` of a module file (one per path and process)."""
    with _lock:
        calls = _by_path.get(module_path)
        if calls is None:
            calls = _by_path[module_path] = RawCalls(module_path)
        return calls


__all__ = ["RawCalls", "calls_for", "error_for"]
