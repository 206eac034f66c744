"""WAL mode set while another connection holds the database's lock (two kms serve workers
opening the same new state file at once): the switch waits for the lock instead of failing."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from kms.store.wal import enable_wal


def test_the_switch_waits_for_a_held_lock(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t(x)")
    holder.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        other.execute("PRAGMA journal_mode=WAL")  # what a worker saw at start
    release = threading.Timer(0.2, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        assert enable_wal(other, timeout_s=10.0) == "wal"
    finally:
        release.join()
        holder.close()
        other.close()


def test_a_lock_held_past_the_timeout_is_still_an_error(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t(x)")
    holder.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            enable_wal(other, timeout_s=0.05)
    finally:
        holder.close()
        other.close()
