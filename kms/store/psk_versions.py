"""Versions of an endpoint's or an intermediate node's PSK, for rotation without downtime
(both registries; one table for both: endpoint and node identities never coincide).

RFC 6043 4.2.1 / 4.2.3: IDRpsk in REQUEST_INIT_PSK / RESOLVE_INIT_PSK is "used to indicate the
pre-shared key used". A version is named by IDRpsk ID Data ``<identity>#psk<N>``; version 1
is the PSK the endpoint was registered with, named by its identity (or by no IDRpsk at all,
as before any rotation). Rows exist once an endpoint has been rotated: version 1's row is
written by the first rotation and keeps ``endpoints.key_label`` as its label.

A version is usable while its state is ``active`` and ``retire_at`` (if set: the end of the
overlap chosen at rotation) has not passed; ``retired`` means its token object is destroyed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from kms.core.psk_versions import NAME_SEPARATOR, version_name


class PskVersionError(Exception):
    """Bad PSK-version operation (one line, no secrets)."""


@dataclass(frozen=True)
class PskVersion:
    identity: bytes
    version: int
    name: bytes  # what IDRpsk carries
    key_label: str
    retired: bool
    created_at: int
    retire_at: int | None  # end of the overlap (None: until retired explicitly)

    def usable(self, now: float) -> bool:
        return not self.retired and (self.retire_at is None or now < self.retire_at)

    def state(self, now: float) -> str:
        """What `psk-list` shows: retired, active (accepted now) or expired (its overlap
        ended)."""
        return "retired" if self.retired else ("active" if self.usable(now) else "expired")


class PskVersionTables:
    """Mixed into :class:`kms.store.registry.Registry` (and so the PostgreSQL registry)."""

    def _q(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        raise NotImplementedError

    def transaction(self) -> AbstractContextManager[None]:
        raise NotImplementedError

    def psk_versions(self, identity: bytes) -> list[PskVersion]:
        rows = self._q(
            "SELECT identity, version, name, key_label, retired, created_at, retire_at "
            "FROM psk_versions WHERE identity = ? ORDER BY version",
            (identity,),
        )
        return [_version(r) for r in rows]

    def find_psk_version(self, name: bytes) -> PskVersion | None:
        """The version IDRpsk ``name`` designates (None: not a rotated endpoint's name)."""
        rows = self._q(
            "SELECT identity, version, name, key_label, retired, created_at, retire_at "
            "FROM psk_versions WHERE name = ?",
            (name,),
        )
        return _version(rows[0]) if rows else None

    def add_psk_version(
        self, identity: bytes, base_label: str, key_label: str, overlap_s: int | None,
        number: int | None = None,
    ) -> PskVersion:  # fmt: skip
        """Record a new version; ``overlap_s``: the older usable versions stop being usable
        that many seconds from now (None: until retired explicitly). ``number``: the version
        number (default: one more than the newest; a peer KMS's must match the number its
        operator gave the same key, so it may skip some). Call inside the transaction that
        creates the token object."""
        now = int(time.time())
        with self.transaction():
            existing = self.psk_versions(identity)
            if not existing:
                self._q(
                    "INSERT INTO psk_versions (identity, version, name, key_label, retired, "
                    "created_at, retire_at) VALUES (?, 1, ?, ?, 0, ?, NULL)",
                    (identity, identity, base_label, now),
                )
                existing = self.psk_versions(identity)
            newest = max(v.version for v in existing)
            if number is None:
                number = newest + 1
            elif number <= newest:
                raise PskVersionError(
                    f"PSK version {number} must be newer than version {newest}"
                )
            name = version_name(identity, number)
            if overlap_s is not None:
                self._q(
                    "UPDATE psk_versions SET retire_at = ? WHERE identity = ? AND retired = 0 "
                    "AND (retire_at IS NULL OR retire_at > ?)",
                    (now + overlap_s, identity, now + overlap_s),
                )
            self._q(
                "INSERT INTO psk_versions (identity, version, name, key_label, retired, "
                "created_at, retire_at) VALUES (?, ?, ?, ?, 0, ?, NULL)",
                (identity, number, name, key_label, now),
            )
        return PskVersion(identity, number, name, key_label, False, now, None)

    def retire_psk_version(self, identity: bytes, version: int) -> PskVersion:
        """Mark a version retired (the caller destroys its token object in the same
        transaction). The newest usable version cannot be retired: the endpoint would have
        no PSK left."""
        with self.transaction():
            versions = self.psk_versions(identity)
            found = next((v for v in versions if v.version == version), None)
            if found is None:
                raise PskVersionError(f"no PSK version {version} for this identity")
            if found.retired:
                raise PskVersionError(f"PSK version {version} is already retired")
            live = [v for v in versions if not v.retired]
            if [v.version for v in live] == [version]:
                raise PskVersionError(f"PSK version {version} is the only PSK left; rotate first")
            self._q(
                "UPDATE psk_versions SET retired = 1 WHERE identity = ? AND version = ?",
                (identity, version),
            )
        return PskVersion(
            found.identity, found.version, found.name, found.key_label, True,
            found.created_at, found.retire_at,
        )

    def due_psk_versions(self, now: float) -> list[PskVersion]:
        """Versions whose overlap has ended but whose token object still exists."""
        rows = self._q(
            "SELECT identity, version, name, key_label, retired, created_at, retire_at "
            "FROM psk_versions WHERE retired = 0 AND retire_at IS NOT NULL "
            "AND retire_at <= ? ORDER BY identity, version",
            (int(now),),
        )
        return [_version(r) for r in rows]

    def forget_psk_versions(self, identity: bytes) -> list[PskVersion]:
        """Drop an endpoint's version rows (it is being removed); returns them."""
        with self.transaction():
            versions = self.psk_versions(identity)
            self._q("DELETE FROM psk_versions WHERE identity = ?", (identity,))
        return versions


def _version(r: Any) -> PskVersion:
    return PskVersion(
        identity=bytes(r[0]),
        version=int(r[1]),
        name=bytes(r[2]),
        key_label=str(r[3]),
        retired=bool(r[4]),
        created_at=int(r[5]),
        retire_at=None if r[6] is None else int(r[6]),
    )


SQLITE_MIGRATION = """
    CREATE TABLE psk_versions (
        identity    BLOB    NOT NULL,
        version     INTEGER NOT NULL CHECK (version > 0),
        name        BLOB    NOT NULL UNIQUE,
        key_label   TEXT    NOT NULL UNIQUE,
        retired     INTEGER NOT NULL DEFAULT 0 CHECK (retired IN (0, 1)),
        created_at  INTEGER NOT NULL,
        retire_at   INTEGER,
        PRIMARY KEY (identity, version)
    );
    """

PG_MIGRATION = """
    CREATE TABLE psk_versions (
        identity    BYTEA   NOT NULL,
        version     INTEGER NOT NULL CHECK (version > 0),
        name        BYTEA   NOT NULL UNIQUE,
        key_label   TEXT    NOT NULL UNIQUE,
        retired     INTEGER NOT NULL DEFAULT 0 CHECK (retired IN (0, 1)),
        created_at  BIGINT  NOT NULL,
        retire_at   BIGINT,
        PRIMARY KEY (identity, version)
    );
    CREATE TRIGGER psk_versions_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
        ON psk_versions FOR EACH STATEMENT EXECUTE FUNCTION kms_registry_changed();
    """

__all__ = [
    "NAME_SEPARATOR", "PG_MIGRATION", "SQLITE_MIGRATION", "PskVersion", "PskVersionError",
    "PskVersionTables", "version_name",
]  # fmt: skip
