"""Certificate intermediate nodes (RFC 6043 11.1) against the composed KMS and its SoftHSM2
token: a node registered with `--cert` (pinned) sends RESOLVE_INIT_PK naming the leg in IDRr
and gets the leg's session keys; another certificate naming it, or a PSK message from it,
is refused; without [pk] ca_bundle, a certificate node registered after the KMS was built
(while `kms serve` runs) is served without a restart."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from kms.core.api import Outcome
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DesiredPolicy
from kms.endpoint.node import IntermediateNode, PkIntermediateNode
from kms.endpoint.pk import PkCredentials, PkInitiator
from kms.endpoint.session import CryptoSession
from kms.home import CERT_FILE
from kms.mikey.constants import ErrorNo, IdType, KeyDataType
from kms.mikey.message import Message
from kms.mikey.payloads import Error
from kms.mikey.ticket import TpFlag
from kms.store.nodes import NodeRole
from tests.pki import Pki, make_pki
from tests.server.world import ALICE, BOB, KMS_ID, TEAM, World, make_world

FORKING = TpFlag.E | TpFlag.F | TpFlag.G | TpFlag.H | TpFlag.I
NODE = b"sip:recorder@dispatch.example.org"
SESSIONS = (CryptoSession(1, 0x0DE00001), CryptoSession(2, 0x0DE00002))


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki(dt.datetime.now(dt.UTC).replace(microsecond=0))


@pytest.fixture(scope="module")
def node_chain(pki: Pki) -> tuple[rsa.RSAPrivateKey, tuple[bytes, ...]]:
    return pki.chain(NODE)


@pytest.fixture
def world(tmp_path: Path, node_chain: tuple[rsa.RSAPrivateKey, tuple[bytes, ...]]
          ) -> Iterator[World]:  # fmt: skip
    for w in make_world(tmp_path / "home"):
        _, chain = node_chain
        leaf = x509.load_der_x509_certificate(chain[0])
        w.home.add_node(NODE, NodeRole.RECORDER, None, groups=(TEAM.decode(),),
                        cert_pem=leaf.public_bytes(Encoding.PEM).decode())  # fmt: skip
        yield w  # built before the node was registered: served without a rebuild


def _node(
    world: World, chain_of: tuple[rsa.RSAPrivateKey, tuple[bytes, ...]]
) -> PkIntermediateNode:
    key, chain = chain_of
    kms_cert = x509.load_pem_x509_certificate((world.home.path / CERT_FILE).read_bytes())
    creds = PkCredentials(NODE, chain, key, KMS_ID, kms_cert.public_bytes(Encoding.DER))
    return PkIntermediateNode(creds, world.sw)


def _forked_call(world: World) -> tuple[bytes, bytes, list[bytes]]:
    grant = world.grant(DesiredPolicy(responders=(TEAM,), flags=FORKING))
    ini = world.initiator(ALICE)
    ti, pt = ini.transfer_init(grant, world.now, TEAM, SESSIONS)
    res = world.responder(BOB)
    ri, pr = res.receive_transfer_init(ti, world.now)
    reply = world.resolve(ri)
    assert reply.ok, reply.audit
    call = res.accept_resolve(pr, reply.data, world.now)
    assert call.transfer_resp is not None
    alice = ini.accept_transfer_resp(pt, call.transfer_resp, world.now)
    assert [k.key_and_salt for k in alice] == [k.key_and_salt for k in call.srtp]
    return ti, call.transfer_resp, [k.key_and_salt for k in alice]


Chain = tuple[rsa.RSAPrivateKey, tuple[bytes, ...]]


def test_certificate_node_gets_the_forked_leg(world: World, node_chain: Chain) -> None:
    ti, tr, keys = _forked_call(world)
    node = _node(world, node_chain)
    wire, pending = node.resolve_init(ti, tr, time.time())
    reply = world.resolve(wire)
    assert reply.ok, reply.audit
    leg = node.accept(pending, reply.data)
    assert leg.leg == BOB and [k.key_and_salt for k in leg.srtp] == keys
    assert all(k.key_type != KeyDataType.MPK for k in leg.session_keys)
    record = world.audit()[-1]
    assert (record["event"], record["method"], record["node"], record["role"]) == (
        "ticket.node_keys", "node", NODE.decode(), "recorder",
    )  # fmt: skip


def test_replayed_node_request_is_audited_with_the_node(world: World, node_chain: Chain
                                                        ) -> None:  # fmt: skip
    ti, tr, _ = _forked_call(world)
    wire, _ = _node(world, node_chain).resolve_init(ti, tr, time.time())
    assert world.resolve(wire).ok
    again = world.resolve(wire)  # the same RESOLVE_INIT_PK: refused by the replay cache
    assert not again.ok and again.outcome is not Outcome.INTERNAL
    record = world.audit()[-1]
    assert "replay" in str(record.get("reason", "")).lower(), record
    assert (record["node"], record["role"]) == (NODE.decode(), "recorder")


def test_unpinned_certificate_and_psk_message_refused(world: World, pki: Pki) -> None:
    ti, tr, _ = _forked_call(world)
    # A valid certificate for the same identity, but not the one registered.
    wire, _ = _node(world, pki.chain(NODE, "another key")).resolve_init(ti, tr, time.time())
    reply = world.resolve(wire)
    assert reply.outcome is Outcome.UNAUTHENTICATED and reply.error_message is not None
    assert Message.decode(reply.error_message).one(Error).error_no == ErrorNo.INVALID_CERT
    record = world.audit()[-1]
    assert record["reason"] == "not the registered certificate of this node"
    # Audited with the registered node it claims (the wire answer is the same Invalid Cert).
    assert (record["node"], record["role"]) == (NODE.decode(), "recorder")
    # A certificate naming no registered node is no node request: no node in the record.
    stranger = b"sip:stranger@dispatch.example.org"
    key, chain = pki.chain(stranger)
    kms_cert = x509.load_pem_x509_certificate((world.home.path / CERT_FILE).read_bytes())
    creds = PkCredentials(stranger, chain, key, KMS_ID, kms_cert.public_bytes(Encoding.DER))
    wire, _ = PkIntermediateNode(creds, world.sw).resolve_init(ti, tr, time.time())
    assert not world.resolve(wire).ok
    assert "node" not in world.audit()[-1]
    # A certificate node has no PSK: a RESOLVE_INIT_PSK naming it is refused as no node.
    psk_node = IntermediateNode(Credentials(NODE, bytes(32), KMS_ID, IdType.URI), world.sw)
    wire, _ = psk_node.resolve_init(ti, tr, time.time())
    reply = world.resolve(wire)
    assert reply.error_message is not None
    assert Message.decode(reply.error_message).one(Error).error_no == ErrorNo.INVALID_ID
    assert world.audit()[-1]["reason"] == "certificate node sent a PSK message"


def test_pk_path_without_bundle_peers_or_nodes(tmp_path: Path) -> None:
    """No CA bundle, no certificate peer or node: the PK authenticator is built anyway (for
    nodes registered later), and endpoints get the answer they got without one."""
    pki = make_pki(dt.datetime.now(dt.UTC).replace(microsecond=0))
    for w in make_world(tmp_path / "home"):
        assert w.kms.deps.pk is not None  # type: ignore[attr-defined]
        assert not w.home.registry.list_nodes() and w.home.config.pk.ca_bundle is None
        key, chain = pki.chain(ALICE)
        kms_cert = x509.load_pem_x509_certificate((w.home.path / CERT_FILE).read_bytes())
        creds = PkCredentials(ALICE, chain, key, KMS_ID, kms_cert.public_bytes(Encoding.DER))
        wire, _ = PkInitiator(creds, w.sw).request_ticket(DesiredPolicy(responders=(BOB,)),
                                                          time.time())  # fmt: skip
        reply = w.kms.request_ticket(wire, time.time())
        assert reply.outcome is Outcome.MALFORMED and reply.error_message is not None
        error = Message.decode(reply.error_message).one(Error)
        assert error.error_no == ErrorNo.UNSUPPORTED_MESSAGE_TYPE
        assert w.audit()[-1]["reason"] == "public-key messages are not enabled on this KMS"
