"""The one place where PKCS#11 errors become key-store errors.

Errors are mapped deliberately, never "every error is transient": a lost token or session
(transient, the store reconnects on a later call), a stale handle of a cached long-term key
(the token changed under us), bad input data (never retried), an operation the token lacks,
and the rest. Messages name the operation and the PKCS#11 error class only: never data or key
values (PKCS#11 v2.40 section 5.1 lists the return values).
"""

from __future__ import annotations

from dataclasses import dataclass

import pkcs11.exceptions as p11e

from hsm._common import SEALED_DATA_MESSAGE
from hsm.config import TokenConfigError
from kms.keystore import InvalidSealedData, KeyStoreError, TokenUnavailable, UnsupportedOperation

UNAVAILABLE_MESSAGE = "token unavailable"

# The token / session went away: transient, the store reconnects on a later call.
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
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
STALE_HANDLE_ERRORS: tuple[type[Exception], ...] = (
    p11e.ObjectHandleInvalid,
    p11e.KeyHandleInvalid,
)
# Bad ciphertext / parameters: the data is wrong, never retried.
SEALED_ERRORS: tuple[type[Exception], ...] = (
    p11e.EncryptedDataInvalid,
    p11e.EncryptedDataLenRange,
    p11e.DataInvalid,
    p11e.DataLenRange,
    p11e.MechanismParamInvalid,
    p11e.WrappedKeyInvalid,
    p11e.WrappedKeyLenRange,
)
UNSUPPORTED_ERRORS: tuple[type[Exception], ...] = (
    p11e.MechanismInvalid,
    p11e.KeySizeRange,
    p11e.KeyTypeInconsistent,
    p11e.FunctionNotSupported,
)


def is_not_initialized(exc: BaseException) -> bool:
    """CKR_CRYPTOKI_NOT_INITIALIZED: python-pkcs11 has no class for it and raises
    PKCS11Error with a fixed text."""
    return type(exc) is p11e.PKCS11Error and "not initialized" in str(exc)


@dataclass(frozen=True)
class Converted:
    error: KeyStoreError
    broken: bool  # the connection must be rebuilt


def convert(exc: BaseException, *, what: str, sealed: bool, cached_handle: bool) -> Converted:
    """The key-store error for a PKCS#11 error raised by operation ``what``.

    ``sealed``: the operation is rsa_decrypt, whose failures all look the same (no padding
    oracle). ``cached_handle``: the operation used a handle from the catalogue, so a stale
    handle means the token changed.
    """
    name = type(exc).__name__
    if isinstance(exc, UNAVAILABLE_ERRORS) or is_not_initialized(exc):
        return Converted(TokenUnavailable(f"{UNAVAILABLE_MESSAGE} ({what}: {name})"), True)
    if isinstance(exc, STALE_HANDLE_ERRORS) and cached_handle:
        return Converted(TokenUnavailable(f"{UNAVAILABLE_MESSAGE} ({what}: {name})"), True)
    if sealed:
        # rsa_decrypt: one fixed message whatever the token said (no padding oracle).
        return Converted(InvalidSealedData(SEALED_DATA_MESSAGE), False)
    if isinstance(exc, SEALED_ERRORS):
        return Converted(KeyStoreError(f"{what} rejected its input ({name})"), False)
    if isinstance(exc, UNSUPPORTED_ERRORS):
        return Converted(UnsupportedOperation(f"{what} not supported by the token ({name})"),
                         False)
    return Converted(KeyStoreError(f"{what} failed ({name})"), False)


class TransientConnectError(TokenConfigError):
    """Connecting failed in a way that may go away by itself (token file being rewritten)."""


class InitFailedError(Exception):
    """C_Initialize returned an error (the CKR code, never anything else)."""

    def __init__(self, rv: int) -> None:
        super().__init__(f"CKR 0x{rv:x}")
        self.rv = rv


__all__ = [
    "SEALED_ERRORS",
    "STALE_HANDLE_ERRORS",
    "UNAVAILABLE_ERRORS",
    "UNAVAILABLE_MESSAGE",
    "UNSUPPORTED_ERRORS",
    "Converted",
    "InitFailedError",
    "TransientConnectError",
    "convert",
    "is_not_initialized",
]
