"""The Directory port's cache on SQLite: answers kept per thread while ``PRAGMA data_version``
says nothing was committed, and every commit by another connection (this process, another
thread's operator command, another process) seen by the very next lookup."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kms.keystore import KeyRef
from kms.mikey.constants import IdType
from kms.server.directory import RegistryDirectory
from kms.store.registry import Registry

ALICE = b"sip:alice@example.org"
BOB = b"sip:bob@example.org"
GROUP = b"sip:team@example.org"


@pytest.fixture
def reg_path(tmp_path: Path) -> Path:
    path = tmp_path / "registry.sqlite3"
    with Registry.open(path, create=True) as r:
        r.add_endpoint(ALICE, IdType.URI, "psk/alice")
        r.add_endpoint(BOB, IdType.URI, "psk/bob")
        r.add_group(GROUP, [ALICE])
    return path


@pytest.fixture(params=["path", "opener"])
def directory(request: pytest.FixtureRequest, reg_path: Path) -> RegistryDirectory:
    """Built from a path, or as ``build_handler`` builds it on SQLite: an opener and a
    generation function that answers None (no cluster-wide generation)."""
    cert = reg_path.parent / "none.pem"
    if request.param == "path":
        return RegistryDirectory(reg_path, signing_cert=cert)
    return RegistryDirectory(lambda: Registry.open(reg_path), cert, lambda: None)


def _statements(d: RegistryDirectory) -> list[str]:
    seen: list[str] = []
    d.registry._conn.set_trace_callback(seen.append)
    return seen


def test_repeated_lookups_read_the_registry_once(directory: RegistryDirectory) -> None:
    d = directory
    seen = _statements(d)
    assert d.psk_for(ALICE) == KeyRef("psk/alice")
    assert d.is_member(GROUP, ALICE)
    first = [s for s in seen if not s.startswith("PRAGMA")]
    assert first, "the first lookups query the registry"
    seen.clear()
    for _ in range(5):
        assert d.psk_for(ALICE) == KeyRef("psk/alice")
        assert d.is_member(GROUP, ALICE)
        assert not d.is_member(GROUP, BOB)
    # Only the change check ran after the first answers were cached (BOB's once).
    queries = [s for s in seen if not s.startswith("PRAGMA")]
    assert len(queries) == 1 and "group" in queries[0].lower()
    assert sum(s.startswith("PRAGMA data_version") for s in seen) == 15


def test_a_commit_by_another_connection_is_seen_by_the_next_lookup(
    directory: RegistryDirectory, reg_path: Path
) -> None:
    d = directory
    assert d.psk_for(ALICE) == KeyRef("psk/alice")
    assert d.is_member(GROUP, ALICE)
    assert d.is_known(BOB)
    with Registry.open(reg_path) as operator:
        operator.remove_group_members(GROUP, [ALICE])
        assert not d.is_member(GROUP, ALICE)  # at once, no delay
        operator.set_endpoint_enabled(ALICE, False)
        assert d.psk_for(ALICE) is None
        operator.remove_endpoint(BOB)
        assert not d.is_known(BOB)
        operator.add_group(b"sip:new@example.org", [ALICE])
        assert d.is_member(b"sip:new@example.org", ALICE)


def test_each_thread_sees_a_commit_made_after_it_cached(reg_path: Path) -> None:
    d = RegistryDirectory(reg_path, signing_cert=reg_path.parent / "none.pem")
    answers: dict[str, list[bool]] = {"main": [], "other": []}
    cached = threading.Event()
    changed = threading.Event()

    def other() -> None:
        answers["other"].append(d.is_member(GROUP, ALICE))
        cached.set()
        changed.wait(10)
        answers["other"].append(d.is_member(GROUP, ALICE))

    t = threading.Thread(target=other)
    t.start()
    answers["main"].append(d.is_member(GROUP, ALICE))
    assert cached.wait(10)
    with Registry.open(reg_path) as operator:
        operator.remove_group_members(GROUP, [ALICE])
    changed.set()
    t.join(10)
    answers["main"].append(d.is_member(GROUP, ALICE))
    assert answers == {"main": [True, False], "other": [True, False]}


def test_a_commit_by_another_process_is_seen_by_the_next_lookup(reg_path: Path) -> None:
    d = RegistryDirectory(reg_path, signing_cert=reg_path.parent / "none.pem")
    assert d.is_member(GROUP, ALICE)
    assert d.revocation_list().suspended == frozenset()
    code = (
        "import sys; from pathlib import Path; from kms.store.registry import Registry\n"
        "with Registry.open(Path(sys.argv[1])) as r:\n"
        "    r.remove_group_members(b'sip:team@example.org', [b'sip:alice@example.org'])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(reg_path)], check=True, timeout=60)
    assert not d.is_member(GROUP, ALICE)
