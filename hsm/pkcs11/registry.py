"""The process-global registry of open tokens, and the fork hooks.

PKCS#11 initialisation and login are per process and per module (PKCS#11 v2.40 section 5.4:
C_Initialize; section 5.6: C_Login), so all key stores of a process that name the same module
share one :class:`hsm.pkcs11.connection.Token`; they must then agree on the whole
TokenConfig. The module is finalised when the last of them is released.

fork(): ``os.register_at_fork`` holds every live token's gate exclusive across fork (so no
token call is in flight and no module mutex is held: the child could inherit a mutex held by a
thread that does not exist there, and C_Finalize would deadlock); the child marks its
connections broken and re-initialises the module on its next call.
"""

from __future__ import annotations

import hmac
import os
import threading
import weakref
from dataclasses import dataclass

from hsm.config import TokenConfig, TokenConfigError
from hsm.pkcs11.connection import Token

_LIVE_TOKENS: weakref.WeakSet[Token] = weakref.WeakSet()
_REGISTRY_LOCK = threading.Lock()  # lock order everywhere: this lock, then a token's gate
_OPEN: dict[str, _Shared] = {}  # module path -> the one open token of this process


@dataclass(eq=False)
class _Shared:
    token: Token
    users: int


def _before_fork() -> None:
    _REGISTRY_LOCK.acquire()
    for tok in list(_LIVE_TOKENS):
        tok.fork_prepare()


def _after_fork_parent() -> None:
    for tok in list(_LIVE_TOKENS):
        tok.fork_parent()
    _REGISTRY_LOCK.release()


def _after_fork_child() -> None:
    global _REGISTRY_LOCK
    for tok in list(_LIVE_TOKENS):
        tok.fork_child()
    _REGISTRY_LOCK = threading.Lock()  # the parent's holder does not exist here


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_parent, after_in_child=_after_fork_child
)


def same_config(a: TokenConfig, b: TokenConfig) -> bool:
    """Whether two configurations name the same token the same way (PINs compared in
    constant time)."""
    return (
        (a.module, a.token_label, a.token_serial, a.softhsm_conf)
        == (b.module, b.token_label, b.token_serial, b.softhsm_conf)
        and hmac.compare_digest(a.pin.encode(), b.pin.encode())
    )


def acquire(config: TokenConfig, pool_size: int) -> Token:
    """The process's token for ``config.module``: the open one (with one more user), or a
    newly connected one. TokenConfigError if the module is open with another configuration."""
    with _REGISTRY_LOCK:
        shared = _OPEN.get(config.module)
        if shared is not None and not shared.token.closed:
            if not same_config(shared.token.config, config):
                raise TokenConfigError(
                    f"PKCS#11 module {config.module} is already open in this process "
                    "with another token configuration"
                )
            shared.users += 1
        else:
            shared = _Shared(Token(config, pool_size), 1)
            _OPEN[config.module] = shared
            _LIVE_TOKENS.add(shared.token)
        return shared.token


def lock() -> threading.Lock:
    """The registry lock (a new one in a forked child): held around :func:`release_locked`."""
    return _REGISTRY_LOCK


def release_locked(config: TokenConfig, token: Token) -> None:
    """One user less of ``token``; the last one closes it (finalising the module). The
    caller holds :func:`lock` (so that a store is released once)."""
    shared = _OPEN.get(config.module)
    if shared is not None and shared.token is token:
        shared.users -= 1
        if shared.users > 0:
            return
        del _OPEN[config.module]
    token.close()
    _LIVE_TOKENS.discard(token)


__all__ = ["acquire", "lock", "release_locked", "same_config"]
