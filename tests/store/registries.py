"""Helpers of the registry tests."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from kms.store.pg import RegistryWatcher
from kms.store.registry import MIGRATIONS, _statements


def generation_changes(
    watcher: RegistryWatcher, action: Callable[[], object], timeout_s: float = 10.0
) -> bool:
    """Whether the registry generation ``watcher`` follows changes after ``action`` (within
    ``timeout_s``): replicas cache registry reads until it does."""
    before = watcher.generation
    action()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if watcher.generation != before:
            return True
        time.sleep(0.02)
    return False


def sqlite_registry_at(path: Path, version: int) -> sqlite3.Connection:
    """A SQLite registry at ``path`` as a release with schema ``version`` left it (the first
    ``version`` migrations), open in autocommit mode for the test to add rows."""
    conn = sqlite3.connect(path, isolation_level=None)
    for script in MIGRATIONS[:version]:
        for st in _statements(script):
            conn.execute(st)
    conn.execute(f"PRAGMA user_version = {version}")
    return conn
