"""Keys for authorised intermediate nodes (RFC 6043 11.1) in the core, without a token: a
recorder or bridge sends its own RESOLVE_INIT_PSK (IDRpsk = the node, IDRr = the leg) and
derives the same SRTP keys as both ends of the leg; out-of-scope, unknown and forbidden
nodes are refused with Invalid ID."""

from __future__ import annotations

import dataclasses

import pytest

from kms.core.api import Outcome
from kms.core.policy import KmsPolicy
from kms.core.psk_versions import PskVersionRef
from kms.core.service import Kms
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DEFAULT_FLAGS, DesiredPolicy, Initiator, TicketGrant
from kms.endpoint.node import IntermediateNode, LegKeys
from kms.endpoint.session import CryptoSession, EndpointError, SrtpKeys
from kms.keystore import KeyRef
from kms.mikey.constants import ErrorNo, IdType, KeyDataType
from kms.mikey.message import Message
from kms.mikey.payloads import Error
from kms.mikey.ticket import TpFlag
from tests.core.world import ALICE, BOB, CAROL, DAVE, KMS_ID, PSKS, TEAM, World, make_world

FORKING = TpFlag.E | TpFlag.F | TpFlag.G | TpFlag.H | TpFlag.I
REC = b"node:recorder.example.org"
BRIDGE = b"node:bridge.example.org"
NODE_PSK = bytes.fromhex("5e" * 32)
SESSIONS = (CryptoSession(1, 0xAAAA0001), CryptoSession(2, 0xBBBB0002))


def _node(world: World, who: bytes = REC, psk: bytes = NODE_PSK) -> IntermediateNode:
    return IntermediateNode(Credentials(who, psk, KMS_ID, IdType.URI), world.sw)


def _call(
    world: World, grant: TicketGrant, to: bytes, resolver: bytes
) -> tuple[bytes, bytes | None, list[SrtpKeys], list[SrtpKeys]]:
    """A Ticket Transfer: (TRANSFER_INIT, TRANSFER_RESP, Initiator's keys, Responder's)."""
    ini = world.initiator(ALICE)
    ti, pt = ini.transfer_init(grant, world.now, to, SESSIONS)
    res = world.responder(resolver)
    ri, pr = res.receive_transfer_init(ti, world.now)
    reply = world.resolve(ri)
    assert reply.ok, reply.audit
    call = res.accept_resolve(pr, reply.data, world.now)
    keys = (
        ini.accept_transfer_resp(pt, call.transfer_resp, world.now)
        if call.transfer_resp is not None
        else ini.keys_without_response(pt)
    )
    return ti, call.transfer_resp, keys, call.srtp


def _ask(world: World, node: IntermediateNode, ti: bytes, tr: bytes | None) -> LegKeys:
    wire, pending = node.resolve_init(ti, tr, world.now)
    reply = world.resolve(wire)
    assert reply.ok, reply.audit
    return node.accept(pending, reply.data)


def _refused(world: World, node: IntermediateNode, ti: bytes, tr: bytes | None) -> ErrorNo:
    wire, _ = node.resolve_init(ti, tr, world.now)
    reply = world.resolve(wire)
    assert not reply.ok and reply.error_message is not None
    return ErrorNo(Message.decode(reply.error_message).one(Error).error_no)


def _pairs(keys: list[SrtpKeys] | tuple[SrtpKeys, ...]) -> list[bytes]:
    return [k.key_and_salt for k in keys]


def test_recorder_in_scope_gets_both_directions_without_forking(world: World) -> None:
    world.directory.add_node(REC, NODE_PSK, initiators=("sip:alice@*",))
    grant = world.grant(DesiredPolicy(responders=(BOB,)))
    ti, tr, alice, bob = _call(world, grant, BOB, BOB)
    leg = _ask(world, _node(world), ti, tr)
    assert _pairs(leg.srtp) == _pairs(alice) == _pairs(bob)
    assert [k.cs_id for k in leg.srtp] == [1, 2]  # both crypto sessions: both directions
    assert all(k.key_type != KeyDataType.MPK for k in leg.session_keys)  # least privilege
    record = world.audit()[-1]
    assert record["event"] == "ticket.node_keys" and record["outcome"] == "ok"
    assert record["node"] == REC.decode() and record["role"] == "recorder"
    assert record["leg"] == BOB.decode() and record["forking"] is False
    assert record["scope"] == "initiator" and record["method"] == "node"
    assert record["ticket_id"] == world.audit()[0]["ticket_id"]


