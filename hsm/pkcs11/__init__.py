"""The key store over a PKCS#11 token: the only package that imports python-pkcs11.

One concern per module:

* :mod:`~hsm.pkcs11.module`: loading the module and re-initialising it with OS locking;
* :mod:`~hsm.pkcs11.registry`: the process-global registry (one token per module and process)
  and the fork hooks;
* :mod:`~hsm.pkcs11.errors`: PKCS#11 errors to key-store errors, in one place;
* :mod:`~hsm.pkcs11.connection`: connect, lose, reconnect; the login and the session pool;
* :mod:`~hsm.pkcs11.catalogue`: the handle catalogue (one scan per connection);
* :mod:`~hsm.pkcs11.working`: per-message session objects and working copies;
* :mod:`~hsm.pkcs11.store`: :class:`Pkcs11KeyStore`, which composes them (request path);
* :mod:`~hsm.pkcs11.admin`: key administration;
* :mod:`~hsm.pkcs11.mechanisms`, :mod:`~hsm.pkcs11.token_ops`: what each module offers and
  the token-side fallbacks; :mod:`~hsm.pkcs11.token_check`: ``kms token check``.

docs/hsm.md describes the design for operators and implementers.
"""

from __future__ import annotations

from hsm.config import TokenConfigError
from hsm.pkcs11.connection import MISSING_KEY_RESCAN_S, RECONNECT_INTERVAL
from hsm.pkcs11.store import Pkcs11KeyStore

__all__ = ["MISSING_KEY_RESCAN_S", "RECONNECT_INTERVAL", "Pkcs11KeyStore", "TokenConfigError"]
