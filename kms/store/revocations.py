"""Revocation records in the registry: suspended endpoints, revoked tickets, and "every
ticket this endpoint requested before T" (both the SQLite and the PostgreSQL registry).

One table, ``revocations (kind, subject)``, so that the serving path reads the whole list
with one statement (cluster mode: once per registry change, from the replica's cache) and
revocation takes effect on the next request. Entries are never secrets: identities, ticket
ids (the first 128 bits of SHA-256 over the Ticket Data, as the audit log and ``kms call``
print them) and times.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

TICKET_ID_LEN = 16  # first 128 bits of SHA-256 over Ticket Data
MAX_REASON_LEN = 200


class RevocationKind(StrEnum):
    SUSPENDED = "suspended"  # subject: an endpoint identity
    TICKET = "ticket"  # subject: a ticket id (16 bytes)
    REQUESTED_BEFORE = "requested_before"  # subject: an identity; not_before: a Unix time


@dataclass(frozen=True)
class RevocationEntry:
    kind: RevocationKind
    subject: bytes
    not_before: int  # REQUESTED_BEFORE: tickets issued before this time are revoked; else 0
    created_at: int
    reason: str


class RevocationError(Exception):
    """Bad revocation input (one line, no secrets); a RegistryError subclass wraps it."""


def parse_ticket_id(text: str) -> bytes:
    """A ticket id as printed by ``kms call`` and the audit log: 32 hex digits."""
    t = text.strip().lower()
    if t.startswith("0x"):
        t = t[2:]
    try:
        raw = bytes.fromhex(t)
    except ValueError:
        raw = b""
    if len(raw) != TICKET_ID_LEN:
        raise RevocationError(f"a ticket id is {2 * TICKET_ID_LEN} hex digits")
    return raw


def _reason(reason: str) -> str:
    if "\n" in reason or "\r" in reason or len(reason) > MAX_REASON_LEN:
        raise RevocationError(f"reason must be one line of at most {MAX_REASON_LEN} characters")
    return reason


class RevocationTables:
    """Mixed into :class:`kms.store.registry.Registry` (and so the PostgreSQL registry):
    uses its ``_q`` (dialect-neutral SQL) and ``transaction``."""

    def _q(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        raise NotImplementedError

    def transaction(self) -> AbstractContextManager[None]:
        raise NotImplementedError

    def _revocation(self, kind: RevocationKind, subject: bytes) -> RevocationEntry | None:
        rows = self._q(
            "SELECT kind, subject, not_before, created_at, reason FROM revocations "
            "WHERE kind = ? AND subject = ?",
            (kind.value, subject),
        )
        return _entry(rows[0]) if rows else None

    def suspend(self, identity: bytes, reason: str = "") -> RevocationEntry:
        """Suspend an endpoint (idempotent: a second call keeps the first record)."""
        reason = _reason(reason)
        with self.transaction():
            old = self._revocation(RevocationKind.SUSPENDED, identity)
            if old is not None:
                return old
            now = int(time.time())
            self._q(
                "INSERT INTO revocations (kind, subject, not_before, created_at, reason) "
                "VALUES (?, ?, 0, ?, ?)",
                (RevocationKind.SUSPENDED.value, identity, now, reason),
            )
        return RevocationEntry(RevocationKind.SUSPENDED, identity, 0, now, reason)

    def resume(self, identity: bytes) -> bool:
        """Lift a suspension; False if the identity was not suspended."""
        with self.transaction():
            if self._revocation(RevocationKind.SUSPENDED, identity) is None:
                return False
            self._q(
                "DELETE FROM revocations WHERE kind = ? AND subject = ?",
                (RevocationKind.SUSPENDED.value, identity),
            )
        return True

    def revoke_ticket(self, ticket_id: bytes, reason: str = "") -> RevocationEntry:
        """Revoke one ticket by id (final; idempotent)."""
        if len(ticket_id) != TICKET_ID_LEN:
            raise RevocationError(f"a ticket id is {TICKET_ID_LEN} bytes")
        reason = _reason(reason)
        with self.transaction():
            old = self._revocation(RevocationKind.TICKET, ticket_id)
            if old is not None:
                return old
            now = int(time.time())
            self._q(
                "INSERT INTO revocations (kind, subject, not_before, created_at, reason) "
                "VALUES (?, ?, 0, ?, ?)",
                (RevocationKind.TICKET.value, ticket_id, now, reason),
            )
        return RevocationEntry(RevocationKind.TICKET, ticket_id, 0, now, reason)

    def revoke_requested_before(
        self, identity: bytes, before: int, reason: str = ""
    ) -> RevocationEntry:
        """Revoke every ticket ``identity`` requested before ``before`` (Unix time). The
        time only moves forward: an earlier one than recorded changes nothing."""
        reason = _reason(reason)
        with self.transaction():
            old = self._revocation(RevocationKind.REQUESTED_BEFORE, identity)
            if old is not None and old.not_before >= before:
                return old
            now = int(time.time())
            if old is None:
                self._q(
                    "INSERT INTO revocations (kind, subject, not_before, created_at, reason) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (RevocationKind.REQUESTED_BEFORE.value, identity, int(before), now, reason),
                )
            else:
                self._q(
                    "UPDATE revocations SET not_before = ?, created_at = ?, reason = ? "
                    "WHERE kind = ? AND subject = ?",
                    (int(before), now, reason, RevocationKind.REQUESTED_BEFORE.value, identity),
                )
        return RevocationEntry(RevocationKind.REQUESTED_BEFORE, identity, int(before), now, reason)

    def prune_ticket_revocations(self, now: float, horizon_s: int) -> int:
        """Delete the ticket revocations older than ``horizon_s`` (see
        :func:`kms.core.revocation.ticket_revocation_horizon`): every ticket they could
        match has expired, so they refuse nothing any more. Suspensions and requested-before
        times are kept. Returns how many went; writes nothing (no registry change, so no
        cache invalidation in cluster mode) when none is due."""
        cutoff = int(now) - int(horizon_s)
        params = (RevocationKind.TICKET.value, cutoff)
        where = "WHERE kind = ? AND created_at < ?"
        with self.transaction():
            due = self._q(f"SELECT count(*) FROM revocations {where}", params)  # noqa: S608
            n = int(due[0][0]) if due else 0
            if n:
                self._q(f"DELETE FROM revocations {where}", params)  # noqa: S608
        return n

    def revocation_rows(self) -> list[tuple[str, bytes, int]]:
        """(kind, subject, not_before) of every entry, unordered: what the serving path
        reads (the whole list at once, see kms.core.revocation)."""
        rows = self._q("SELECT kind, subject, not_before FROM revocations")
        return [(str(r[0]), bytes(r[1]), int(r[2])) for r in rows]

    def list_revocations(self) -> list[RevocationEntry]:
        rows = self._q(
            "SELECT kind, subject, not_before, created_at, reason FROM revocations "
            "ORDER BY kind, subject"
        )
        return [_entry(r) for r in rows]


def _entry(r: Any) -> RevocationEntry:
    return RevocationEntry(
        kind=RevocationKind(r[0]),
        subject=bytes(r[1]),
        not_before=int(r[2]),
        created_at=int(r[3]),
        reason=str(r[4]),
    )


SQLITE_MIGRATION = """
    CREATE TABLE revocations (
        kind        TEXT    NOT NULL
                    CHECK (kind IN ('suspended', 'ticket', 'requested_before')),
        subject     BLOB    NOT NULL,
        not_before  INTEGER NOT NULL DEFAULT 0,
        created_at  INTEGER NOT NULL,
        reason      TEXT    NOT NULL DEFAULT '',
        PRIMARY KEY (kind, subject)
    );
    """

PG_MIGRATION = """
    CREATE TABLE revocations (
        kind        TEXT    NOT NULL
                    CHECK (kind IN ('suspended', 'ticket', 'requested_before')),
        subject     BYTEA   NOT NULL,
        not_before  BIGINT  NOT NULL DEFAULT 0,
        created_at  BIGINT  NOT NULL,
        reason      TEXT    NOT NULL DEFAULT '',
        PRIMARY KEY (kind, subject)
    );
    CREATE TRIGGER revocations_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
        ON revocations FOR EACH STATEMENT EXECUTE FUNCTION kms_registry_changed();
    """
