"""A peer KMS's settings after ``kms peer add`` and the version of the shared key this KMS
sends with (RFC 6043 9; both registries).

The versions of the key shared with a peer live in ``psk_versions`` like an endpoint's
(kms.store.psk_versions: identity = the peer's KMS id, version 1 = ``peers.key_label``, named
``<kms id>#psk<N>``): what the peer may send is every live version there. Which version THIS
KMS sends with (its own id in IDRpsk, ``<our id>#psk<N>`` from version 2 on) is
``peers.send_version``: one column, changed only by ``kms peer use-psk``. It always names a
version that exists and is not retired: switching to a retired or unknown one is refused, and
so is retiring it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from kms.store.psk_versions import PskVersion, PskVersionError


class PeerUpdateError(Exception):
    """Bad ``kms peer set`` value (one line, no secrets)."""


class PeerVersionTables:
    """Mixed into :class:`kms.store.registry.Registry` (and so the PostgreSQL registry)."""

    def _q(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        raise NotImplementedError

    def transaction(self) -> AbstractContextManager[None]:
        raise NotImplementedError

    def get_peer(self, kms_id: bytes) -> Any:  # kms.store.registry.Peer
        raise NotImplementedError

    def psk_versions(self, identity: bytes) -> list[PskVersion]:
        raise NotImplementedError

    def retire_psk_version(self, identity: bytes, version: int) -> PskVersion:
        raise NotImplementedError

    def update_peer(
        self,
        kms_id: bytes,
        *,
        address: str | None = None,
        ca_pem: str | None = None,
        resolve_for: Sequence[str] | None = None,
        rate_limit: float | None = None,
        deadline_ms: int | None = None,
    ) -> Any:
        """Change the settings given (None: keep); returns the peer as it is now. A running
        server reads them on its next call (the registry's change detection)."""
        columns: list[tuple[str, object]] = []
        if address is not None:
            if not address or "\n" in address:
                raise PeerUpdateError("the address must be one non-empty line")
            columns.append(("address", address))
        if ca_pem is not None:
            columns.append(("ca_pem", ca_pem))
        if resolve_for is not None:
            if any(not p or "\n" in p for p in resolve_for):
                raise PeerUpdateError("resolve-for patterns must be non-empty single lines")
            columns.append(("resolve_for", "\n".join(resolve_for)))
        if rate_limit is not None:
            if rate_limit < 0:
                raise PeerUpdateError("peer rate limit must be >= 0")
            columns.append(("rate_limit", float(rate_limit)))
        if deadline_ms is not None:
            if deadline_ms <= 0:
                raise PeerUpdateError("peer deadline must be > 0")
            columns.append(("deadline_ms", int(deadline_ms)))
        with self.transaction():
            self.get_peer(kms_id)  # UnknownPeer
            if columns:
                assignments = ", ".join(f"{name} = ?" for name, _ in columns)
                self._q(
                    f"UPDATE peers SET {assignments} WHERE kms_id = ?",  # noqa: S608 (fixed names)
                    (*(value for _, value in columns), kms_id),
                )
            return self.get_peer(kms_id)

    def use_peer_psk_version(self, kms_id: bytes, version: int) -> PskVersion | None:
        """Send to the peer with ``version`` of the shared key from now on. Returns that
        version's row (None: version 1 of a key that was never rotated)."""
        with self.transaction():
            peer = self.get_peer(kms_id)
            if peer.key_label is None:
                raise PskVersionError("a certificate peer has no shared key (not a PSK peer)")
            versions = self.psk_versions(kms_id)
            found = next((v for v in versions if v.version == version), None)
            if found is None and not (version == 1 and not versions):
                raise PskVersionError(f"no PSK version {version} for this peer")
            if found is not None and found.retired:
                raise PskVersionError(f"PSK version {version} is retired (its key is destroyed)")
            self._q("UPDATE peers SET send_version = ? WHERE kms_id = ?", (version, kms_id))
        return found

    def retire_peer_psk_version(self, kms_id: bytes, version: int) -> PskVersion:
        """Retire ``version`` (the caller destroys its token object in the same transaction);
        refused for the version this KMS sends with."""
        with self.transaction():
            peer = self.get_peer(kms_id)
            if peer.send_version == version:
                raise PskVersionError(
                    f"PSK version {version} is the one this KMS sends with; switch with "
                    "`kms peer use-psk` first"
                )
            return self.retire_psk_version(kms_id, version)


SQLITE_MIGRATION = """
    ALTER TABLE peers ADD COLUMN send_version INTEGER NOT NULL DEFAULT 1 CHECK (send_version > 0);
    """

PG_MIGRATION = """
    ALTER TABLE peers ADD COLUMN send_version INTEGER NOT NULL DEFAULT 1 CHECK (send_version > 0);
    """
