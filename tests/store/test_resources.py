"""Resources the KMS holds are released: the handler built for `kms serve` closes its state
stores and audit file, and the SQLite resolve ledger is pruned by time, not only when it
reaches its row cap."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kms.endpoint.initiator import DesiredPolicy
from kms.server.compose import build_handler
from kms.store.state import BACKSTOP_PAGES, SqliteReplayCache, SqliteResolveLedger
from tests.server.world import BOB, World

T0 = 1_800_000_000.0


def _rows(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM seen").fetchone()[0])
    finally:
        conn.close()


def test_handler_close_releases_state_and_audit(world: World) -> None:
    handler = build_handler(world.home)
    deps = handler.deps  # type: ignore[attr-defined]
    # Use the stores from a second thread too (the gRPC server calls from a pool).
    wire, _ = world.initiator().request_ticket(DesiredPolicy((BOB,), lifetime_s=600), world.now)
    t = threading.Thread(target=lambda: handler.request_ticket(wire, world.now))
    t.start()
    t.join(60)
    assert (
        handler.request_ticket(wire, world.now).audit["reason"] == "replay of an accepted message"
    )
    state = world.home.path / "state"
    assert (state / "replay.sqlite3-wal").exists()

    handler.close()  # type: ignore[attr-defined]

    assert deps.audit.closed
    for store in (deps.replay, deps.ledger):
        with pytest.raises(sqlite3.ProgrammingError):
            store._set._conn().execute("SELECT 1")
    # The last connection closed checkpoints the WAL (the world's own KMS has some too).
    world.kms.close()  # type: ignore[attr-defined]
    assert not (state / "replay.sqlite3-wal").exists()
    assert not (state / "resolved.sqlite3-wal").exists()
    handler.close()  # type: ignore[attr-defined]  # idempotent


def test_resolve_ledger_is_pruned_by_time(tmp_path: Path) -> None:
    now = [T0]
    path = tmp_path / "resolved.sqlite3"
    ledger = SqliteResolveLedger(path, clock=lambda: now[0], prune_every=4)
    for i in range(3):  # tickets valid for 60 s
        assert ledger.first_resolve(bytes([i]) * 16, b"sip:bob@example.org", T0 + 60)
    assert ledger.first_resolve(b"L" * 16, b"sip:bob@example.org", T0 + 86400)  # long-lived
    assert _rows(path) == 4
    now[0] = T0 + 120  # the short tickets have expired
    assert not ledger.first_resolve(b"L" * 16, b"sip:bob@example.org", T0 + 86400)
    assert ledger.first_resolve(b"N" * 16, b"sip:bob@example.org", T0 + 3600)
    ledger.prune()
    # Expired rows are gone; live ones stay and still refuse a second resolve.
    assert _rows(path) == 2
    assert not ledger.first_resolve(b"L" * 16, b"sip:bob@example.org", T0 + 86400)
    assert not ledger.first_resolve(b"N" * 16, b"sip:bob@example.org", T0 + 3600)
    ledger.close()


def _eventually(check: Callable[[], bool]) -> bool:
    """``check`` became true within 30 s (the housekeeping thread's work)."""
    deadline = time.monotonic() + 30
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_resolve_ledger_prunes_on_its_own_while_resolving(tmp_path: Path) -> None:
    now = [T0]
    path = tmp_path / "resolved.sqlite3"
    ledger = SqliteResolveLedger(path, clock=lambda: now[0], prune_every=10)
    for i in range(9):
        assert ledger.first_resolve(i.to_bytes(16, "big"), b"sip:bob@example.org", T0 + 60)
    now[0] = T0 + 61
    # The 10th resolve asks for a prune; the housekeeping thread makes it, not the caller.
    assert ledger.first_resolve(b"x" * 16, b"sip:bob@example.org", T0 + 600)
    assert _eventually(lambda: _rows(path) == 1)
    ledger.close()


def test_state_housekeeping_checkpoints_off_the_inserting_thread(tmp_path: Path) -> None:
    """WAL checkpoints (a sync of the WAL and the database file) are the housekeeping
    thread's: the inserting connection's own automatic checkpoint is only a backstop."""
    path = tmp_path / "replay.sqlite3"
    cache = SqliteReplayCache(path)
    seen = cache._set
    conn = seen._conn()
    assert int(conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == BACKSTOP_PAGES
    assert seen.checkpoints == 0
    for i in range(50):
        assert cache.check_and_store(i.to_bytes(32, "big"), T0 + 240, T0)
    # Once the thread has checkpointed after the last insert, everything in the WAL is in
    # the database file: a passive checkpoint from another connection finds nothing to copy.
    assert _eventually(lambda: seen._checkpointed_writes == 50)
    assert seen.checkpoints >= 1
    other = sqlite3.connect(path)
    try:
        busy, frames, copied = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert (busy, frames - copied) == (0, 0)
    finally:
        other.close()
    keeper = seen._keeper
    assert keeper is not None and keeper.is_alive()
    cache.close()
    assert not keeper.is_alive()
    assert not path.with_name(path.name + "-wal").exists()


def test_state_pruning_in_batches_keeps_the_live_rows(tmp_path: Path) -> None:
    """More expired rows than one batch: all go, in several short transactions; the live
    rows stay and are still refused as replays."""
    path = tmp_path / "replay.sqlite3"
    seen = SqliteReplayCache(path)._set
    n = 3 * seen.PRUNE_BATCH + 7
    for i in range(n):
        assert seen.add(b"old" + i.to_bytes(4, "big"), T0 + 10, T0)
    for i in range(5):
        assert seen.add(b"new" + i.to_bytes(4, "big"), T0 + 600, T0)
    seen.prune(T0 + 11)
    assert _rows(path) == 5
    assert not seen.add(b"new" + (3).to_bytes(4, "big"), T0 + 600, T0 + 12)
    seen.close()
