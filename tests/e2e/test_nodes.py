"""Keys for authorised intermediate nodes (RFC 6043 11.1), end to end: nodes provisioned with
`kms node add` while `kms serve` runs with its SoftHSM token; a recorder in scope decrypts
both directions of Alice <-> Bob's real SRTP (libsrtp), with and without forking; one out of
scope, a removed one and every node under [policy] intermediate_nodes = "forbidden" are
refused with Invalid ID; a bridge joins a group call with the GTGK; `kms audit nodes` tells
which node obtained which call's keys."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from kms.endpoint.client import KmsRefused, obtain_ticket, resolve
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DEFAULT_FLAGS, DesiredPolicy
from kms.endpoint.node import IntermediateNode, PkIntermediateNode, leg_keys
from kms.endpoint.pk import PkCredentials
from kms.endpoint.session import CryptoSession, SrtpKeys
from kms.home import CERT_FILE
from kms.mikey.base_ticket import ticket_id
from kms.mikey.constants import ErrorNo, IdType, KeyDataType
from kms.mikey.ticket import TpFlag
from tests.e2e.harness import (
    ALICE,
    BOB,
    CAROL,
    KMS_ID,
    PSKS,
    TEAM,
    Kms,
    check_srtp,
    make_home,
    run_kms,
    running_kms,
    set_policy,
    srtp_refuses,
)
from tests.pki import make_pki

FORKING = TpFlag.E | TpFlag.F | TpFlag.G | TpFlag.H | TpFlag.I
SESSIONS = (CryptoSession(1, 0x5EC00001), CryptoSession(2, 0x5EC00002))  # A->B, B->A
RECORDER = b"sip:recorder@dispatch.example.org"
OUTSIDER = b"sip:recorder@elsewhere.example.org"
BRIDGE = b"sip:bridge@conf.example.org"
NODE_PSKS = {
    RECORDER: bytes.fromhex("4e" * 32),
    OUTSIDER: bytes.fromhex("0d" * 32),
    BRIDGE: bytes.fromhex("b1" * 32),
}


def _add(kms: Kms, who: bytes, role: str, *scope: str) -> None:
    run_kms(kms.home, "node", "add", who.decode(), "--role", role,
            "--psk-hex", NODE_PSKS[who].hex(), *scope)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def nodes(kms: Kms) -> None:
    """The nodes, provisioned with the CLI while `kms serve` runs, before any of them asks
    (the server finds new token objects by one rate-limited rescan, docs/hsm.md)."""
    _add(kms, RECORDER, "recorder", "--initiator", "sip:alice@*")
    _add(kms, OUTSIDER, "recorder", "--responder", "sip:*@elsewhere.example.org")
    _add(kms, BRIDGE, "bridge", "--group", TEAM.decode())


def _node(kms: Kms, who: bytes) -> IntermediateNode:
    return IntermediateNode(Credentials(who, NODE_PSKS[who], KMS_ID, IdType.URI), kms.ks)


def _refused(kms: Kms, who: bytes, ti: bytes, tr: bytes | None) -> KmsRefused:
    with pytest.raises(KmsRefused) as info:
        leg_keys(kms.client(), _node(kms, who), ti, tr, time.time())
    assert info.value.error_no == ErrorNo.INVALID_ID
    return info.value


def _both_directions(a: list[SrtpKeys] | tuple[SrtpKeys, ...], b: list[SrtpKeys] | tuple[
        SrtpKeys, ...], node: tuple[SrtpKeys, ...]) -> None:  # fmt: skip
    """Alice sends on CS 1, Bob on CS 2; the node decrypts both, as the far end does."""
    check_srtp(a[0], b[0])
    sent_by_alice = check_srtp(a[0], node[0])
    sent_by_bob = check_srtp(b[1], node[1])
    assert srtp_refuses(sent_by_alice, node[1]) and srtp_refuses(sent_by_bob, node[0])


def test_recorder_decrypts_both_directions_outsider_and_removed_node_refused(kms: Kms) -> None:
    ini = kms.initiator(ALICE)

    # Without forking: the ticket's keys, both directions.
    grant = obtain_ticket(kms.client(), ini, DesiredPolicy(responders=(BOB,)))
    ti, pending = ini.transfer_init(grant, time.time(), BOB, SESSIONS)
    bob = resolve(kms.client(), kms.responder(BOB), ti)
    alice = ini.establish(pending, bob.transfer_resp, time.time())
    leg = leg_keys(kms.client(), _node(kms, RECORDER), ti, bob.transfer_resp, time.time())
    assert leg.leg == BOB and all(k.key_type != KeyDataType.MPK for k in leg.session_keys)
    _both_directions(alice.srtp, bob.srtp, leg.srtp)
    tid = ticket_id(grant.ticket.ticket_data)

    # With forking: the leg the TRANSFER_RESP names (Bob's, then Carol's), each its own keys.
    fork = obtain_ticket(kms.client(), ini, DesiredPolicy(responders=(TEAM,), flags=FORKING))
    legs = []
    for member in (BOB, CAROL):
        ti_f, pending_f = ini.transfer_init(fork, time.time(), TEAM, SESSIONS)
        far = resolve(kms.client(), kms.responder(member), ti_f)
        near = ini.establish(pending_f, far.transfer_resp, time.time())
        got = leg_keys(kms.client(), _node(kms, RECORDER), ti_f, far.transfer_resp, time.time())
        assert got.leg == member and got.rand_kms is not None
        _both_directions(near.srtp, far.srtp, got.srtp)
        legs.append(got)
    assert legs[0].srtp[0].key_and_salt != legs[1].srtp[0].key_and_salt

    # Out of scope: Invalid ID, like an unauthorised Responder.
    refused = _refused(kms, OUTSIDER, ti, bob.transfer_resp)
    assert refused.code is grpc.StatusCode.PERMISSION_DENIED

    # `kms audit nodes`: the compliance officer's view of who obtained this call's keys.
    out = run_kms(kms.home, "audit", "nodes", "--ticket", tid, "--json").stdout
    rows = json.loads(out)
    assert [(r["node"], r["role"], r["leg"], r["forking"]) for r in rows] == [
        (RECORDER.decode(), "recorder", BOB.decode(), False)
    ]
    table = run_kms(kms.home, "audit", "nodes", "--refused").stdout
    assert "refused: recorder node out of scope" in table and OUTSIDER.decode() in table
    mine = json.loads(run_kms(kms.home, "audit", "nodes", "--node", OUTSIDER.decode(),
                              "--refused", "--json").stdout)  # fmt: skip
    assert [(r["node"], r["error_no"]) for r in mine] == [(OUTSIDER.decode(), 7)]
    forked = json.loads(run_kms(kms.home, "audit", "nodes", "--json").stdout)
    assert {r["leg"] for r in forked if r["forking"]} == {BOB.decode(), CAROL.decode()}

    # Removed: refused at once, with the same Invalid ID.
    run_kms(kms.home, "node", "remove", RECORDER.decode())
    _refused(kms, RECORDER, ti, bob.transfer_resp)
    listed = json.loads(run_kms(kms.home, "node", "list", "--json").stdout)
    assert RECORDER.decode() not in [n["identity"] for n in listed]
    # Registered again (a new PSK): served again, without restarting `kms serve`.
    NODE_PSKS[RECORDER] = bytes.fromhex("4f" * 32)
    _add(kms, RECORDER, "recorder", "--responder", "sip:bob@*")
    again = leg_keys(kms.client(), _node(kms, RECORDER), ti, bob.transfer_resp, time.time())
    assert again.srtp == leg.srtp


def test_bridge_joins_a_group_call_with_the_gtgk(kms: Kms) -> None:
    ini = kms.initiator(ALICE)
    flags = (DEFAULT_FLAGS | TpFlag.H) & ~TpFlag.G & ~TpFlag.F & ~TpFlag.O
    desired = DesiredPolicy(responders=(TEAM,), flags=flags, key_types=(KeyDataType.GTGK,))
    grant = obtain_ticket(kms.client(), ini, desired)
    assert [k.key_type for k in grant.session_keys] == [KeyDataType.GTGK]
    ti, pending = ini.transfer_init(grant, time.time(), TEAM, SESSIONS)
    bob = resolve(kms.client(), kms.responder(BOB), ti)
    carol = resolve(kms.client(), kms.responder(CAROL), ti)
    assert bob.transfer_resp is None  # F = 0: a group call without TRANSFER_RESP
    alice = ini.keys_without_response(pending)
    bridge = leg_keys(kms.client(), _node(kms, BRIDGE), ti, None, time.time())
    assert bridge.session_keys[0].key == grant.session_keys[0].key
    sent = check_srtp(alice[0], bridge.srtp[0])  # the bridge hears Alice ...
    check_srtp(bridge.srtp[1], carol.srtp[1])  # ... and speaks to Carol (and Bob)
    check_srtp(bridge.srtp[1], bob.srtp[1])
    assert not srtp_refuses(sent, bob.srtp[0])


def test_policy_forbids_every_node(tmp_path: Path) -> None:
    """A KMS whose [policy] says intermediate_nodes = "forbidden" refuses a node in scope."""
    home = make_home(tmp_path / "home", {ALICE: PSKS[ALICE], BOB: PSKS[BOB]}, {})
    set_policy(home, intermediate_nodes='"forbidden"')
    who = RECORDER
    with running_kms(home) as strict:
        _add(strict, who, "recorder", "--initiator", "*")
        ini = strict.initiator(ALICE)
        grant = obtain_ticket(strict.client(), ini, DesiredPolicy(responders=(BOB,)))
        ti, _ = ini.transfer_init(grant, time.time(), BOB, SESSIONS)
        bob = resolve(strict.client(), strict.responder(BOB), ti)
        refused = _refused(strict, who, ti, bob.transfer_resp)
        assert refused.code is grpc.StatusCode.PERMISSION_DENIED
        table = run_kms(home, "audit", "nodes", "--refused").stdout
        assert "refused: [policy] intermediate_nodes = forbidden" in table


def test_node_psk_rotation_without_a_gap(kms: Kms) -> None:
    """`kms node rotate-psk` while `kms serve` runs: the recorder keeps getting a call's keys
    with its old PSK and with the new version (IDRpsk ``<node>#psk2``, RFC 6043 4.2.3) until
    `kms node retire-psk` retires the old one, which is then refused with Invalid ID and its
    token object destroyed; `kms node remove` destroys the new one too."""
    who = b"sip:rotating-recorder@dispatch.example.org"
    NODE_PSKS[who] = bytes.fromhex("7e" * 32)
    _add(kms, who, "recorder", "--initiator", "sip:alice@*")
    ini = kms.initiator(ALICE)
    grant = obtain_ticket(kms.client(), ini, DesiredPolicy(responders=(BOB,)))
    ti, pending = ini.transfer_init(grant, time.time(), BOB, SESSIONS)
    bob = resolve(kms.client(), kms.responder(BOB), ti)
    alice = ini.establish(pending, bob.transfer_resp, time.time())
    old = _node(kms, who)
    _both_directions(alice.srtp, bob.srtp, leg_keys(kms.client(), old, ti, bob.transfer_resp,
                                                    time.time()).srtp)  # fmt: skip

    out = run_kms(kms.home, "node", "rotate-psk", who.decode()).stdout
    psk_hex = re.search(r"psk: ([0-9a-f]+)", out)
    assert psk_hex and f"name (IDRpsk): {who.decode()}#psk2" in out, out
    new = IntermediateNode(Credentials(who, bytes.fromhex(psk_hex[1]), KMS_ID, IdType.URI,
                                       psk_name=who + b"#psk2"), kms.ks)  # fmt: skip
    for node in (new, old, new):  # both at once: no gap while the recorder is re-provisioned
        got = leg_keys(kms.client(), node, ti, bob.transfer_resp, time.time())
        _both_directions(alice.srtp, bob.srtp, got.srtp)
    listed = json.loads(run_kms(kms.home, "node", "psk-list", who.decode(), "--json").stdout)
    assert [(v["version"], v["state"]) for v in listed] == [(1, "active"), (2, "active")]
    v1_label, v2_label = listed[0]["key_label"], listed[1]["key_label"]
    keys = {k["label"]: k for k in json.loads(run_kms(kms.home, "keys", "list", "--json").stdout)}
    assert keys[v2_label]["sensitive"] and not keys[v2_label]["extractable"]
    assert keys[v2_label]["owner"] == f"recorder node {who.decode()} PSK v2"

    out = run_kms(kms.home, "node", "retire-psk", who.decode(), "1").stdout
    assert f"key {v1_label} destroyed" in out
    refused = _refused(kms, who, ti, bob.transfer_resp)  # the retired PSK: Invalid ID
    assert refused.code is grpc.StatusCode.UNAUTHENTICATED
    got = leg_keys(kms.client(), new, ti, bob.transfer_resp, time.time())
    _both_directions(alice.srtp, bob.srtp, got.srtp)
    assert v1_label not in {k["label"] for k in json.loads(
        run_kms(kms.home, "keys", "list", "--json").stdout)}  # fmt: skip
    rows = json.loads(run_kms(kms.home, "audit", "nodes", "--node", who.decode(), "--refused",
                              "--json").stdout)  # fmt: skip
    assert [r["reason"] for r in rows if r["outcome"] != "ok"] == ["PSK version 1 retired"]
    p = run_kms(kms.home, "node", "retire-psk", who.decode(), "2", check=False)
    assert p.returncode == 1 and "only PSK" in p.stderr

    run_kms(kms.home, "node", "remove", who.decode())
    with pytest.raises(KmsRefused):
        leg_keys(kms.client(), new, ti, bob.transfer_resp, time.time())
    assert v2_label not in {k["label"] for k in json.loads(
        run_kms(kms.home, "keys", "list", "--json").stdout)}  # fmt: skip


def test_certificate_node_added_while_serving_decrypts_a_forked_leg(kms: Kms) -> None:
    """`kms node add --cert` while `kms serve` runs (no [pk] ca_bundle, no certificate peer
    or node at start: no restart needed): the transcoder's RESOLVE_INIT_PK (RFC 6043
    4.2.3.1; CERT = its pinned certificate, SIGN over it || IDRr || IDRkms) gets the forked
    leg's keys, which decrypt the leg's real SRTP; another certificate naming it is refused
    with Invalid Cert and audited with the node, one naming no node like any endpoint's."""
    who = b"sip:transcoder@media.example.org"
    pki = make_pki(dt.datetime.now(dt.UTC).replace(microsecond=0))
    key, chain = pki.chain(who)
    pem = kms.home.parent / "transcoder.pem"
    pem.write_bytes(x509.load_der_x509_certificate(chain[0]).public_bytes(Encoding.PEM))
    run_kms(kms.home, "node", "add", who.decode(), "--role", "transcoder", "--cert", str(pem),
            "--responder", "sip:bob@*")  # fmt: skip
    kms_cert = x509.load_pem_x509_certificate((kms.home / CERT_FILE).read_bytes())

    def node(chain_of: tuple[rsa.RSAPrivateKey, tuple[bytes, ...]], ident: bytes = who
             ) -> PkIntermediateNode:  # fmt: skip
        creds = PkCredentials(ident, chain_of[1], chain_of[0], KMS_ID,
                              kms_cert.public_bytes(Encoding.DER))  # fmt: skip
        return PkIntermediateNode(creds, kms.ks)

    ini = kms.initiator(ALICE)
    fork = obtain_ticket(kms.client(), ini, DesiredPolicy(responders=(TEAM,), flags=FORKING))
    legs = {}
    for member in (BOB, CAROL):
        ti, pending = ini.transfer_init(fork, time.time(), TEAM, SESSIONS)
        far = resolve(kms.client(), kms.responder(member), ti)
        legs[member] = (ti, far, ini.establish(pending, far.transfer_resp, time.time()))
    ti, bob, alice = legs[BOB]
    got = leg_keys(kms.client(), node((key, chain)), ti, bob.transfer_resp, time.time())
    assert got.leg == BOB and all(k.key_type != KeyDataType.MPK for k in got.session_keys)
    _both_directions(alice.srtp, bob.srtp, got.srtp)
    # Carol's leg is out of its scope (responder patterns: Bob only).
    ti_c, carol, _ = legs[CAROL]
    with pytest.raises(KmsRefused) as info:
        leg_keys(kms.client(), node((key, chain)), ti_c, carol.transfer_resp, time.time())
    assert (info.value.code, info.value.error_no) == (grpc.StatusCode.PERMISSION_DENIED,
                                                      ErrorNo.INVALID_ID)  # fmt: skip

    # A valid certificate for the same identity that is not the pinned one: Invalid Cert.
    client = kms.client()
    with pytest.raises(KmsRefused) as info:
        leg_keys(client, node(pki.chain(who, "another key")), ti, bob.transfer_resp,
                 time.time())  # fmt: skip
    assert (info.value.code, info.value.error_no) == (grpc.StatusCode.UNAUTHENTICATED,
                                                      ErrorNo.INVALID_CERT)  # fmt: skip
    records = [json.loads(x) for x in (kms.home / "audit.log").read_text().splitlines()]
    (refusal,) = [r for r in records if r.get("correlation_id") == client.last_correlation_id]
    assert refusal["reason"] == "not the registered certificate of this node"
    assert (refusal["node"], refusal["role"]) == (who.decode(), "transcoder")
    # A certificate naming no registered node goes the endpoint way (no [pk] ca_bundle).
    stranger = b"sip:stranger@media.example.org"
    with pytest.raises(KmsRefused) as info:
        leg_keys(client, node(pki.chain(stranger), stranger), ti, bob.transfer_resp,
                 time.time())  # fmt: skip
    assert info.value.error_no == ErrorNo.UNSUPPORTED_MESSAGE_TYPE
    records = [json.loads(x) for x in (kms.home / "audit.log").read_text().splitlines()]
    (refusal,) = [r for r in records if r.get("correlation_id") == client.last_correlation_id]
    assert "node" not in refusal
    rows = json.loads(run_kms(kms.home, "audit", "nodes", "--node", who.decode(), "--json").stdout)
    assert [(r["leg"], r["forking"]) for r in rows] == [(BOB.decode(), True)]
