"""Token boundary: PKCS#11 and software implementations of the kms.keystore interfaces.

Only the package :mod:`hsm.pkcs11` imports python-pkcs11; it is imported lazily by
:func:`open_keystore`, so endpoints that use :class:`hsm.software.SoftwareKeyStore` never load
a PKCS#11 module.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from hsm.config import PinError, TokenConfig, TokenConfigError, read_pin

if TYPE_CHECKING:
    from hsm.pkcs11.store import Pkcs11KeyStore


def open_keystore(config: TokenConfig, require: Iterable[str] = ()) -> Pkcs11KeyStore:
    """Open the token described by ``config`` (loads the module, logs in, caches handles).

    ``require`` names operations (:class:`hsm.pkcs11.mechanisms.Operation` values) the caller will
    use: a module without a way to do one of them is refused here, with one line naming the
    missing mechanism (TokenConfigError), rather than at the first call.
    """
    from hsm.pkcs11.store import Pkcs11KeyStore  # lazy: keep python-pkcs11 out of endpoints

    store = Pkcs11KeyStore(config)
    try:
        store.require(require)
    except BaseException:
        store.close()
        raise
    return store


__all__ = ["PinError", "TokenConfig", "TokenConfigError", "open_keystore", "read_pin"]
