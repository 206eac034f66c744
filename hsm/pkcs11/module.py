"""Loading a PKCS#11 module and initialising it for several threads.

python-pkcs11 calls ``C_Initialize(NULL)``, which makes SoftHSM turn its internal locking off;
concurrent sessions then crash. Right after python-pkcs11 loads the module we re-run
``C_Finalize`` / ``C_Initialize`` through ctypes on the *same* loaded module with
``CK_C_INITIALIZE_ARGS.flags = CKF_OS_LOCKING_OK`` (PKCS#11 v2.40 section 5.4: C_Initialize), so
the module's own mutexes protect its state and several sessions may run in parallel.
python-pkcs11 never calls C_Initialize again (``lib.reinitialize()`` is never used).

Some modules keep a file descriptor in a static variable that C_Finalize closes but does not
reset, and C_Initialize reuses the stale number without opening the file again (openCryptoki
3.x does this with its process lock file): from the second C_Initialize of one loaded module
on, the module locks, and at the next C_Finalize closes, whatever descriptor of the process
happens to hold that number (a gRPC epoll descriptor, a socket, a database file). See
:class:`DescriptorGuard`, which keeps such a number pointing at the module's own file.
"""

from __future__ import annotations

import ctypes
import os
import threading
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


def _open_files() -> dict[int, str]:
    """Descriptor number -> path of this process's open regular files (Linux /proc)."""
    out: dict[int, str] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for name in names:
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own descriptor, or closed meanwhile
        if target.startswith("/"):
            out[int(name)] = target
    return out


class DescriptorGuard:
    """Keeps the files a module opened in its first C_Initialize at their numbers across
    C_Finalize / C_Initialize, for modules that keep stale descriptor numbers (see the module
    docstring).

    After each C_Finalize, every file the module had opened and that C_Finalize closed is
    opened again at the same number (a fresh open of the same path), before anything else
    can take the number. A module that opens its files again in C_Initialize gets new numbers;
    the guard then closes its copies (nothing kept). A module that reuses the stale number
    finds its own file there, locks it, and closes that copy, never someone else's.
    """

    def __init__(self) -> None:
        self._files: dict[int, str] = {}
        self._copies: set[int] = set()
        self.recorded = False

    def record_initialize(self, before: dict[int, str]) -> None:
        """Call after the module's first C_Initialize in this process with
        :func:`_open_files` from just before it."""
        after = _open_files()
        self._files = {fd: path for fd, path in after.items() if before.get(fd) != path}
        self.recorded = True

    def after_finalize(self) -> None:
        now = _open_files()
        for fd, path in self._files.items():
            if fd in now:
                continue
            try:
                copy = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                try:
                    copy = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    continue  # gone: nothing to point the number at
            if copy != fd:
                os.dup2(copy, fd, inheritable=False)
                os.close(copy)
            self._copies.add(fd)

    def after_initialize(self) -> None:
        """Close the copies of files the module opened again elsewhere (it does not use the
        old numbers); keep the others, which the module now holds as its own."""
        now = _open_files()
        for fd in list(self._copies):
            path = self._files.get(fd)
            if path is not None and any(p == path and n != fd for n, p in now.items()):
                os.close(fd)
            self._copies.discard(fd)


# A loaded module stays mapped for the life of the process (ctypes never unloads it), and so
# does its static state: one guard per module file and process.
_guards: dict[str, DescriptorGuard] = {}
_guards_lock = threading.Lock()


def guard_for(path: str) -> DescriptorGuard:
    with _guards_lock:
        guard = _guards.get(path)
        if guard is None:
            guard = _guards[path] = DescriptorGuard()
        return guard


class Module:
    """One PKCS#11 module file of this process, loaded and unloaded as the token comes and
    goes (a reconnect unloads and loads it again)."""

    def __init__(self, config: TokenConfig) -> None:
        self._config = config
        self._ctl: ModuleControl | None = None
        self._guard = guard_for(config.module)

    def load(self) -> Any:
        """Load and initialise with OS locking; the python-pkcs11 ``lib`` object.

        Raises InitFailedError when C_Initialize fails, python-pkcs11's errors otherwise.
        """
        cfg = self._config
        if cfg.softhsm_conf is not None:
            # SoftHSM reads SOFTHSM2_CONF in C_Initialize: set it before every (re)load.
            os.environ["SOFTHSM2_CONF"] = cfg.softhsm_conf
        before = _open_files()
        lib = pkcs11.lib(cfg.module)
        if not self._guard.recorded:
            self._guard.record_initialize(before)
        if self._ctl is None:
            self._ctl = ModuleControl(cfg.module)
        # python-pkcs11 initialised with NULL args (no locking); redo it with OS locking.
        self._ctl.finalize()
        self._guard.after_finalize()
        rv = self._ctl.initialize_with_os_locking()
        self._guard.after_initialize()
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
        # own C_Finalize then returns CKR_CRYPTOKI_NOT_INITIALIZED, which it ignores, but a
        # module with a stale descriptor closes that number again in it).
        pkcs11.unload(self._config.module)
        self._guard.after_finalize()


__all__ = ["CKR_OK", "DescriptorGuard", "Module", "ModuleControl"]
