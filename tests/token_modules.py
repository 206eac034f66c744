"""The PKCS#11 modules the token tests run on: SoftHSM2 and openCryptoki's soft token.

openCryptoki's soft token ("swtok") is machine-global state: one per machine, behind the slot
daemon pkcsslotd. :func:`opencryptoki_token` therefore serialises on a lock file (other test
runs on this machine wait; the ``ock_token`` fixture holds it for one test module at a time,
so concurrent runs interleave module by module), resets the token with known PINs through
``scripts/opencryptoki-token.sh`` (which also writes the minimal opencryptoki.conf and starts
the daemon), and afterwards stops the daemon and removes the token state again.

A test that needs openCryptoki FAILS when it is missing (scripts/test-services.sh installs it):
running on a second, independent module is the point of these tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hsm import TokenConfig
from hsm.provision import DEFAULT_OPENCRYPTOKI_MODULE

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "opencryptoki-token.sh"
LOCK_FILE = Path("/run/lock/mikey-kms-tests-opencryptoki.lock")
SWTOK_DIR = Path("/var/lib/opencryptoki/swtok")
OCK_SLOT = 3
OCK_LABEL = "kms-ock"
OCK_USER_PIN = "4711usr"  # openCryptoki: PINs are 4 to 8 characters
OCK_SO_PIN = "0815so"

MODULES = ("softhsm2", "opencryptoki")
TRACE_ENV = "MIKEY_KMS_OCK_TRACE"


@dataclass(frozen=True)
class OckToken:
    """openCryptoki's soft token, reset for the holder of the lock."""

    label: str
    user_pin: str = field(repr=False)
    so_pin: str = field(repr=False)
    module: str = DEFAULT_OPENCRYPTOKI_MODULE
    name: str = "opencryptoki"

    def config(self, **overrides: str | None) -> TokenConfig:
        kwargs: dict[str, str | None] = {
            "module": self.module,
            "token_label": self.label,
            "token_serial": None,
            "pin": self.user_pin,
            "softhsm_conf": None,
        }
        kwargs.update(overrides)
        return TokenConfig(**kwargs)  # type: ignore[arg-type]

    def env(self) -> dict[str, str]:
        return dict(os.environ)


def _run(*args: str) -> None:
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"opencryptoki-token.sh {args[0]} failed (exit {proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()[-500:]}"
        )


def check_opencryptoki_installed() -> None:
    missing = [t for t in ("pkcsslotd", "pkcsconf") if shutil.which(t) is None]
    if missing or not os.path.exists(DEFAULT_OPENCRYPTOKI_MODULE):
        raise AssertionError(
            f"openCryptoki is not installed (missing: {', '.join(missing) or 'module'}): "
            "run scripts/test-services.sh"
        )
    if os.geteuid() != 0:
        raise AssertionError("the openCryptoki token tests need root (slot daemon, token dir)")


@contextlib.contextmanager
def opencryptoki_token() -> Iterator[OckToken]:
    """Hold the machine-wide lock, reset the soft token, yield it; stop and clean up after."""
    check_opencryptoki_installed()
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_fd()
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _trace("acquired")
        try:
            _run("reset", OCK_LABEL, OCK_SO_PIN, OCK_USER_PIN)
            yield OckToken(OCK_LABEL, OCK_USER_PIN, OCK_SO_PIN)
        finally:
            try:
                _run("stop")
            finally:
                _trace("released")
                fcntl.flock(lock, fcntl.LOCK_UN)
    finally:
        os.close(lock)


LOCK_FD_MIN = 900


def _lock_fd() -> int:
    """The lock file open on a high descriptor number. The lock is taken in the middle of a
    session, when low numbers are being reused: a library that closes a descriptor of its
    own twice (a PKCS#11 module unloaded and finalised) would otherwise close the lock with
    it, silently letting another run take the token."""
    fd = os.open(LOCK_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, LOCK_FD_MIN)
    finally:
        os.close(fd)


def _trace(event: str) -> None:
    """With ``MIKEY_KMS_OCK_TRACE=<file>``, one line per lock event (``scripts/ock-concurrent
    -runs.py`` checks from it that concurrent runs never hold the token at once)."""
    path = os.environ.get(TRACE_ENV)
    if path:
        with open(path, "a") as fh:
            fh.write(f"{time.time():.6f} {os.getpid()} {event}\n")


@contextlib.contextmanager
def opencryptoki_token_lost(token: OckToken) -> Iterator[None]:
    """The token disappears (its directory is gone, every session of this process is closed,
    as after a device reset) until the block ends; then it is back as it was."""
    gone = SWTOK_DIR.with_name(SWTOK_DIR.name + ".lost")
    os.rename(SWTOK_DIR, gone)
    try:
        dll = ctypes.CDLL(token.module)
        rv = dll.C_CloseAllSessions(ctypes.c_ulong(OCK_SLOT))
        assert rv in (0, 0x190), f"C_CloseAllSessions returned 0x{rv:x}"
        yield
    finally:
        os.rename(gone, SWTOK_DIR)


__all__ = [
    "MODULES",
    "OCK_LABEL",
    "OckToken",
    "check_opencryptoki_installed",
    "opencryptoki_token",
    "opencryptoki_token_lost",
]