def test_recorder_gets_each_forked_leg_and_the_kms_modifier_matches(world: World) -> None:
    world.directory.add_node(REC, NODE_PSK, groups=(TEAM.decode(),))
    grant = world.grant(DesiredPolicy(responders=(TEAM,), flags=FORKING))
    ti_b, tr_b, alice_b, bob = _call(world, grant, TEAM, BOB)
    ti_c, tr_c, alice_c, carol = _call(world, grant, TEAM, CAROL)
    leg_b = _ask(world, _node(world), ti_b, tr_b)
    leg_c = _ask(world, _node(world), ti_c, tr_c)
    assert leg_b.leg == BOB and leg_c.leg == CAROL
    assert _pairs(leg_b.srtp) == _pairs(alice_b) == _pairs(bob)
    assert _pairs(leg_c.srtp) == _pairs(alice_c) == _pairs(carol)
    assert _pairs(leg_b.srtp) != _pairs(leg_c.srtp)
    record = world.audit()[-1]
    assert record["forking"] is True and record["scope"] == "group"
    # Without the TRANSFER_RESP the node cannot name a forked leg.
    with pytest.raises(EndpointError, match="TRANSFER_RESP"):
        _node(world).resolve_init(ti_b, None, world.now)


def test_bridge_joins_a_group_call_with_the_gtgk(world: World) -> None:
    world.directory.add_node(BRIDGE, NODE_PSK, role="bridge", groups=("sip:team@*",))
    flags = (DEFAULT_FLAGS | TpFlag.H) & ~TpFlag.G & ~TpFlag.F & ~TpFlag.O
    grant = world.grant(
        DesiredPolicy(responders=(TEAM,), flags=flags, key_types=(KeyDataType.GTGK,))
    )
    assert [k.key_type for k in grant.session_keys] == [KeyDataType.GTGK]
    ti, tr, alice, bob = _call(world, grant, TEAM, BOB)
    assert tr is None
    leg = _ask(world, _node(world, BRIDGE), ti, None)
    assert _pairs(leg.srtp) == _pairs(alice) == _pairs(bob)
    assert leg.session_keys[0].key == grant.session_keys[0].key
    assert world.audit()[-1]["role"] == "bridge"


def test_out_of_scope_node_is_refused_with_invalid_id(world: World) -> None:
    world.directory.add_node(REC, NODE_PSK, initiators=("sip:carol@*",), responders=("x:*",))
    grant = world.grant(DesiredPolicy(responders=(BOB,)))
    ti, tr, _, _ = _call(world, grant, BOB, BOB)
    assert _refused(world, _node(world), ti, tr) == ErrorNo.INVALID_ID
    record = world.audit()[-1]
    assert record["event"] == "refused" and record["outcome"] == Outcome.DENIED.value
    assert record["reason"] == "recorder node out of scope" and record["node"] == REC.decode()
    # Nothing is in scope by default.
    world.directory.add_node(BRIDGE, NODE_PSK, role="bridge")
    assert _refused(world, _node(world, BRIDGE), ti, tr) == ErrorNo.INVALID_ID


def test_unknown_removed_or_wrong_psk_node_gets_the_same_answer(world: World) -> None:
    world.directory.add_node(REC, NODE_PSK, initiators=("*",))
    grant = world.grant(DesiredPolicy(responders=(BOB,)))
    ti, tr, _, _ = _call(world, grant, BOB, BOB)
    assert _refused(world, _node(world, psk=bytes(32)), ti, tr) == ErrorNo.INVALID_ID
    assert world.audit()[-1]["reason"] == "node MAC verification failed"
    del world.directory.nodes[REC]
    assert _refused(world, _node(world), ti, tr) == ErrorNo.INVALID_ID
    record = world.audit()[-1]
    assert record["reason"] == "unknown node" and record["outcome"] == "unauthenticated"


def test_leg_must_be_a_responder_of_the_ticket(world: World) -> None:
    world.directory.add_node(REC, NODE_PSK, responders=("*",))
    grant = world.grant(DesiredPolicy(responders=(TEAM,), flags=FORKING))
    ti, tr, _, _ = _call(world, grant, TEAM, BOB)
    assert tr is not None
    # A node claiming DAVE's leg (not in TEAM) by editing nothing but its own IDRr.
    node = _node(world)
    _, pending = node.resolve_init(ti, tr, world.now)
    world.directory.groups[TEAM].discard(BOB)  # Bob left the group: his leg is gone
    assert _refused(world, node, ti, tr) == ErrorNo.INVALID_ID
    assert world.audit()[-1]["reason"] == "not an authorised responder for this ticket"
    assert pending.leg == BOB and DAVE not in world.directory.groups[TEAM]


def test_policy_can_forbid_intermediate_nodes() -> None:
    world = make_world(KmsPolicy(kms_id=KMS_ID, intermediate_nodes=False))
    world.directory.add_node(REC, NODE_PSK, initiators=("*",))
    grant = world.grant(DesiredPolicy(responders=(BOB,)))
    ti, tr, _, _ = _call(world, grant, BOB, BOB)
    assert _refused(world, _node(world), ti, tr) == ErrorNo.INVALID_ID
    assert world.audit()[-1]["reason"] == "[policy] intermediate_nodes = forbidden"


