"""Loading a PKCS#11 module and initialising it for several threads.

python-pkcs11 calls ``C_Initialize(NULL)``, which makes SoftHSM turn its internal locking off;
concurrent sessions then crash. Right after python-pkcs11 loads the module we re-run
``C_Finalize`` / ``C_Initialize`` through ctypes on the *same* loaded module with
``CK_C_INITIALIZE_ARGS.flags = CKF_OS_LOCKING_OK`` (PKCS#11 v2.40 section 5.4: C_Initialize), so
the module's own mutexes protect its state and several sessions may run in parallel.
python-pkcs11 never calls C_Initialize again (``lib.reinitialize()`` is never used).
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import pkcs11

from hsm.config import TokenConfig, TokenConfigError
from hsm.pkcs11.errors import InitFailedError

CKF_OS_LOCKING_OK = 0x00000002
CKR_OK = 0


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


class ModuleControl:
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
        if rv != CKR_OK or not ptr:
            raise TokenConfigError(f"C_GetFunctionList failed (CKR 0x{rv:x})")
        self._fl = ptr.contents
        self._args = _CkCInitializeArgs(flags=CKF_OS_LOCKING_OK)

    def finalize(self) -> int:
        return int(self._fl.C_Finalize(None))

    def initialize_with_os_locking(self) -> int:
        return int(self._fl.C_Initialize(ctypes.addressof(self._args)))


class Module:
    """One PKCS#11 module file of this process, loaded and unloaded as the token comes and
    goes (a reconnect unloads and loads it again)."""

    def __init__(self, config: TokenConfig) -> None:
        self._config = config
        self._ctl: ModuleControl | None = None

    def load(self) -> Any:
        """Load and initialise with OS locking; the python-pkcs11 ``lib`` object.

        Raises InitFailedError when C_Initialize fails, python-pkcs11's errors otherwise.
        """
        cfg = self._config
        if cfg.softhsm_conf is not None:
            # SoftHSM reads SOFTHSM2_CONF in C_Initialize: set it before every (re)load.
            os.environ["SOFTHSM2_CONF"] = cfg.softhsm_conf
        lib = pkcs11.lib(cfg.module)
        if self._ctl is None:
            self._ctl = ModuleControl(cfg.module)
        # python-pkcs11 initialised with NULL args (no locking); redo it with OS locking.
        self._ctl.finalize()
        rv = self._ctl.initialize_with_os_locking()
        if rv != CKR_OK:
            raise InitFailedError(rv)
        return lib

    def unload(self) -> None:
        """Finalise the module and make python-pkcs11 forget it."""
        if self._ctl is not None:
            # Ignore the result: the module may already be uninitialised (lost token, child
            # after fork that never connected).
            self._ctl.finalize()
        # python-pkcs11 still believes it initialised the module; unload() forgets that (its
        # own C_Finalize then returns CKR_CRYPTOKI_NOT_INITIALIZED, which it ignores).
        pkcs11.unload(self._config.module)


__all__ = ["CKR_OK", "Module", "ModuleControl"]
