"""PSK versions in the registry, on both backends: naming, overlap, retirement rules."""

from __future__ import annotations

import time

import pytest

from kms.store.psk_versions import PskVersionError
from kms.store.registry import IdType, Registry

ALICE = b"sip:alice@example.org"


@pytest.fixture
def reg(new_registry: Registry) -> Registry:
    new_registry.add_endpoint(ALICE, IdType.URI, "psk/alice")
    return new_registry


def test_rotate_names_versions_and_keeps_version_1(reg: Registry) -> None:
    assert reg.psk_versions(ALICE) == [] and reg.find_psk_version(ALICE) is None
    v2 = reg.add_psk_version(ALICE, "psk/alice", "psk/alice.2", None)
    assert (v2.version, v2.name) == (2, ALICE + b"#psk2")
    v1 = reg.find_psk_version(ALICE)
    assert v1 is not None and (v1.version, v1.key_label) == (1, "psk/alice")
    assert reg.find_psk_version(ALICE + b"#psk2") == v2
    owners = reg.key_owners()
    assert owners["psk/alice.2"].endswith("PSK v2") and "psk/alice" in owners


def test_overlap_and_retirement(reg: Registry) -> None:
    reg.add_psk_version(ALICE, "psk/alice", "psk/alice.2", None)
    now = time.time()
    v3 = reg.add_psk_version(ALICE, "psk/alice", "psk/alice.3", 60)
    v1, v2, _ = reg.psk_versions(ALICE)
    assert v1.retire_at is not None and v2.retire_at is not None and v3.retire_at is None
    assert v1.usable(now) and not v1.usable(now + 61)
    assert [v.version for v in reg.due_psk_versions(now + 61)] == [1, 2]
    assert reg.due_psk_versions(now) == []
    r1 = reg.retire_psk_version(ALICE, 1)
    assert r1.retired and "psk/alice" not in reg.key_owners()
    with pytest.raises(PskVersionError, match="already retired"):
        reg.retire_psk_version(ALICE, 1)
    reg.retire_psk_version(ALICE, 2)
    with pytest.raises(PskVersionError, match="only PSK"):
        reg.retire_psk_version(ALICE, 3)
    with pytest.raises(PskVersionError, match="no PSK version 9"):
        reg.retire_psk_version(ALICE, 9)
    reg.remove_endpoint(ALICE)
    assert reg.psk_versions(ALICE) == []
