"""How to reach the token: its configuration, its PIN and the errors of opening it.

Pure (no python-pkcs11): the configuration parser and the CLI use it without loading a module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from kms.keystore import KeyStoreError


class PinError(KeyStoreError, ValueError):
    """The token PIN could not be read (the message never contains a PIN)."""


class TokenConfigError(KeyStoreError):
    """The token cannot be opened as configured (module, token, PIN). Not transient."""


@dataclass(frozen=True)
class TokenConfig:
    """Where the token is and how to log in to it.

    Exactly one of ``token_label`` / ``token_serial`` is normally set (slot ids are random in
    SoftHSM, so tokens are found by label or serial; with both set, both must match).
    """

    module: str
    """Path of the PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so)."""
    token_label: str | None = None
    token_serial: str | None = None
    pin: str = field(default="", repr=False)
    """User PIN; never printed (repr=False)."""
    softhsm_conf: str | None = None
    """When set, SOFTHSM2_CONF is set to this path before the module is initialised."""


def read_pin(pin_env: str | None, pin_file: str | None) -> str:
    """Read the user PIN from the environment variable *named* ``pin_env`` or from ``pin_file``.

    PINs are never taken from argv (visible in ``ps`` to every user). One trailing newline
    (``\\n`` or ``\\r\\n``) is stripped from a file. Raises :class:`PinError` (a
    KeyStoreError and a ValueError) whose message names the source but never the PIN.
    """
    if pin_env is None and pin_file is None:
        raise PinError("no PIN source given: set a PIN environment variable or a PIN file")
    if pin_env is not None:
        value = os.environ.get(pin_env)
        if value is None:
            if pin_file is None:
                raise PinError(f"PIN environment variable {pin_env!r} is not set")
        elif value == "":
            raise PinError(f"PIN environment variable {pin_env!r} is empty")
        else:
            return value
    assert pin_file is not None
    try:
        text = Path(pin_file).read_text(encoding="utf-8")
    except OSError as exc:
        # strerror only: the OSError text could in theory echo content, it never does, but
        # keep to the file name and the reason.
        raise PinError(f"cannot read PIN file {pin_file!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise PinError(f"PIN file {pin_file!r} is not UTF-8") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise PinError(f"PIN file {pin_file!r} is empty")
    return text


__all__ = ["PinError", "TokenConfig", "TokenConfigError", "read_pin"]
