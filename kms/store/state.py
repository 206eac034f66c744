"""Replay cache and resolve ledger in SQLite, shared by all worker processes of one KMS home.

Each worker has its own connection; a UNIQUE key makes "check and store" one atomic INSERT,
so two workers receiving copies of the same message cannot both accept it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kms.core.ports import ReplayCacheFull, StoreUnavailable
from kms.store.wal import enable_wal

log = logging.getLogger("kms.store.state")

FULL_LOG_EVERY_S = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    digest BLOB PRIMARY KEY,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_expiry ON seen(expires_at);
"""


class SqliteSeenSet:
    """A set of keys with expiry times, bounded in rows, safe across processes.

    ``evict_live`` (the resolve ledger): beyond ``capacity`` rows the rows that expire first
    are dropped. Without it (the replay cache) a live row is never dropped: once
    ``capacity`` live rows are there, :meth:`add` raises :class:`ReplayCacheFull`. Each
    process counts the live rows at every prune (every ``prune_every`` of its inserts) and
    adds its own inserts in between, so with N worker processes the table may exceed
    ``capacity`` by up to N x ``prune_every`` rows before they notice. Before a message is
    refused the live rows are counted again (when rows have expired since, or at most
    every ``RECOUNT_S`` otherwise: other processes may have pruned).
    """

    RECOUNT_S = 0.05

    def __init__(
        self,
        path: Path,
        capacity: int = 100_000,
        prune_every: int | None = None,
        *,
        evict_live: bool = True,
    ) -> None:
        self.path = path
        self.capacity = capacity
        self.prune_every = prune_every or max(1, min(1000, capacity // 10))
        self.evict_live = evict_live
        self.refused_full = 0
        self._local = threading.local()
        self._count = 0
        self._live = 0  # live rows at the last count, plus this process's inserts since
        self._counted_at = -1.0
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
            enable_wal(conn, timeout_s=10.0)
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
            full = not self.evict_live and self._live >= self.capacity
            recount = full and time.monotonic() - self._counted_at >= self.RECOUNT_S
        if full and not recount:
            # Rows that have expired since the last count make room: count again now.
            recount = (
                conn.execute("SELECT 1 FROM seen WHERE expires_at <= ? LIMIT 1", (now,))
                .fetchone() is not None
            )
        if prune or recount:
            self.prune(now)
            with self._lock:
                full = not self.evict_live and self._live >= self.capacity
        if full:
            # A replay must still be answered as one: only a new key is refused.
            row = conn.execute(
                "SELECT 1 FROM seen WHERE digest = ? AND expires_at > ?", (key, now)
            ).fetchone()
            if row is not None:
                return False
            with self._lock:
                self.refused_full += 1
            log_full(self.path, self.capacity)
            raise ReplayCacheFull(f"{self.capacity} live entries")
        try:
            conn.execute("INSERT INTO seen(digest, expires_at) VALUES (?, ?)", (key, expires_at))
        except sqlite3.IntegrityError:
            # Present: a replay, unless that row has expired (then take it over atomically).
            cur = conn.execute(
                "UPDATE seen SET expires_at = ? WHERE digest = ? AND expires_at <= ?",
                (expires_at, key, now),
            )
            return cur.rowcount == 1
        with self._lock:
            self._live += 1
        return True

    def prune(self, now: float) -> None:
        conn = self._conn()
        conn.execute("DELETE FROM seen WHERE expires_at <= ?", (now,))
        if self.evict_live:
            conn.execute(
                "DELETE FROM seen WHERE digest IN (SELECT digest FROM seen ORDER BY expires_at "
                "LIMIT max(0, (SELECT count(*) FROM seen) - ?))",
                (self.capacity,),
            )
            return
        live = int(conn.execute("SELECT count(*) FROM seen").fetchone()[0])
        with self._lock:
            self._live = live
            self._counted_at = time.monotonic()


_last_full_log = [0.0]


def log_full(path: Path, capacity: int) -> None:
    """One warning per ``FULL_LOG_EVERY_S`` (an overload repeats it for every request)."""
    now = time.monotonic()
    if now - _last_full_log[0] >= FULL_LOG_EVERY_S:
        _last_full_log[0] = now
        log.warning(
            "replay cache full of live entries: new messages refused",
            extra={"fields": {"cache": path.name, "capacity": capacity}},
        )


class SqliteReplayCache:
    def __init__(self, path: Path, capacity: int = 100_000) -> None:
        self._set = SqliteSeenSet(path, capacity, evict_live=False)

    @property
    def refused_full(self) -> int:
        """New messages refused because the cache was full of live entries."""
        return self._set.refused_full

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
