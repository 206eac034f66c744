"""The state of one connection to a token: plain data shared by the package's modules."""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from typing import Any

from pkcs11 import ObjectClass

from hsm.pkcs11.mechanisms import MechanismPlan
from kms.keystore import KeyInfo


@dataclass
class KeyMeta:
    """What the catalogue knows about one labelled key (never its value)."""

    info: KeyInfo
    handles: dict[ObjectClass, int]  # CKA_CLASS -> object handle (the same in every session)
    secret_len: int = 0  # true length of a secret key
    stored_len: int = 0
    public_der: bytes | None = None


@dataclass(eq=False)
class PooledSession:
    """One operation session of the pool; used by one thread at a time."""

    session: Any  # pkcs11.Session
    # label -> {CKA_CLASS: pkcs11 Object bound to THIS session}
    bound: dict[str, dict[ObjectClass, Any]] = field(default_factory=dict)
    # label -> (this session's working copy of a long-term secret, when its stored object
    # was last seen valid); see hsm.pkcs11.working
    working: dict[str, tuple[Any, float]] = field(default_factory=dict)


@dataclass(eq=False)
class Connection:
    """A logged-in token: the login session, the session pool and the handle catalogue."""

    lib: Any  # pkcs11.lib
    token: Any  # pkcs11.Token
    login_session: Any  # pkcs11.Session
    sessions: list[PooledSession]
    idle: queue.SimpleQueue[PooledSession]
    keys: dict[str, KeyMeta]
    pid: int
    broken: bool = False
    # Labels whose working copy the token refused (CKA_COPYABLE false, or no C_CopyObject):
    # those keys are used as the stored objects themselves.
    no_copy: set[str] = field(default_factory=set)
    # How each operation is done on this module (hsm.pkcs11.mechanisms), read once per
    # connection.
    plan: MechanismPlan = field(default_factory=lambda: MechanismPlan({}))


__all__ = ["Connection", "KeyMeta", "PooledSession"]
