"""The revocation table, on both registry backends (SQLite and PostgreSQL): suspend/resume,
revoked tickets, requested-before times, input checks, and that PostgreSQL replicas learn
of each change through the registry generation (the cache invalidation of cluster mode)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kms.store.pg import PgDatabase, PgSettings, RegistryWatcher
from kms.store.pg_registry import PgRegistry
from kms.store.registry import MIGRATIONS, IdType, Registry
from kms.store.revocations import (
    RevocationError,
    RevocationKind,
    parse_ticket_id,
)
from tests.store.registries import generation_changes, sqlite_registry_at

ALICE = b"sip:alice@example.org"
BOB = b"sip:bob@example.org"
TID = bytes(range(16))


@pytest.fixture(params=["sqlite", "postgresql"])
def reg(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    if request.param == "sqlite":
        r = Registry.open(tmp_path / "registry.sqlite3", create=True)
    else:
        db = PgDatabase(PgSettings(dsn=request.getfixturevalue("pg_dsn")))
        r = PgRegistry(db, owns_db=True)
        r.migrate()
    r.add_endpoint(ALICE, IdType.URI, "psk/alice")
    yield r
    r.close()


def test_suspend_resume(reg: Registry) -> None:
    assert reg.list_revocations() == []
    e = reg.suspend(ALICE, "lost phone")
    assert (e.kind, e.subject, e.reason) == (RevocationKind.SUSPENDED, ALICE, "lost phone")
    again = reg.suspend(ALICE, "other")  # idempotent: the first record stays
    assert again == e
    assert [x.subject for x in reg.list_revocations()] == [ALICE]
    assert reg.resume(ALICE) is True
    assert reg.resume(ALICE) is False
    assert reg.list_revocations() == []


def test_revoke_ticket_and_requested_before(reg: Registry) -> None:
    t = reg.revoke_ticket(TID, "leaked")
    assert t.kind is RevocationKind.TICKET and t.subject == TID
    assert reg.revoke_ticket(TID) == t
    b = reg.revoke_requested_before(BOB, 1_000)
    assert b.not_before == 1_000
    # only forward
    assert reg.revoke_requested_before(BOB, 500).not_before == 1_000
    assert reg.revoke_requested_before(BOB, 2_000, "again").not_before == 2_000
    kinds = {(e.kind, e.subject, e.not_before) for e in reg.list_revocations()}
    assert kinds == {
        (RevocationKind.TICKET, TID, 0),
        (RevocationKind.REQUESTED_BEFORE, BOB, 2_000),
    }
    # What the serving path reads: the same, as plain rows.
    assert sorted(reg.revocation_rows()) == [
        ("requested_before", BOB, 2_000), ("ticket", TID, 0),
    ]


def test_bad_input(reg: Registry) -> None:
    with pytest.raises(RevocationError, match="16 bytes"):
        reg.revoke_ticket(b"short")
    with pytest.raises(RevocationError, match="one line"):
        reg.suspend(ALICE, "two\nlines")
    with pytest.raises(RevocationError, match="32 hex digits"):
        parse_ticket_id("abc")
    with pytest.raises(RevocationError, match="32 hex digits"):
        parse_ticket_id("zz" * 16)
    assert parse_ticket_id("0x" + TID.hex().upper()) == TID
    assert reg.list_revocations() == []


def test_sqlite_migration_from_schema_2_keeps_rows(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    conn = sqlite_registry_at(path, 2)
    conn.execute(
        "INSERT INTO endpoints (identity, id_type, key_label, created_at) "
        "VALUES (?, 1, 'psk/a', 0)",
        (ALICE,),
    )
    conn.close()
    with Registry.open(path) as r:
        assert r.schema_version() == len(MIGRATIONS) >= 3
        assert r.get_endpoint(ALICE).key_label == "psk/a"
        r.suspend(ALICE)
        assert [e.kind for e in r.list_revocations()] == [RevocationKind.SUSPENDED]


def test_postgresql_revocation_bumps_the_registry_generation(pg_dsn: str) -> None:
    """Replicas cache registry reads until the generation changes: every revocation write
    must change it (trigger + NOTIFY), or a replica would keep honouring a revoked ticket."""
    db = PgDatabase(PgSettings(dsn=pg_dsn))
    r = PgRegistry(db)
    r.migrate()
    watcher = RegistryWatcher(db, poll_s=0.2)
    try:
        assert watcher.wait_synced(10)

        assert generation_changes(watcher, lambda: r.revoke_ticket(bytes(16)))
        assert generation_changes(watcher, lambda: r.suspend(b"sip:x@example.org"))
        assert generation_changes(watcher, lambda: r.resume(b"sip:x@example.org"))
        assert generation_changes(watcher, lambda: r.revoke_requested_before(ALICE, 10))
    finally:
        watcher.close()
        db.close()


def test_sqlite_directory_sees_an_operator_revocation_on_the_next_read(tmp_path: Path) -> None:
    """The serving side caches the list per thread until another connection commits
    (PRAGMA data_version): an operator's command is seen on the very next request."""
    from kms.server.directory import RegistryDirectory

    path = tmp_path / "registry.sqlite3"
    with Registry.open(path, create=True) as r:
        r.add_endpoint(ALICE, IdType.URI, "psk/alice")
    # As `kms serve` builds it: with the stores' generation, which SQLite answers None.
    directory = RegistryDirectory(path, generation=lambda: None)
    assert not directory.revocation_list()
    assert directory.revocation_list() is directory.revocation_list()  # cached
    with Registry.open(path) as operator:
        operator.suspend(ALICE)
    assert directory.revocation_list().suspended == {ALICE}
    with Registry.open(path) as operator:
        operator.resume(ALICE)
        operator.revoke_ticket(TID)
    rl = directory.revocation_list()
    assert rl.suspended == frozenset() and rl.tickets == {TID}


