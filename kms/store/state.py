"""Replay cache and resolve ledger in SQLite, shared by all worker processes of one KMS home.

Each worker has its own connection; a UNIQUE key makes "check and store" one atomic INSERT,
so two workers receiving copies of the same message cannot both accept it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kms.core.ports import StoreUnavailable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    digest BLOB PRIMARY KEY,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_expiry ON seen(expires_at);
"""


class SqliteSeenSet:
    """A set of keys with expiry times, bounded in rows, safe across processes."""

    def __init__(self, path: Path, capacity: int = 100_000, prune_every: int = 1000) -> None:
        self.path = path
        self.capacity = capacity
        self.prune_every = prune_every
        self._local = threading.local()
        self._count = 0
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []  # every thread's, for close()
        with self._conn() as conn:
            conn.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # Used by its own thread only; close() may close it from another one.
            conn = sqlite3.connect(
                self.path, timeout=10.0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def close(self) -> None:
        """Close every thread's connection (the last one checkpoints the WAL)."""
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()

    def add(self, key: bytes, expires_at: float, now: float) -> bool:
        """Insert ``key``; False if a live copy is already there."""
        conn = self._conn()
        with self._lock:
            self._count += 1
            prune = self._count % self.prune_every == 0
        if prune:
            self.prune(now)
        try:
            conn.execute("INSERT INTO seen(digest, expires_at) VALUES (?, ?)", (key, expires_at))
            return True
        except sqlite3.IntegrityError:
            # Present: a replay, unless that row has expired (then take it over atomically).
            cur = conn.execute(
                "UPDATE seen SET expires_at = ? WHERE digest = ? AND expires_at <= ?",
                (expires_at, key, now),
            )
            return cur.rowcount == 1

    def prune(self, now: float) -> None:
        conn = self._conn()
        conn.execute("DELETE FROM seen WHERE expires_at <= ?", (now,))
        conn.execute(
            "DELETE FROM seen WHERE digest IN (SELECT digest FROM seen ORDER BY expires_at "
            "LIMIT max(0, (SELECT count(*) FROM seen) - ?))",
            (self.capacity,),
        )


class SqliteReplayCache:
    def __init__(self, path: Path, capacity: int = 100_000) -> None:
        self._set = SqliteSeenSet(path, capacity)

    def check_and_store(self, digest: bytes, expires_at: float, now: float) -> bool:
        return self._set.add(b"r" + digest, expires_at, now)

    def close(self) -> None:
        self._set.close()


class SqliteResolveLedger:
    """``clock``: the wall clock the rows' ``expires_at`` (the ticket's TRe) is compared
    with. An expired row is pruned (every ``prune_every`` resolves, and by :meth:`prune`)
    and may be taken over: its ticket is refused as expired before the ledger is asked."""

    def __init__(
        self,
        path: Path,
        capacity: int = 1_000_000,
        clock: Callable[[], float] = time.time,
        prune_every: int = 1000,
    ) -> None:
        self._set = SqliteSeenSet(path, capacity, prune_every)
        self._clock = clock

    def first_resolve(self, ticket_id: bytes, responder: bytes, expires_at: float) -> bool:
        # A ticket stays "resolved" until its own validity ends (expires_at).
        key = b"t" + ticket_id + b"\x00" + responder
        try:
            return self._set.add(key, expires_at, self._clock())
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"resolve ledger: {type(exc).__name__}") from None

    def prune(self) -> None:
        self._set.prune(self._clock())

    def close(self) -> None:
        self._set.close()
