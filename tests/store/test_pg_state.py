"""State ports shared by replicas: the same contract for memory, SQLite (one host) and
PostgreSQL (cluster), then what only the cluster needs: one winner among processes, limits that hold
across replicas, pruning that never touches live rows, concurrent migrations, and failing
closed (StoreUnavailable) when the database is gone."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from kms.core.ports import ReplayCache, ResolveLedger, StoreUnavailable
from kms.store.memory import MemoryReplayCache, MemoryResolveLedger
from kms.store.pg import MIGRATIONS, DatabaseError, PgDatabase, PgSettings, SchemaTooNewError
from kms.store.pg_state import (
    PgAdmission,
    PgQuota,
    PgRateLimiter,
    PgReplayCache,
    PgResolveLedger,
    Pruner,
)
from kms.store.state import SqliteReplayCache, SqliteResolveLedger
from tests.pgcluster import _free_port

REPO = Path(__file__).resolve().parents[2]
T0 = 1_800_000_000.0


def digest(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "big")).digest()


@pytest.fixture
def db(pg_dsn: str) -> Iterator[PgDatabase]:
    d = PgDatabase(PgSettings(dsn=pg_dsn))
    d.migrate()
    yield d
    d.close()


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def stores(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[ReplayCache, ResolveLedger]]:
    """The replay cache and resolve ledger of each backend: in process memory (one worker,
    and the core's unit tests), SQLite (the worker processes of one host), PostgreSQL (the
    replicas of a cluster)."""
    if request.param == "memory":
        yield MemoryReplayCache(), MemoryResolveLedger()
        return
    if request.param == "sqlite":
        yield (
            SqliteReplayCache(tmp_path / "replay.sqlite3"),
            SqliteResolveLedger(tmp_path / "resolved.sqlite3"),
        )
        return
    d = request.getfixturevalue("db")
    yield PgReplayCache(d), PgResolveLedger(d)


# --- the contract, on every backend ----------------------------------------------------


def test_replay_cache_accepts_a_digest_once(stores: tuple[ReplayCache, ResolveLedger]) -> None:
    c, _ = stores
    assert c.check_and_store(digest(1), T0 + 240, T0)
    assert not c.check_and_store(digest(1), T0 + 240, T0 + 1)
    assert not c.check_and_store(digest(1), T0 + 480, T0 + 239)
    assert c.check_and_store(digest(2), T0 + 240, T0)
    # Expired: taken over atomically (the timestamp window refuses the message anyway).
    assert c.check_and_store(digest(1), T0 + 600, T0 + 240)
    assert not c.check_and_store(digest(1), T0 + 600, T0 + 300)


def test_ledger_one_resolve_per_responder(stores: tuple[ReplayCache, ResolveLedger]) -> None:
    _, ledger = stores
    tid = bytes(range(16))
    assert ledger.first_resolve(tid, b"sip:bob@x", T0 + 3600)
    assert not ledger.first_resolve(tid, b"sip:bob@x", T0 + 3600)
    assert ledger.first_resolve(tid, b"sip:carol@x", T0 + 3600)
    assert ledger.first_resolve(b"\x01" * 16, b"sip:bob@x", T0 + 3600)
    # The entry stays until the ticket's own expiry, whatever the wall clock says.
    assert not ledger.first_resolve(tid, b"sip:bob@x", T0 + 7200)


def test_threads_one_winner(stores: tuple[ReplayCache, ResolveLedger]) -> None:
    c, _ = stores
    wins: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        for i in range(60):
            if c.check_and_store(digest(i), T0 + 240, T0):
                with lock:
                    wins.append(i)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == list(range(60))


# --- PostgreSQL: across processes (replicas) ---------------------------------------------

_WORKER = textwrap.dedent(
    """
    import hashlib, json, sys, time
    from pathlib import Path
    from kms.store.pg import PgDatabase, PgSettings
    from kms.store.pg_state import PgReplayCache

    dsn, go, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    db = PgDatabase(PgSettings(dsn=dsn))
    cache = PgReplayCache(db)
    cache.check_and_store(b"warm-up-" + sys.argv[4].encode(), 1e12, 0.0)
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.005)
    won = [i for i in range(n)
           if cache.check_and_store(hashlib.sha256(i.to_bytes(8, "big")).digest(),
                                    2e9, 1.8e9)]
    print(json.dumps(won), flush=True)
    db.close()
    """
)


def test_replay_cache_one_winner_among_three_processes(db: PgDatabase, tmp_path: Path) -> None:
    go = tmp_path / "go"
    n = 300
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, db.settings.dsn, str(go), str(n), str(k)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for k in range(3)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
        go.touch()
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0
            results.append(set(json.loads(out)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    everything: set[int] = set()
    for r in results:
        assert not everything & r, "a digest was accepted by two processes"
        everything |= r
    assert everything == set(range(n))


def test_rate_limit_holds_across_replicas(pg_dsn: str) -> None:
    """Two processes' limiters (two pools) share one bucket per identity."""
    a_db, b_db = PgDatabase(PgSettings(dsn=pg_dsn)), PgDatabase(PgSettings(dsn=pg_dsn))
    try:
        a_db.migrate()
        a, b = PgRateLimiter(a_db, rate=2, burst=4), PgRateLimiter(b_db, rate=2, burst=4)
        got = [lim.allow(b"sip:alice@x", T0) for lim in (a, b, a, b, a, b)]
        assert got == [True, True, True, True, False, False]
        assert b.allow(b"sip:bob@x", T0)  # per identity
        assert a.allow(b"sip:alice@x", T0 + 0.5)  # one token back after 1/rate s
        assert not b.allow(b"sip:alice@x", T0 + 0.5)
        # A replica whose clock is behind never drains the bucket.
        assert b.allow(b"sip:alice@x", T0 + 100)
        assert a.allow(b"sip:alice@x", T0 + 95)
        assert PgRateLimiter(a_db, rate=0).allow(b"sip:alice@x", T0)  # 0: unlimited
        q1, q2 = PgQuota(a_db), PgQuota(b_db)
        assert [q.allow(b"kms:b", 1.0, T0) for q in (q1, q2, q1)] == [True, True, False]
        assert q2.allow(b"kms:b", 0, T0)
    finally:
        a_db.close()
        b_db.close()


