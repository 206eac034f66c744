"""A peer KMS's settings and the versions of the key shared with it, on both backends
(kms.store.peer_versions): ``peer set``, the sending version, retirement rules, and a
registry made before the sending version existed (old schema) that keeps its peers."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from kms.store.peer_versions import PeerUpdateError
from kms.store.pg import MIGRATIONS as PG_MIGRATIONS
from kms.store.pg import PgDatabase, PgSettings, RegistryWatcher
from kms.store.pg_registry import PgRegistry
from kms.store.psk_versions import PskVersionError
from kms.store.registry import MIGRATIONS, PeerAuth, Registry, UnknownPeer
from tests.store.registries import generation_changes, sqlite_registry_at

PEER = b"kms:b.example.org"
CERT_PEER = b"kms:c.example.org"


@pytest.fixture
def reg(new_registry: Registry) -> Registry:
    new_registry.add_peer(PEER, "127.0.0.1:1", PeerAuth.PSK, key_label="peer/b.1",
                          resolve_for=("sip:*@b",))
    new_registry.add_peer(CERT_PEER, "127.0.0.1:2", PeerAuth.CERT, cert_pem="PEM")
    return new_registry


def test_set_changes_only_what_is_given(reg: Registry) -> None:
    before = reg.get_peer(PEER)
    after = reg.update_peer(PEER, address="10.0.0.7:50062", rate_limit=5, deadline_ms=900)
    assert (after.address, after.rate_limit, after.deadline_ms) == ("10.0.0.7:50062", 5.0, 900)
    assert after.resolve_for == before.resolve_for == ("sip:*@b",)
    assert after.ca_pem is None and after.key_label == "peer/b.1"
    assert reg.get_peer(PEER) == after
    cleared = reg.update_peer(PEER, resolve_for=(), ca_pem="CA PEM")
    assert cleared.resolve_for == () and cleared.ca_pem == "CA PEM"
    assert reg.update_peer(PEER, resolve_for=("sip:a*", "sip:b*")).resolve_for == (
        "sip:a*", "sip:b*",
    )  # fmt: skip
    assert reg.update_peer(PEER) == reg.get_peer(PEER)  # nothing given: nothing changes


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rate_limit": -1}, "rate limit"),
        ({"deadline_ms": 0}, "deadline"),
        ({"resolve_for": ("ok", "")}, "patterns"),
        ({"address": "a\nb"}, "address"),
    ],
)
def test_set_refuses_bad_values(reg: Registry, change: dict[str, object], message: str) -> None:
    with pytest.raises(PeerUpdateError, match=message):
        reg.update_peer(PEER, **change)  # type: ignore[arg-type]
    assert reg.get_peer(PEER).deadline_ms == 2000


def test_set_of_an_unknown_peer(reg: Registry) -> None:
    with pytest.raises(UnknownPeer):
        reg.update_peer(b"kms:nobody", rate_limit=1)


def test_sending_version_and_retirement(reg: Registry) -> None:
    assert reg.get_peer(PEER).send_version == 1
    assert reg.use_peer_psk_version(PEER, 1) is None  # never rotated: version 1 is the key
    with pytest.raises(PskVersionError, match="no PSK version 2"):
        reg.use_peer_psk_version(PEER, 2)
    v2 = reg.add_psk_version(PEER, "peer/b.1", "peer/b.2", None)
    assert (v2.version, v2.name) == (2, PEER + b"#psk2")
    assert reg.get_peer(PEER).send_version == 1  # rotating does not switch what we send
    assert reg.use_peer_psk_version(PEER, 2) == v2
    assert reg.get_peer(PEER).send_version == 2
    with pytest.raises(PskVersionError, match="sends with"):
        reg.retire_peer_psk_version(PEER, 2)
    assert reg.retire_peer_psk_version(PEER, 1).retired
    with pytest.raises(PskVersionError, match="retired"):
        reg.use_peer_psk_version(PEER, 1)
    with pytest.raises(PskVersionError, match="no PSK version 7"):
        reg.use_peer_psk_version(PEER, 7)
    owners = reg.key_owners()
    assert owners["peer/b.2"] == "peer kms:b.example.org PSK v2"
    assert "peer/b.1" not in owners  # retired: its token object is destroyed
    assert reg.get_peer(PEER).send_version == 2


def test_version_numbers_may_skip_but_never_go_back(reg: Registry) -> None:
    v4 = reg.add_psk_version(PEER, "peer/b.1", "peer/b.4", None, 4)
    assert (v4.version, v4.name) == (4, PEER + b"#psk4")
    with pytest.raises(PskVersionError, match="newer than version 4"):
        reg.add_psk_version(PEER, "peer/b.1", "peer/b.3", None, 3)
    assert [v.version for v in reg.psk_versions(PEER)] == [1, 4]


def test_certificate_peer_has_no_versions(reg: Registry) -> None:
    with pytest.raises(PskVersionError, match="not a PSK peer"):
        reg.use_peer_psk_version(CERT_PEER, 1)


def test_remove_forgets_the_versions(reg: Registry) -> None:
    reg.add_psk_version(PEER, "peer/b.1", "peer/b.2", None)
    reg.use_peer_psk_version(PEER, 2)
    reg.remove_peer(PEER)
    assert reg.psk_versions(PEER) == [] and reg.find_psk_version(PEER + b"#psk2") is None


def _old_sqlite_registry(path: Path) -> None:
    """A registry as main wrote it before the sending version (schema 5) with one peer."""
    conn = sqlite_registry_at(path, 5)
    conn.execute(
        "INSERT INTO peers (kms_id, address, auth, key_label, created_at, resolve_for) "
        "VALUES (?, '127.0.0.1:9', 'psk', 'peer/old', 0, 'sip:*@b')",
        (PEER,),
    )
    conn.close()


def test_sqlite_registry_of_the_previous_schema_keeps_its_peers(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    _old_sqlite_registry(path)
    with Registry.open(path) as r:
        assert r.schema_version() == len(MIGRATIONS) == 6
        peer = r.get_peer(PEER)
        assert (peer.key_label, peer.send_version) == ("peer/old", 1)
        assert peer.resolve_for == ("sip:*@b",)
        r.add_psk_version(PEER, "peer/old", "peer/new", None)
        r.use_peer_psk_version(PEER, 2)
        assert r.get_peer(PEER).send_version == 2


def test_postgresql_database_of_the_previous_schema_keeps_its_peers(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE kms_schema (version INTEGER NOT NULL)")
        for number, script in enumerate(PG_MIGRATIONS[:4], start=1):
            conn.execute(script)  # type: ignore[arg-type]
            conn.execute("INSERT INTO kms_schema (version) VALUES (%s)", (number,))
        conn.execute(
            "INSERT INTO peers (kms_id, address, auth, key_label, created_at) "
            "VALUES (%s, '127.0.0.1:9', 'psk', 'peer/old', 0)",
            (PEER,),
        )
    r = PgRegistry(PgDatabase(PgSettings(dsn=pg_dsn)), owns_db=True)
    try:
        assert r.migrate() == len(PG_MIGRATIONS) == 5
        peer = r.get_peer(PEER)
        assert (peer.key_label, peer.send_version) == ("peer/old", 1)
    finally:
        r.close()


def test_postgresql_peer_changes_bump_the_registry_generation(pg_dsn: str) -> None:
    """Replicas cache peers until the generation changes: `peer set` and `use-psk` must
    change it, or a replica would keep the old address or sending version."""
    db = PgDatabase(PgSettings(dsn=pg_dsn))
    r = PgRegistry(db)
    r.migrate()
    r.add_peer(PEER, "127.0.0.1:1", PeerAuth.PSK, key_label="peer/b.1")
    r.add_psk_version(PEER, "peer/b.1", "peer/b.2", None)
    watcher = RegistryWatcher(db, poll_s=0.2)
    try:
        assert watcher.wait_synced(10)

        assert generation_changes(watcher, lambda: r.update_peer(PEER, address="127.0.0.1:3"))
        assert generation_changes(watcher, lambda: r.use_peer_psk_version(PEER, 2))
    finally:
        watcher.close()
        db.close()
