"""Putting a SQLite database in WAL mode when several processes open it at once.

Switching a database to WAL needs an exclusive lock. The workers of one ``kms serve`` open
the same new state files at the same moment, and one of them has been seen to get "database
is locked" from the switch at start (a worker failed to start in a clean-clone CI run),
although its connection had a 10 s busy timeout. So the switch is retried here until
``timeout_s``. The mode is persistent: once set, later connections find it.
"""

from __future__ import annotations

import sqlite3
import time

RETRY_S = 0.01


def enable_wal(conn: sqlite3.Connection, timeout_s: float) -> str:
    """Set ``journal_mode=WAL`` (retrying a locked database up to ``timeout_s``); returns
    the mode SQLite reports afterwards."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(RETRY_S)
