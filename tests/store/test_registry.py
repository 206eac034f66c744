"""Registry unit tests: migrations, exact-bytes identities, groups, TPK states, peers."""

from __future__ import annotations

import multiprocessing
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from kms.mikey.constants import IdType
from kms.store.pg import PgDatabase, PgSettings
from kms.store.pg_registry import PgRegistry
from kms.store.registry import (
    MIGRATIONS,
    DuplicateApplication,
    DuplicateEndpoint,
    DuplicatePeer,
    DuplicateTpkVersion,
    IdentityConflict,
    InvalidTpkState,
    NotAMember,
    PeerAuth,
    Registry,
    RegistryError,
    RegistryUnavailable,
    SchemaTooNew,
    TpkState,
    UnknownApplication,
    UnknownGroup,
    UnknownIdentity,
    UnknownMember,
    UnknownPeer,
    UnknownTpkVersion,
)

ALICE = b"sip:alice@example.org"
BOB = b"sip:bob@example.org"


@pytest.fixture(params=["sqlite", "postgresql"])
def reg(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    """The registry contract: every test taking ``reg`` runs on both backends."""
    if request.param == "sqlite":
        r = Registry.open(tmp_path / "registry.sqlite3", create=True)
    else:
        dsn = request.getfixturevalue("pg_dsn")
        db = PgDatabase(PgSettings(dsn=dsn))
        r = PgRegistry(db, owns_db=True)
        r.migrate()
    yield r
    r.close()


def test_missing_file_without_create(tmp_path: Path) -> None:
    with pytest.raises(RegistryUnavailable, match="does not exist"):
        Registry.open(tmp_path / "nope.sqlite3")
    assert not (tmp_path / "nope.sqlite3").exists()


def test_migrations_idempotent_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    with Registry.open(path, create=True) as r:
        assert r.schema_version() == len(MIGRATIONS)
        r.add_endpoint(ALICE, IdType.URI, "psk/a")
        assert r.migrate() == len(MIGRATIONS)  # again: no-op
    with Registry.open(path) as r:
        assert r.schema_version() == len(MIGRATIONS)
        assert [e.identity for e in r.list_endpoints()] == [ALICE]
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_schema_too_new(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    Registry.open(path, create=True).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaTooNew, match="newer than this software"):
        Registry.open(path)


def _worker(args: tuple[str, int]) -> int:
    path, k = args
    with Registry.open(Path(path), create=True) as r:
        for i in range(20):
            r.add_endpoint(f"sip:w{k}-{i}@x".encode(), IdType.URI, f"psk/w{k}/{i}")
    return k


def test_several_processes(tmp_path: Path) -> None:
    # Several processes migrating a fresh file and writing at once: no lost rows, no errors.
    path = str(tmp_path / "r.sqlite3")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        assert sorted(pool.map(_worker, [(path, k) for k in range(4)])) == [0, 1, 2, 3]
    with Registry.open(Path(path)) as r:
        assert len(r.list_endpoints()) == 80
        assert r.schema_version() == len(MIGRATIONS)


def test_identities_are_exact_bytes(reg: Registry) -> None:
    reg.add_endpoint(ALICE, IdType.URI, "psk/1")
    reg.add_endpoint(b"sip:Alice@example.org", IdType.URI, "psk/2")  # case differs: distinct
    reg.add_endpoint(b"sip:alice@example.org ", IdType.URI, "psk/3")  # trailing space
    reg.add_endpoint(b"\xff\x00raw", IdType.BYTE_STRING, "psk/4")
    assert reg.get_endpoint(ALICE).key_label == "psk/1"
    assert reg.get_endpoint(b"sip:Alice@example.org").key_label == "psk/2"
    assert reg.get_endpoint(b"\xff\x00raw").id_type is IdType.BYTE_STRING
    with pytest.raises(UnknownIdentity):
        reg.get_endpoint(b"SIP:alice@example.org")
    assert len(reg.list_endpoints()) == 4


def test_endpoint_errors(reg: Registry) -> None:
    reg.add_endpoint(ALICE, IdType.URI, "psk/1")
    with pytest.raises(DuplicateEndpoint, match="already exists"):
        reg.add_endpoint(ALICE, IdType.NAI, "psk/9")
    with pytest.raises(DuplicateEndpoint, match="key label"):
        reg.add_endpoint(BOB, IdType.URI, "psk/1")
    with pytest.raises(UnknownIdentity):
        reg.remove_endpoint(BOB)
    with pytest.raises(RegistryError):
        reg.add_endpoint(b"", IdType.URI, "psk/e")
    assert [e.identity for e in reg.list_endpoints()] == [ALICE]
    ep = reg.set_endpoint_enabled(ALICE, False)
    assert not ep.enabled
    assert reg.remove_endpoint(ALICE).key_label == "psk/1"
    assert reg.find_endpoint(ALICE) is None


def test_groups(reg: Registry) -> None:
    reg.add_endpoint(ALICE, IdType.URI, "psk/a")
    reg.add_endpoint(BOB, IdType.URI, "psk/b")
    g = reg.add_group(b"sip:team@example.org", [ALICE])
    assert g.members == (ALICE,)
    g = reg.add_group(b"sip:team@example.org", [BOB, ALICE])  # adds; duplicates ignored
    assert g.members == (ALICE, BOB)
    assert reg.groups_of(ALICE) == [b"sip:team@example.org"]
    assert reg.groups_of(b"sip:nobody@x") == []
    assert reg.is_member(b"sip:team@example.org", BOB)
    assert not reg.is_member(b"sip:team@example.org", b"sip:bob@example.org ")
    assert not reg.is_member(b"sip:nope@example.org", BOB)

    # unknown member: nothing changes (all members are checked first)
    with pytest.raises(UnknownMember, match="nobody"):
        reg.add_group(b"sip:other@example.org", [ALICE, b"sip:nobody@x"])
    assert reg.find_group(b"sip:other@example.org") is None
    assert isinstance(UnknownMember("x"), UnknownIdentity)

    # a group identity cannot also be an endpoint, and vice versa
    with pytest.raises(IdentityConflict):
        reg.add_group(ALICE, [BOB])
    with pytest.raises(IdentityConflict):
        reg.add_endpoint(b"sip:team@example.org", IdType.URI, "psk/t")

    reg.add_endpoint(b"sip:carol@x", IdType.URI, "psk/c")
    with pytest.raises(NotAMember):
        reg.remove_group_members(b"sip:team@example.org", [ALICE, b"sip:carol@x"])
    assert reg.group_members(b"sip:team@example.org") == [ALICE, BOB]  # all or nothing

    g = reg.remove_group_members(b"sip:team@example.org", [ALICE])
    assert g.members == (BOB,)
    assert not reg.is_member(b"sip:team@example.org", ALICE)
    # removing an endpoint drops its memberships
    reg.remove_endpoint(BOB)
    assert reg.group_members(b"sip:team@example.org") == []
    reg.remove_group(b"sip:team@example.org")
    with pytest.raises(UnknownGroup):
        reg.group_members(b"sip:team@example.org")
    with pytest.raises(UnknownGroup):
        reg.remove_group(b"sip:team@example.org")


def test_tpk_states(reg: Registry) -> None:
    assert reg.tpk_current() is None
    assert reg.next_tpk_version() == 1
    reg.add_tpk_version(1, "tpk/1")
    reg.add_tpk_version(2, "tpk/2")
    current = reg.tpk_current()
    assert current is not None
    assert current.version == 2
    assert [(t.version, t.state) for t in reg.tpk_versions()] == [
        (1, TpkState.ACTIVE),
        (2, TpkState.CURRENT),
    ]
    with pytest.raises(InvalidTpkState, match="current"):
        reg.set_tpk_state(2, TpkState.RETIRED)
    with pytest.raises(DuplicateTpkVersion):
        reg.add_tpk_version(2, "tpk/x")
    with pytest.raises(DuplicateTpkVersion):
        reg.add_tpk_version(3, "tpk/1")
    reg.set_tpk_state(1, TpkState.RETIRED)
    with pytest.raises(InvalidTpkState, match="retired"):
        reg.set_tpk_state(1, TpkState.ACTIVE)
    with pytest.raises(UnknownTpkVersion):
        reg.get_tpk(7)
    # retired versions are never reused
    assert reg.next_tpk_version() == 3
    # making an active one current demotes the current one
    reg.add_tpk_version(3, "tpk/3", TpkState.ACTIVE)
    reg.set_tpk_state(3, TpkState.CURRENT)
    assert [(t.version, t.state.value) for t in reg.tpk_versions()] == [
        (1, "retired"),
        (2, "active"),
        (3, "current"),
    ]


def test_one_current_tpk_enforced_by_schema(reg: Registry) -> None:
    reg.add_tpk_version(1, "tpk/1")
    with pytest.raises(RegistryError, match="constraint"), reg.transaction():
        reg._q(  # bypass the typed methods on purpose
            "INSERT INTO tpk_versions (version, key_label, state, created_at) "
            "VALUES (2, 'tpk/2', 'current', 0)"
        )
    assert [t.version for t in reg.tpk_versions()] == [1]


def test_transaction_rolls_back_everything(reg: Registry) -> None:
    class BoomError(Exception):
        pass

    def work() -> None:
        with reg.transaction():
            reg.add_endpoint(ALICE, IdType.URI, "psk/a")
            reg.add_tpk_version(1, "tpk/1")
            raise BoomError

    with pytest.raises(BoomError):
        work()
    assert reg.list_endpoints() == []
    assert reg.tpk_versions() == []


def test_peers_and_applications(reg: Registry) -> None:
    p = reg.add_peer(b"kms:other.example", "other.example:50051", PeerAuth.PSK,
                     key_label="peer/abc")
    assert reg.get_peer(b"kms:other.example") == p
    with pytest.raises(DuplicatePeer):
        reg.add_peer(b"kms:other.example", "x:1", PeerAuth.CERT, cert_pem="-----")
    with pytest.raises(RegistryError, match="key label"):
        reg.add_peer(b"kms:third", "x:1", PeerAuth.PSK)
    assert reg.key_owners()["peer/abc"].startswith("peer kms:other.example")
    reg.remove_peer(b"kms:other.example")
    assert reg.list_peers() == []
    with pytest.raises(UnknownPeer):
        reg.remove_peer(b"kms:other.example")

    reg.add_application(b"urn:app:conf")
    assert reg.is_application(b"urn:app:conf")
    assert not reg.is_application(b"urn:app:CONF")
    with pytest.raises(DuplicateApplication):
        reg.add_application(b"urn:app:conf")
    reg.remove_application(b"urn:app:conf")
    with pytest.raises(UnknownApplication):
        reg.remove_application(b"urn:app:conf")


def test_no_secret_columns() -> None:
    # The registry schema has labels, never key values.
    text = " ".join(MIGRATIONS).lower()
    for word in ("psk ", "value", "secret", "key_value", "pin"):
        assert word not in text.replace("'psk'", "")
