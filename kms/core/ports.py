"""The KMS core's ports: what it needs from the world, as small protocols.

Adapters in ``kms.server`` and ``kms.store`` implement them over the registry (SQLite), the
replay cache and the audit log; tests may use the in-memory ones in ``kms.store.memory``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from kms.keystore import KeyRef


class Directory(Protocol):
    """Identities, groups and key names (never key values)."""

    def psk_for(self, identity: bytes) -> KeyRef | None:
        """The PSK shared with an enabled endpoint (or peer KMS), None if there is none."""
        ...

    def is_member(self, group: bytes, identity: bytes) -> bool:
        """Whether ``identity`` is a member of group ``group`` now."""
        ...

    def is_known(self, identity: bytes) -> bool:
        """Whether ``identity`` is a registered endpoint or group."""
        ...

    def current_tpk(self) -> tuple[bytes, KeyRef]:
        """(TPK identifier for IDRpsk, key) of the current TPK version."""
        ...

    def tpk(self, tpk_id: bytes) -> KeyRef | None:
        """The TPK an IDRpsk names, if it is current or still active (not retired)."""
        ...

    def applications(self) -> frozenset[bytes]:
        """Authorised application identities (IDRapp); empty: no restriction."""
        ...


class ReplayCache(Protocol):
    """Remembers authenticated initial messages inside the timestamp window."""

    def check_and_store(self, digest: bytes, expires_at: float, now: float) -> bool:
        """Store ``digest``; return False if it was already there (a replay)."""
        ...


class ResolveLedger(Protocol):
    """Which responder resolved which non-reusable ticket (J = 0)."""

    def first_resolve(self, ticket_id: bytes, responder: bytes, expires_at: float) -> bool:
        """Record the resolve; return False if this responder already resolved it."""
        ...


class RateLimiter(Protocol):
    def allow(self, identity: bytes, now: float) -> bool: ...


class AuditSink(Protocol):
    def emit(self, record: Mapping[str, object]) -> None:
        """Write one structured audit record (never key material)."""
        ...
