"""Token provisioning helpers (operator CLI and tests): throwaway SoftHSM2 tokens."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from kms.keystore import KeyStoreError

_SOFTHSM_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


def _first_existing(paths: tuple[str, ...]) -> str:
    for p in paths:
        if os.path.exists(p):
            return p
    # Keep the conventional Debian path so error messages name a real candidate.
    return paths[0]


DEFAULT_SOFTHSM_MODULE: str = _first_existing(_SOFTHSM_MODULE_CANDIDATES)
"""First existing SoftHSM2 module among the usual install locations."""


_OPENCRYPTOKI_MODULE_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/pkcs11/libopencryptoki.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/libopencryptoki.so",
    "/usr/lib64/pkcs11/libopencryptoki.so",
    "/usr/lib/pkcs11/libopencryptoki.so",
)

DEFAULT_OPENCRYPTOKI_MODULE: str = _first_existing(_OPENCRYPTOKI_MODULE_CANDIDATES)
"""First existing openCryptoki module (a second, independent software token for tests)."""


class ProvisioningError(KeyStoreError):
    """Creating a token failed (the message never contains a PIN)."""


def write_softhsm_conf(token_dir: Path) -> Path:
    """Write ``<token_dir>/softhsm2.conf`` pointing at ``<token_dir>/tokens`` and create it."""
    token_dir = Path(token_dir).resolve()
    tokens = token_dir / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = token_dir / "softhsm2.conf"
    conf.write_text(
        "# written by hsm.provision\n"
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        # Keep slot numbering predictable-ish; we still look tokens up by label.
        "slots.removable = false\n",
        encoding="utf-8",
    )
    return conf


def create_softhsm_token(token_dir: Path, label: str, so_pin: str, user_pin: str) -> Path:
    """Create a SoftHSM2 token under ``token_dir``; return the softhsm2.conf path.

    The PINs reach softhsm2-util through its argv (its only non-interactive interface); they
    are never logged and never appear in the exceptions raised here.
    """
    util = shutil.which("softhsm2-util")
    if util is None:
        raise ProvisioningError(
            "softhsm2-util not found on PATH (install the softhsm2 package)"
        )
    conf = write_softhsm_conf(token_dir)
    env = dict(os.environ)
    env["SOFTHSM2_CONF"] = str(conf)
    try:
        proc = subprocess.run(  # noqa: S603 - fixed executable, no shell
            [util, "--init-token", "--free", "--label", label,
             "--so-pin", so_pin, "--pin", user_pin],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        # Never include exc.cmd / str(exc): both contain the argv with the PINs.
        raise ProvisioningError(
            f"softhsm2-util could not be run for token {label!r}: {type(exc).__name__}"
        ) from None
    if proc.returncode != 0:
        detail = _redact((proc.stderr or proc.stdout).strip(), (so_pin, user_pin))
        raise ProvisioningError(
            f"softhsm2-util --init-token failed for token {label!r} "
            f"(exit {proc.returncode}): {detail[:300]}"
        )
    return conf


def _redact(text: str, secrets: tuple[str, ...]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


__all__ = [
    "DEFAULT_OPENCRYPTOKI_MODULE",
    "DEFAULT_SOFTHSM_MODULE",
    "ProvisioningError",
    "create_softhsm_token",
    "write_softhsm_conf",
]
