"""Replay cache and resolve ledger in SQLite, shared by all worker processes of one KMS home.

Each worker has its own connection; a UNIQUE key makes "check and store" one atomic INSERT,
so two workers receiving copies of the same message cannot both accept it.

The request path only inserts. What used to stall it now runs in a housekeeping thread of
each process, on a connection of its own (SQLite runs without the GIL):

* WAL checkpoints. SQLite's automatic checkpoint runs in the connection whose commit takes
  the WAL past 1,000 pages, and it syncs the WAL and the database file: 2.5-6 ms on the
  serving thread every ~400 inserts (measured in ``kms serve``), which every call queued
  behind it waited for. Here a passive checkpoint runs every ``HOUSEKEEPING_S`` after
  inserts; it does not block writers. The serving connections keep an automatic checkpoint
  only as a backstop, at ``BACKSTOP_PAGES``, should the thread fall behind.
* Pruning. Deleting 1,000 expired rows and counting a table of 120,000 took 7-27 ms
  (measured). It runs every ``prune_every`` inserts as before, but in the thread and in
  batches of ``PRUNE_BATCH`` rows, each its own short write transaction, so that an insert
  never waits behind a long one.

Only a replay cache full of live rows still counts on the request path, before it refuses a
message (it must not refuse on a stale count).
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

WARN_EVERY_S = 10.0  # one warning per this many seconds for a condition that repeats
# The serving connections' own automatic checkpoint (pages of the WAL): only reached when
# the housekeeping thread falls behind (SQLite's default is 1,000).
BACKSTOP_PAGES = 10_000

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
    HOUSEKEEPING_S = 0.25
    PRUNE_BATCH = 256

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
        self.checkpoints = 0  # passive checkpoints the housekeeping thread has run
        self._local = threading.local()
        self._count = 0
        self._live = 0  # live rows at the last count, plus this process's inserts since
        self._counted_at = -1.0
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []  # every thread's, for close()
        self._last_now = 0.0  # the latest ``now`` an insert was made at: pruning's clock
        self._writes = 0  # committed inserts (and take-overs) of this process
        self._checkpointed_writes = 0  # ... when the last checkpoint started
        self._prune_due = False
        self._wake = threading.Event()
        self._closing = False
        self._keeper: threading.Thread | None = None
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
            conn.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def close(self) -> None:
        """Stop the housekeeping thread, close every thread's connection (the last one
        checkpoints the WAL)."""
        with self._lock:
            self._closing = True
            keeper = self._keeper
        self._wake.set()
        if keeper is not None:
            keeper.join(timeout=30)
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()

    def _start_keeper(self) -> None:
        with self._lock:
            if self._keeper is not None or self._closing:
                return
            self._keeper = threading.Thread(
                target=self._housekeeping, name=f"kms-sqlite-{self.path.stem}", daemon=True
            )
        self._keeper.start()

    def _housekeeping(self) -> None:
        """Checkpoint after writes, prune when due; until close()."""
        warned_at = -WARN_EVERY_S
        while True:
            self._wake.wait(self.HOUSEKEEPING_S)
            self._wake.clear()
            with self._lock:
                if self._closing:
                    return
                prune, self._prune_due = self._prune_due, False
                writes, now = self._writes, self._last_now
            try:
                if prune:
                    self.prune(now)
                if writes != self._checkpointed_writes:
                    # PASSIVE: copies what it can without waiting for, or blocking, anyone.
                    self._conn().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self._checkpointed_writes = writes
                    self.checkpoints += 1
            except sqlite3.Error as exc:
                # The next round tries again; the backstop checkpoint keeps the WAL bounded.
                # A failure that lasts (a full disk) repeats every round: warn now and then.
                if time.monotonic() - warned_at >= WARN_EVERY_S:
                    warned_at = time.monotonic()
                    log.warning(
                        "state database housekeeping failed: %s", type(exc).__name__,
                        extra={"fields": {"database": self.path.name, "error": str(exc)}},
                    )

    def add(self, key: bytes, expires_at: float, now: float) -> bool:
        """Insert ``key``; False if a live copy is already there."""
        conn = self._conn()
        if self._keeper is None:
            self._start_keeper()
        with self._lock:
            self._count += 1
            self._last_now = max(self._last_now, now)
            if self._count % self.prune_every == 0:
                self._prune_due = True
                self._wake.set()
            full = not self.evict_live and self._live >= self.capacity
            recount = full and time.monotonic() - self._counted_at >= self.RECOUNT_S
        if full and not recount:
            # Rows that have expired since the last count make room: count again now.
            recount = (
                conn.execute("SELECT 1 FROM seen WHERE expires_at <= ? LIMIT 1", (now,))
                .fetchone() is not None
            )
        if recount:
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
            if cur.rowcount == 1:
                with self._lock:
                    self._writes += 1
            return cur.rowcount == 1
        with self._lock:
            self._live += 1
            self._writes += 1
        return True

    def prune(self, now: float) -> None:
        """Delete the rows expired at ``now`` (and, with ``evict_live``, those beyond
        ``capacity`` that expire first), in batches of ``PRUNE_BATCH`` rows, one short write
        transaction each; then count the live rows."""
        conn = self._conn()
        batch = self.PRUNE_BATCH
        while conn.execute(
            "DELETE FROM seen WHERE digest IN "
            "(SELECT digest FROM seen WHERE expires_at <= ? LIMIT ?)", (now, batch)
        ).rowcount == batch:
            pass
        if self.evict_live:
            excess = int(conn.execute("SELECT count(*) FROM seen").fetchone()[0]) - self.capacity
            while excess > 0:
                gone = conn.execute(
                    "DELETE FROM seen WHERE digest IN "
                    "(SELECT digest FROM seen ORDER BY expires_at LIMIT ?)",
                    (min(excess, batch),),
                ).rowcount
                if gone <= 0:  # another process pruned the same rows meanwhile
                    break
                excess -= gone
            return
        live = int(conn.execute("SELECT count(*) FROM seen").fetchone()[0])
        with self._lock:
            self._live = live
            self._counted_at = time.monotonic()


_last_full_log = [0.0]


def log_full(path: Path, capacity: int) -> None:
    """One warning per ``WARN_EVERY_S`` (an overload repeats it for every request)."""
    now = time.monotonic()
    if now - _last_full_log[0] >= WARN_EVERY_S:
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