def test_ticket_of_another_kms_is_refused_with_a_reason(world: World) -> None:
    """RFC 6043 9 federation is for Responders' KMSs: a node registered here asking about a
    ticket another KMS issued is told to be registered at the issuer."""
    world.directory.add_node(REC, NODE_PSK, initiators=("*",))
    other_id = b"sip:other-kms.example.org"
    other = make_world(KmsPolicy(kms_id=other_id))
    ini = Initiator(Credentials(ALICE, PSKS[ALICE], other_id, IdType.URI), other.sw)
    flags = (DEFAULT_FLAGS | TpFlag.H) & ~TpFlag.G & ~TpFlag.F & ~TpFlag.O  # no TRANSFER_RESP
    wire, pending = ini.request_ticket(DesiredPolicy(responders=(BOB,), flags=flags), other.now)
    reply = other.kms.request_ticket(wire, other.now)
    assert reply.ok, reply.audit
    grant = ini.accept_ticket(pending, reply.data, other.now)
    ti, _ = ini.transfer_init(grant, world.now, BOB, SESSIONS)
    assert _refused(world, _node(world), ti, None) == ErrorNo.INVALID_ID
    record = world.audit()[-1]
    assert record["reason"] == "node asked about a foreign ticket"
    assert record["outcome"] == Outcome.DENIED.value


class NodePskVersions:
    """The core's PskVersions port over a dict (the registry's rows, by IDRpsk name)."""

    def __init__(self) -> None:
        self.rows: dict[bytes, PskVersionRef] = {}

    def psk_version(self, name: bytes) -> PskVersionRef | None:
        return self.rows.get(name)


def test_rotated_node_psk_old_and_new_until_retired(world: World) -> None:
    """A node's PSK rotated as an endpoint's (IDRpsk ``<node>#psk2``, RFC 6043 4.2.3): old
    and new versions both work until the old one is retired, then it is refused like a
    wrong MAC; the RESOLVE_RESP is protected with the version the node used."""
    world.directory.add_node(REC, NODE_PSK, initiators=("*",))
    new_psk = bytes.fromhex("6f" * 32)
    world.directory.keystore.import_secret("node/rec-2", new_psk)
    versions = NodePskVersions()
    v1 = PskVersionRef(REC, 1, KeyRef("node/" + REC.hex()), False, None)
    versions.rows[REC] = v1
    versions.rows[REC + b"#psk2"] = PskVersionRef(REC, 2, KeyRef("node/rec-2"), False, None)
    world.kms = Kms(dataclasses.replace(world.kms.deps, psk_versions=versions))
    grant = world.grant(DesiredPolicy(responders=(BOB,)))
    ti, tr, alice, _ = _call(world, grant, BOB, BOB)
    new = IntermediateNode(
        Credentials(REC, new_psk, KMS_ID, IdType.URI, psk_name=REC + b"#psk2"), world.sw
    )
    assert _pairs(_ask(world, new, ti, tr).srtp) == _pairs(alice)
    record = world.audit()[-1]
    assert (record["node"], record["psk_version"], record["outcome"]) == (REC.decode(), 2, "ok")
    assert _pairs(_ask(world, _node(world), ti, tr).srtp) == _pairs(alice)  # old, v1
    assert world.audit()[-1]["psk_version"] == 1
    # The new PSK under the old name, or the old PSK under the new name: wrong MAC.
    swapped = IntermediateNode(
        Credentials(REC, NODE_PSK, KMS_ID, IdType.URI, psk_name=REC + b"#psk2"), world.sw
    )
    assert _refused(world, swapped, ti, tr) == ErrorNo.INVALID_ID
    assert world.audit()[-1]["reason"] == "node MAC verification failed"
    # Retired (or its overlap over): refused, the same answer as an unknown node.
    versions.rows[REC] = dataclasses.replace(v1, retired=True)
    assert _refused(world, _node(world), ti, tr) == ErrorNo.INVALID_ID
    record = world.audit()[-1]
    assert record["reason"] == "PSK version 1 retired" and record["node"] == REC.decode()
    assert record["outcome"] == "unauthenticated"
    versions.rows[REC] = dataclasses.replace(v1, retire_at=int(world.now) - 1)
    assert _refused(world, _node(world), ti, tr) == ErrorNo.INVALID_ID
    assert _pairs(_ask(world, new, ti, tr).srtp) == _pairs(alice)
    # A version of an endpoint's PSK is no node's: an ordinary (refused) resolve.
    versions.rows[ALICE + b"#psk2"] = PskVersionRef(ALICE, 2, KeyRef("node/rec-2"), False, None)
    alias = IntermediateNode(
        Credentials(REC, new_psk, KMS_ID, IdType.URI, psk_name=ALICE + b"#psk2"), world.sw
    )
    _refused(world, alias, ti, tr)
    assert "node" not in world.audit()[-1]