def test_pruner_removes_only_expired_rows(db: PgDatabase) -> None:
    cache, ledger = PgReplayCache(db), PgResolveLedger(db)
    now = time.time()
    for i in range(10):
        assert cache.check_and_store(digest(i), now - 1 if i < 4 else now + 600, now - 100)
    assert ledger.first_resolve(b"t" * 16, b"sip:bob@x", now - 5)
    assert ledger.first_resolve(b"u" * 16, b"sip:bob@x", now + 3600)
    pruner = Pruner(db, interval_s=3600)
    try:
        assert pruner.prune_once(now) == 5
    finally:
        pruner.close()
    rows = db.execute("SELECT count(*) FROM replay")[0][0]
    assert rows == 6
    # Live rows were kept: still replays.
    assert not any(cache.check_and_store(digest(i), now + 600, now) for i in range(4, 10))
    assert not ledger.first_resolve(b"u" * 16, b"sip:bob@x", now + 3600)


def _migrate(dsn: str) -> int:
    db = PgDatabase(PgSettings(dsn=dsn))
    try:
        return db.migrate()
    finally:
        db.close()


def test_replicas_migrating_at_once(pg_dsn: str) -> None:
    results: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(_migrate(pg_dsn))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [len(MIGRATIONS)] * 4
    with psycopg.connect(pg_dsn) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM kms_schema")]
    assert versions == list(range(1, len(MIGRATIONS) + 1))  # each applied exactly once


def test_schema_too_new(db: PgDatabase) -> None:
    db.execute("INSERT INTO kms_schema (version) VALUES (%s)", (len(MIGRATIONS) + 1,))
    with pytest.raises(SchemaTooNewError, match="newer than this software"):
        db.migrate()


def test_unreachable_database_fails_closed() -> None:
    port = _free_port()  # nothing listens there
    db = PgDatabase(
        PgSettings(dsn=f"postgresql://kms@127.0.0.1:{port}/kms", acquire_timeout_s=0.5,
                   connect_timeout_s=1)
    )
    try:
        with pytest.raises(StoreUnavailable, match=r"database postgresql://kms@127\.0\.0\.1"):
            PgReplayCache(db).check_and_store(digest(1), T0 + 240, T0)
        with pytest.raises(StoreUnavailable):
            PgResolveLedger(db).first_resolve(b"t" * 16, b"sip:bob@x", T0)
        with pytest.raises(StoreUnavailable):
            PgRateLimiter(db, 5).allow(b"sip:a@x", T0)
    finally:
        db.close()


def test_password_never_in_the_dsn_and_read_from_env_or_file(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="must not contain a password") as info:
        PgDatabase(PgSettings(dsn="postgresql://kms:hunter2@db/kms"))
    assert "hunter2" not in str(info.value)
    with pytest.raises(DatabaseError, match="KMS_TEST_NO_SUCH_VAR is not set"):
        PgDatabase(PgSettings(dsn="postgresql://kms@db/kms", password_env="KMS_TEST_NO_SUCH_VAR"))
    with pytest.raises(DatabaseError, match="cannot read"):
        PgDatabase(PgSettings(dsn="postgresql://kms@db/kms", password_file=tmp_path / "nope"))


def test_admission_is_rate_limit_then_replay_in_one_statement(pg_dsn: str) -> None:
    a_db, b_db = PgDatabase(PgSettings(dsn=pg_dsn)), PgDatabase(PgSettings(dsn=pg_dsn))
    try:
        a_db.migrate()
        a, b = PgAdmission(a_db, rate=1, burst=2), PgAdmission(b_db, rate=1, burst=2)
        before = a_db.round_trips
        assert a.admit(b"sip:alice@x", digest(1), T0 + 240, T0) == (True, True)
        assert a_db.round_trips - before == 1
        # The same message through another replica: within the rate, but a replay.
        assert b.admit(b"sip:alice@x", digest(1), T0 + 240, T0) == (True, False)
        # Bucket empty (burst 2 used): refused by the rate limit, and NOT recorded ...
        assert a.admit(b"sip:alice@x", digest(2), T0 + 240, T0) == (False, False)
        # ... so once a token is back, the same message is still a first copy.
        assert b.admit(b"sip:alice@x", digest(2), T0 + 240, T0 + 1) == (True, True)
        assert b.admit(b"sip:bob@x", digest(2), T0 + 240, T0 + 1) == (True, False)
        # Rate limit off: the replay cache alone.
        off = PgAdmission(a_db, rate=0)
        assert off.admit(b"sip:alice@x", digest(3), T0 + 240, T0) == (True, True)
        assert off.admit(b"sip:alice@x", digest(3), T0 + 240, T0) == (True, False)
    finally:
        a_db.close()
        b_db.close()