def test_ticket_revocations_are_pruned_after_the_horizon_only(reg: Registry) -> None:
    """Both stores: a ticket revocation goes once no ticket it could match can be valid;
    suspensions and requested-before times stay; nothing due, nothing written."""
    reg.revoke_ticket(TID, "leaked")
    reg.suspend(ALICE)
    reg.revoke_requested_before(BOB, 1_000)
    created = next(e.created_at for e in reg.list_revocations() if e.subject == TID)
    assert reg.prune_ticket_revocations(created + 100, 100) == 0  # not older than 100 s yet
    assert len(reg.list_revocations()) == 3
    assert reg.prune_ticket_revocations(created + 101, 100) == 1
    kinds = sorted(e.kind for e in reg.list_revocations())
    assert kinds == [RevocationKind.REQUESTED_BEFORE, RevocationKind.SUSPENDED]
    assert reg.prune_ticket_revocations(created + 10**9, 100) == 0


def test_postgresql_pruner_prunes_ticket_revocations_without_needless_writes(
    pg_dsn: str,
) -> None:
    """The cluster's background pruner (replay, ledger, buckets) also prunes ticket
    revocations; a pass with none due does not bump the registry generation (which would
    make every replica drop its registry cache)."""
    from kms.store.pg_state import Pruner

    db = PgDatabase(PgSettings(dsn=pg_dsn))
    r = PgRegistry(db)
    r.migrate()

    def generation() -> int:
        return int(db.execute("SELECT n FROM registry_generation WHERE id = 1")[0][0])

    pruner = Pruner(db, interval_s=3600, revocation_horizon_s=50)
    try:
        r.revoke_ticket(TID)
        now = time.time()
        before = generation()
        pruner.prune_once(now)
        assert generation() == before
        assert [e.subject for e in r.list_revocations()] == [TID]
        pruner.prune_once(now + 52)
        assert r.list_revocations() == []
        assert generation() != before
    finally:
        pruner.close()
        db.close()


def test_sqlite_pruner_and_stores_close(tmp_path: Path) -> None:
    """SQLite homes: the serving process's pruner thread deletes due ticket revocations and
    stops when the stores close."""
    from kms.server.stores import RevocationPruner

    path = tmp_path / "registry.sqlite3"
    with Registry.open(path, create=True) as r:
        r.revoke_ticket(TID)
        r.suspend(ALICE)
    pruner = RevocationPruner(lambda: Registry.open(path), horizon_s=50, interval_s=3600)
    try:
        assert pruner.prune_once(time.time()) == 0
        assert pruner.prune_once(time.time() + 52) == 1
    finally:
        pruner.close()
    assert not pruner._thread.is_alive()
    with Registry.open(path) as r:
        assert [e.kind for e in r.list_revocations()] == [RevocationKind.SUSPENDED]
