"""The core's state ports: in-memory replay cache, resolve ledger and rate limiter
(kms/store/memory.py), and the SQLite replay cache / ledger shared by worker processes
(kms/store/state.py). The contract every replay cache and ledger keeps (memory, SQLite and
PostgreSQL alike) runs in test_pg_state.py; here is what is particular to each."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from kms.core.ports import ReplayCacheFull
from kms.store.memory import (
    ListAuditSink,
    MemoryReplayCache,
    MemoryResolveLedger,
    TokenBucketRateLimiter,
)
from kms.store.state import SqliteReplayCache, SqliteResolveLedger, SqliteSeenSet

REPO = Path(__file__).resolve().parents[2]
T0 = 1_800_000_000.0


def digest(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "big")).digest()


# --- MemoryReplayCache -------------------------------------------------------------------------


def test_memory_replay_cache_is_bounded() -> None:
    c = MemoryReplayCache(capacity=3)
    for i in range(3):
        assert c.check_and_store(digest(i), T0 + 240, T0)
    # Full of live digests: a new one is refused, never stored by forgetting a live one ...
    with pytest.raises(ReplayCacheFull):
        c.check_and_store(digest(3), T0 + 240, T0)
    assert len(c) == 3 and c.refused_full == 1
    # ... a replay is still answered as a replay ...
    assert not c.check_and_store(digest(0), T0 + 240, T0 + 1)
    # ... and once the oldest have expired there is room again.
    assert c.check_and_store(digest(3), T0 + 500, T0 + 240)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_attack_replay_cache_eviction(kind: str, tmp_path: Path) -> None:
    """Size 100, then 1,100 other messages inside the window, then ten 2-second-old
    messages again: none may be accepted (before: 10 of 10 were, their digests evicted)."""
    cache: Any = (
        MemoryReplayCache(capacity=100)
        if kind == "memory"
        else SqliteReplayCache(tmp_path / "replay.sqlite3", capacity=100)
    )
    window = 120
    for i in range(10):
        assert cache.check_and_store(digest(i), T0 + 2 * window, T0)
    accepted = full = 0
    for i in range(1000, 2100):
        try:
            accepted += cache.check_and_store(digest(i), T0 + 1 + 2 * window, T0 + 1)
        except ReplayCacheFull:
            full += 1
    assert (accepted, full) == (90, 1010)
    assert cache.refused_full == 1010
    replays = [cache.check_and_store(digest(i), T0 + 2 + 2 * window, T0 + 2) for i in range(10)]
    assert replays == [False] * 10
    # After the window the digests expire and new messages are accepted again.
    assert cache.check_and_store(digest(5000), T0 + 4 * window, T0 + 2 * window + 2)


def test_memory_replay_cache_drops_expired_digests_first() -> None:
    c = MemoryReplayCache(capacity=10)
    for i in range(5):
        c.check_and_store(digest(i), T0 + 10, T0)
    c.check_and_store(digest(99), T0 + 300, T0 + 20)  # everything before has expired
    assert len(c) == 1


# --- MemoryResolveLedger --------------------------------------------------------------------


def test_memory_ledger_keeps_ticket_responder_pairs_apart() -> None:
    """(The contract, one resolve per responder, runs on every backend in test_pg_state.)"""
    ledger = MemoryResolveLedger()
    tid = bytes(16)
    assert ledger.first_resolve(tid, b"sip:bob@x", T0 + 3600)
    # The separator keeps (ticket, responder) pairs apart.
    assert ledger.first_resolve(tid + b"\x00sip", b":bob@x", T0 + 3600)


# --- TokenBucketRateLimiter ---------------------------------------------------------------


def test_rate_limiter_burst_then_rate() -> None:
    rl = TokenBucketRateLimiter(rate=2, burst=3)
    assert [rl.allow(b"a", T0) for _ in range(4)] == [True, True, True, False]
    assert rl.allow(b"a", T0 + 0.5)  # one token back after 1/rate s
    assert not rl.allow(b"a", T0 + 0.5)
    assert [rl.allow(b"a", T0 + 100) for _ in range(4)] == [True, True, True, False]  # capped


def test_rate_limiter_is_per_identity() -> None:
    rl = TokenBucketRateLimiter(rate=1, burst=1)
    assert rl.allow(b"a", T0) and not rl.allow(b"a", T0)
    assert rl.allow(b"b", T0)


def test_rate_limiter_default_burst_and_unlimited() -> None:
    assert TokenBucketRateLimiter(rate=50).burst == 100
    assert TokenBucketRateLimiter(rate=0.1).burst == 1.0
    rl = TokenBucketRateLimiter(rate=0)
    assert all(rl.allow(b"a", T0) for _ in range(1000))


def test_rate_limiter_is_bounded_in_identities() -> None:
    rl = TokenBucketRateLimiter(rate=1, burst=1, max_identities=2)
    for who in (b"a", b"b", b"c"):
        assert rl.allow(who, T0)
    assert len(rl._buckets) == 2
    assert rl.allow(b"a", T0)  # forgotten (oldest): a fresh bucket
    assert not rl.allow(b"c", T0)


def test_rate_limiter_survives_a_clock_stepping_back() -> None:
    """The KMS takes ``now`` from the wall clock (time.time() in the adapter, per thread):
    a clock stepped back by NTP, or two threads whose ``now`` arrive out of order, must not
    drain a bucket. A negative elapsed time must count as zero."""
    rl = TokenBucketRateLimiter(rate=50)  # the kms.toml default: 50/s, burst 100
    assert rl.allow(b"sip:alice@example.org", T0)
    allowed = rl.allow(b"sip:alice@example.org", T0 - 5)  # clock stepped back 5 s
    assert allowed, (
        "BUG in kms/store/memory.py TokenBucketRateLimiter.allow: a clock that steps back "
        "by d seconds removes d*rate tokens (here 250 of 100), locking the identity out for "
        "about d seconds; clamp the elapsed time at 0 (max(0.0, now - last))"
    )


# --- ListAuditSink ----------------------------------------------------------------------------


def test_list_audit_sink_copies_records() -> None:
    sink = ListAuditSink()
    rec: dict[str, object] = {"event": "refused"}
    sink.emit(rec)
    rec["event"] = "changed"
    assert sink.records == [{"event": "refused"}]


# --- SQLite replay cache and ledger ------------------------------------------------------------


def test_sqlite_replay_cache_accepts_a_digest_once(tmp_path: Path) -> None:
    c = SqliteReplayCache(tmp_path / "replay.sqlite3")
    assert c.check_and_store(digest(1), T0 + 240, T0)
    assert not c.check_and_store(digest(1), T0 + 240, T0 + 1)
    assert c.check_and_store(digest(2), T0 + 240, T0)
    # Expired: taken over atomically (the timestamp window refuses the message anyway).
    assert c.check_and_store(digest(1), T0 + 600, T0 + 240)
    assert not c.check_and_store(digest(1), T0 + 600, T0 + 300)


def test_sqlite_replay_cache_persists_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "replay.sqlite3"
    assert SqliteReplayCache(path).check_and_store(digest(7), T0 + 240, T0)
    # A restarted worker (new connection) still knows the digest.
    assert not SqliteReplayCache(path).check_and_store(digest(7), T0 + 240, T0 + 5)


def test_sqlite_seen_set_prunes_expired_and_excess_rows(tmp_path: Path) -> None:
    s = SqliteSeenSet(tmp_path / "seen.sqlite3", capacity=5, prune_every=1_000_000)
    for i in range(10):
        s.add(digest(i), T0 + 100 + i, T0)
    s.prune(T0)
    rows = s._conn().execute("SELECT count(*) FROM seen").fetchone()[0]
    assert rows == 5
    # The rows that expire last were kept.
    assert not s.add(digest(9), T0 + 200, T0)
    assert s.add(digest(0), T0 + 200, T0)
    s.prune(T0 + 1000)
    assert s._conn().execute("SELECT count(*) FROM seen").fetchone()[0] == 0


_WORKER = textwrap.dedent(
    """
    import hashlib, json, sys, time
    from pathlib import Path
    from kms.store.state import SqliteReplayCache

    path, go, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    cache = SqliteReplayCache(path)
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.005)
    won = [i for i in range(n)
           if cache.check_and_store(hashlib.sha256(i.to_bytes(8, "big")).digest(),
                                    float(sys.argv[4]), float(sys.argv[5]))]
    print(json.dumps(won), flush=True)
    """
)


def test_sqlite_replay_cache_shared_by_two_processes(tmp_path: Path) -> None:
    """Two worker processes of one KMS home receive copies of the same messages: every
    digest is accepted by exactly one of them (docs/design.md, replay window;
    kms serve --workers)."""
    path = tmp_path / "replay.sqlite3"
    go = tmp_path / "go"
    n = 400
    SqliteReplayCache(path)  # schema first, as the server does before forking workers
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(path), str(go), str(n), str(T0 + 240), str(T0)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
        go.touch()  # both start together: the inserts interleave
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0
            results.append(set(json.loads(out)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    a, b = results
    assert not a & b, "a digest was accepted by both processes"
    assert a | b == set(range(n)), "a digest was accepted by neither process"
    # And afterwards, in this process too, every digest is a replay.
    c = SqliteReplayCache(path)
    assert not any(c.check_and_store(digest(i), T0 + 240, T0 + 1) for i in range(n))


def test_sqlite_ledger_one_resolve_per_responder(tmp_path: Path) -> None:
    path = tmp_path / "resolved.sqlite3"
    ledger = SqliteResolveLedger(path)
    tid = bytes(range(16))
    assert ledger.first_resolve(tid, b"sip:bob@x", T0 + 3600)
    assert not ledger.first_resolve(tid, b"sip:bob@x", T0 + 3600)
    assert ledger.first_resolve(tid, b"sip:carol@x", T0 + 3600)
    # Another worker (or a restart) sees the same ledger.
    assert not SqliteResolveLedger(path).first_resolve(tid, b"sip:bob@x", T0 + 3600)
    # Ledger and replay cache may share a file without colliding (prefixed keys).
    shared = tmp_path / "state.sqlite3"
    assert SqliteReplayCache(shared).check_and_store(tid + b"\x00sip:bob@x", T0 + 9, T0)
    assert SqliteResolveLedger(shared).first_resolve(tid, b"sip:bob@x", T0 + 9)


def test_sqlite_ledger_entries_outlive_wall_clock(tmp_path: Path) -> None:
    """The ledger ignores 'now' on insert: an entry stays until the ticket's own expiry."""
    ledger = SqliteResolveLedger(tmp_path / "resolved.sqlite3")
    tid = b"\x05" * 16
    assert ledger.first_resolve(tid, b"sip:bob@x", time.time() + 3600)
    assert not ledger.first_resolve(tid, b"sip:bob@x", time.time() + 7200)
