"""Intermediate nodes in the registry, on both backends: registration, scope, removal."""

from __future__ import annotations

import pytest

from kms.store.nodes import NodeError, NodeRole
from kms.store.psk_versions import PskVersionError
from kms.store.registry import IdentityConflict, IdType, Registry

ALICE = b"sip:alice@example.org"
TEAM = b"sip:team@example.org"
REC = b"node:recorder-1"


@pytest.fixture
def reg(new_registry: Registry) -> Registry:
    new_registry.add_endpoint(ALICE, IdType.URI, "psk/alice")
    new_registry.add_group(TEAM, [ALICE])
    return new_registry


def test_add_show_list_remove(reg: Registry) -> None:
    assert reg.find_node(REC) is None and reg.list_nodes() == []
    node = reg.add_node(
        REC, NodeRole.RECORDER, "node/rec1",
        initiators=["sip:*@example.org"], responders=["sip:bob@*"], groups=[TEAM.decode()],
    )  # fmt: skip
    assert node.role is NodeRole.RECORDER
    found = reg.get_node(REC)
    assert found == node
    assert found.initiators == ("sip:*@example.org",) and found.groups == (TEAM.decode(),)
    assert reg.list_nodes() == [node]
    assert reg.key_owners()["node/rec1"] == "recorder node node:recorder-1"
    assert reg.remove_node(REC) == node
    assert reg.find_node(REC) is None and "node/rec1" not in reg.key_owners()
    with pytest.raises(NodeError, match="unknown node"):
        reg.remove_node(REC)


def test_nothing_in_scope_by_default(reg: Registry) -> None:
    node = reg.add_node(REC, NodeRole.BRIDGE, "node/rec1")
    assert (node.initiators, node.responders, node.groups) == ((), (), ())
    assert reg.get_node(REC).groups == ()


def test_identities_do_not_collide(reg: Registry) -> None:
    with pytest.raises(NodeError, match="already an endpoint"):
        reg.add_node(ALICE, NodeRole.RECORDER, "node/x")
    with pytest.raises(NodeError, match="already a group"):
        reg.add_node(TEAM, NodeRole.RECORDER, "node/x")
    reg.add_node(REC, NodeRole.TRANSCODER, "node/rec1")
    with pytest.raises(NodeError, match="already exists"):
        reg.add_node(REC, NodeRole.RECORDER, "node/rec2")
    with pytest.raises(IdentityConflict, match="already a node"):
        reg.add_endpoint(REC, IdType.URI, "psk/rec")


def test_bad_patterns_and_roles_refused(reg: Registry) -> None:
    with pytest.raises(NodeError, match="single lines"):
        reg.add_node(REC, NodeRole.RECORDER, "node/rec1", initiators=["a\nb"])
    with pytest.raises(NodeError, match="single lines"):
        reg.add_node(REC, NodeRole.RECORDER, "node/rec1", groups=[""])
    with pytest.raises(ValueError, match="'spy'"):
        reg.add_node(REC, "spy", "node/rec1")  # type: ignore[arg-type]
    assert reg.find_node(REC) is None


def test_certificate_node_has_no_key(reg: Registry) -> None:
    node = reg.add_node(REC, NodeRole.BRIDGE, None, cert_pem="-----BEGIN CERTIFICATE-----\n")
    assert reg.get_node(REC) == node and node.key_label is None
    assert node.cert_pem is not None and node.cert_pem.startswith("-----BEGIN")
    assert not any("node" in owner for owner in reg.key_owners().values())
    with pytest.raises(NodeError, match="exactly one"):
        reg.add_node(b"node:x", NodeRole.BRIDGE, None)
    with pytest.raises(NodeError, match="exactly one"):
        reg.add_node(b"node:x", NodeRole.BRIDGE, "node/x", cert_pem="pem")


def test_node_psk_versions_share_the_endpoint_table_and_go_with_the_node(reg: Registry) -> None:
    """A node's rotated PSKs are rows of psk_versions like an endpoint's (the identities
    never coincide); `kms keys list` names them as the node's, and removing the node drops
    them (its caller destroys their token objects in the same transaction)."""
    reg.add_node(REC, NodeRole.RECORDER, "node/rec1")
    v2 = reg.add_psk_version(REC, "node/rec1", "node/rec1.2", 60)
    assert (v2.version, v2.name) == (2, REC + b"#psk2")
    v1 = reg.find_psk_version(REC)
    assert v1 is not None and (v1.version, v1.key_label, v1.identity) == (1, "node/rec1", REC)
    assert v1.retire_at is not None and v2.retire_at is None
    owners = reg.key_owners()
    assert owners["node/rec1.2"] == "recorder node node:recorder-1 PSK v2"
    assert owners["node/rec1"] == "recorder node node:recorder-1 PSK v1"
    reg.retire_psk_version(REC, 1)
    assert "node/rec1" not in reg.key_owners()
    with pytest.raises(PskVersionError, match="only PSK"):
        reg.retire_psk_version(REC, 2)
    reg.remove_node(REC)
    assert reg.psk_versions(REC) == [] and reg.find_psk_version(REC + b"#psk2") is None
    assert "node/rec1.2" not in reg.key_owners()
