"""Whole MIKEY-TICKET calls over real gRPC against `kms serve` with its SoftHSM token, ending
in real SRTP: what Alice protects with libsrtp, Bob unprotects (RFC 6043 4.2, 5.1-5.3)."""

from __future__ import annotations

import os
import time

import grpc
import pytest

from kms.endpoint.client import KmsRefused, obtain_ticket, resolve, run_call
from kms.endpoint.initiator import DEFAULT_FLAGS, DesiredPolicy
from kms.endpoint.modes import build_ticket, resolve_locally
from kms.endpoint.session import CryptoSession, EndpointError
from kms.endpoint.update import (
    accept_update,
    accept_update_resp,
    apply_own_update,
    update_init,
)
from kms.mikey.constants import DataType, ErrorNo, IdRole, KeyDataType
from kms.mikey.message import Message
from kms.mikey.payloads import Error, KeyData, KvSpi
from kms.mikey.ticket import Idr, TpFlag
from tests.e2e.conftest import MODE2_TPK, MODE2_TPK_LABEL
from tests.e2e.harness import (
    ALICE,
    BOB,
    CAROL,
    ERIN,
    FRANK,
    GRACE,
    MALLORY,
    PSKS,
    TEAM,
    Kms,
    check_srtp,
    srtp_refuses,
)

FORKING = TpFlag.E | TpFlag.F | TpFlag.G | TpFlag.H | TpFlag.I
SESSIONS = (CryptoSession(1, 0xA11CE001), CryptoSession(2, 0xA11CE002))


def test_alice_calls_bob_and_srtp_flows_mallory_gets_nothing(kms: Kms) -> None:
    alice_kms, bob_kms = kms.client(), kms.client()
    ini = kms.initiator(ALICE)
    grant = obtain_ticket(alice_kms, ini, DesiredPolicy(responders=(BOB,)))
    tp = grant.policy
    assert tp.flags & TpFlag.D and tp.flags & TpFlag.E
    assert Idr(IdRole.IDRI, 1, ALICE) in tp.payloads
    assert [p.data for p in tp.payloads if isinstance(p, Idr) and p.role == IdRole.IDRR] == [BOB]

    ti, pending = ini.transfer_init(grant, time.time(), BOB, SESSIONS)
    call = resolve(bob_kms, kms.responder(BOB), ti)
    assert call.initiator == ALICE and call.transfer_resp is not None
    alice = ini.establish(pending, call.transfer_resp, time.time())
    assert [k.cs_id for k in alice.srtp] == [1, 2]
    assert [k.key_and_salt for k in alice.srtp] == [k.key_and_salt for k in call.srtp]
    assert alice.srtp[0].master_key != alice.srtp[1].master_key
    assert len(alice.srtp[0].master_key) == 16 and len(alice.srtp[0].master_salt) == 14

    # Real SRTP, both crypto sessions: Alice protects, Bob unprotects.
    packets = []
    for a, b in zip(alice.srtp, call.srtp, strict=True):
        packets += check_srtp(a, b)
    # Mallory is registered but not named in the ticket: the KMS refuses her resolve.
    with pytest.raises(KmsRefused) as info:
        resolve(kms.client(), kms.responder(MALLORY), ti)
    refused = info.value
    assert refused.code is grpc.StatusCode.PERMISSION_DENIED
    assert refused.error_message is not None
    err = Message.decode(refused.error_message)
    assert err.data_type == DataType.ERROR
    assert err.one(Error).error_no == ErrorNo.INVALID_ID == refused.error_no
    # Without the keys, SRTP fails: a receiver keyed with random bytes rejects every packet.
    assert srtp_refuses(packets[:4], alice.srtp[0], key=os.urandom(30))


def test_forking_to_a_group_of_two(kms: Kms) -> None:
    ini = kms.initiator(ALICE)
    grant = obtain_ticket(kms.client(), ini, DesiredPolicy(responders=(TEAM,), flags=FORKING))
    assert grant.policy.flags & TpFlag.I and grant.mpkr is not None
    sessions = (CryptoSession(1, 0x7EA40001),)
    bob = run_call(kms.client(), ini, kms.client(), kms.responder(BOB),
                   grant=grant, to=TEAM, sessions=sessions)  # fmt: skip
    carol = run_call(kms.client(), ini, kms.client(), kms.responder(CAROL),
                     grant=grant, to=TEAM, sessions=sessions)  # fmt: skip
    check_srtp(bob.initiator.srtp[0], bob.responder.srtp[0])
    check_srtp(carol.initiator.srtp[0], carol.responder.srtp[0])
    # Forked keys (RFC 6043 5.1.1): the two members do not share SRTP keys.
    assert bob.initiator.srtp[0].key_and_salt != carol.initiator.srtp[0].key_and_salt
    assert bob.responder.session_keys[0].key != carol.responder.session_keys[0].key
    packets = check_srtp(bob.initiator.srtp[0], bob.responder.srtp[0])
    assert srtp_refuses(packets, carol.responder.srtp[0])
    # Mallory is not in the group.
    with pytest.raises(KmsRefused) as info:
        run_call(kms.client(), ini, kms.client(), kms.responder(MALLORY),
                 grant=grant, to=TEAM, sessions=sessions)  # fmt: skip
    assert info.value.code is grpc.StatusCode.PERMISSION_DENIED


def test_mode_1_kms_issues_and_resolves(kms: Kms) -> None:
    call = run_call(kms.client(), kms.initiator(ERIN), kms.client(), kms.responder(BOB))
    assert call.grant.policy.flags & TpFlag.D
    check_srtp(call.initiator.srtp[0], call.responder.srtp[0])


def test_mode_2_kms_issues_responder_resolves_with_shared_tpk(kms: Kms) -> None:
    """Over gRPC for the Ticket Request; the Responder resolves locally (no ResolveTicket):
    the KMS's current TPK is one the test shares with Bob (installed before serving)."""
    ini = kms.initiator(ERIN)
    grant = obtain_ticket(kms.client(), ini, DesiredPolicy(responders=(BOB,)))
    assert grant.ticket.base_ticket().idr_psk == Idr(IdRole.IDRPSK, 2, MODE2_TPK_LABEL.encode())
    now = time.time()
    ti, pending = ini.transfer_init(grant, now, BOB, SESSIONS[:1])
    call = resolve_locally(
        kms.responder(BOB), ti, now, lambda tid: MODE2_TPK if tid == MODE2_TPK_LABEL.encode()
        else None
    )  # fmt: skip
    keys = ini.accept_transfer_resp(pending, call.transfer_resp or b"", now)
    check_srtp(keys[0], call.srtp[0])
    # Only the named Responder can resolve locally, and only with the right TPK.
    with pytest.raises(EndpointError):
        resolve_locally(kms.responder(CAROL), ti, now, lambda tid: MODE2_TPK)
    with pytest.raises(EndpointError):
        resolve_locally(kms.responder(BOB), ti, now, lambda tid: bytes(32))


@pytest.mark.parametrize("flags", [TpFlag.E | TpFlag.F | TpFlag.G | TpFlag.H, FORKING | TpFlag.L])
def test_mode_3_initiator_builds_kms_resolves(kms: Kms, flags: TpFlag) -> None:
    ini = kms.initiator(FRANK)
    desired = DesiredPolicy(responders=(BOB,), flags=flags)
    grant = build_ticket(ini, PSKS[FRANK], FRANK, desired, time.time())
    assert not grant.policy.flags & TpFlag.D and grant.policy.flags & TpFlag.L
    call = run_call(kms.client(), ini, kms.client(), kms.responder(BOB), grant=grant)
    check_srtp(call.initiator.srtp[0], call.responder.srtp[0])
    # A ticket in Frank's name under another key fails authentication at the KMS.
    forged = build_ticket(ini, PSKS[GRACE], FRANK, desired, time.time())
    with pytest.raises(KmsRefused) as info:
        run_call(kms.client(), ini, kms.client(), kms.responder(BOB), grant=forged)
    assert info.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert info.value.error_no == ErrorNo.AUTH_FAILURE


def test_mode_4_endpoints_only(kms: Kms) -> None:
    """No KMS exchange at all (the server is not involved: nothing to send it)."""
    shared = os.urandom(16)
    ini = kms.initiator(ALICE)
    now = time.time()
    grant = build_ticket(ini, shared, b"alice-bob", DesiredPolicy(responders=(BOB,)), now)
    ti, pending = ini.transfer_init(grant, now, BOB, SESSIONS[:1])
    call = resolve_locally(kms.responder(BOB), ti, now, lambda tid: shared)
    keys = ini.accept_transfer_resp(pending, call.transfer_resp or b"", now)
    check_srtp(keys[0], call.srtp[0])
    # And the KMS cannot resolve it (it does not know the key named alice-bob).
    with pytest.raises(KmsRefused) as info:
        resolve(kms.client(), kms.responder(BOB), ti)
    assert info.value.code is grpc.StatusCode.UNAUTHENTICATED, info.value
    assert info.value.error_no == ErrorNo.AUTH_FAILURE


@pytest.mark.parametrize(("to", "resolver", "flags"), [(BOB, BOB, None), (TEAM, CAROL, FORKING)])
def test_csb_update_after_a_grpc_call(kms: Kms, to: bytes, resolver: bytes, flags: TpFlag) -> None:
    desired = DesiredPolicy(responders=(to,), flags=flags or DEFAULT_FLAGS)
    call = run_call(kms.client(), kms.initiator(GRACE), kms.client(), kms.responder(resolver),
                    desired=desired, to=to, sessions=SESSIONS[:1])  # fmt: skip
    alice, bob = call.initiator, call.responder.state
    assert bob is not None
    check_srtp(alice.srtp[0], bob.srtp[0])

    # Alice sends a new TGK and adds a crypto session (RFC 6043 5.2).
    tgk = KeyData(KeyDataType.TGK, os.urandom(16), None, KvSpi(b"\x00\x00\x00\x02"))
    now = time.time()
    upd, pending = update_init(kms.ks, alice, now, [tgk], SESSIONS)
    resp, bob2 = accept_update(kms.ks, bob, upd, now)
    assert resp is not None
    alice2 = accept_update_resp(kms.ks, pending, resp, now)
    assert len(alice2.srtp) == 2
    assert alice2.srtp[0].key_and_salt != alice.srtp[0].key_and_salt
    old = check_srtp(alice.srtp[0], bob.srtp[0])
    for a, b in zip(alice2.srtp, bob2.srtp, strict=True):
        check_srtp(a, b)
    assert srtp_refuses(old, bob2.srtp[0])  # the old keys are gone

    # Bob updates too, without asking for a response.
    tgk3 = KeyData(KeyDataType.TGK, os.urandom(16), None, KvSpi(b"\x00\x00\x00\x03"))
    upd3, pending3 = update_init(kms.ks, bob2, now + 1, [tgk3], want_response=False)
    none, alice3 = accept_update(kms.ks, alice2, upd3, now + 1)
    assert none is None
    bob3 = apply_own_update(kms.ks, pending3)
    for a, b in zip(alice3.srtp, bob3.srtp, strict=True):
        check_srtp(a, b)


def test_reusable_ticket_resolves_twice(kms: Kms) -> None:
    ini = kms.initiator(ERIN)
    grant = obtain_ticket(
        kms.client(), ini, DesiredPolicy(responders=(BOB,), flags=DEFAULT_FLAGS | TpFlag.J)
    )
    assert grant.policy.flags & TpFlag.J
    first = run_call(kms.client(), ini, kms.client(), kms.responder(BOB), grant=grant)
    second = run_call(kms.client(), ini, kms.client(), kms.responder(BOB), grant=grant)
    check_srtp(first.initiator.srtp[0], first.responder.srtp[0])
    check_srtp(second.initiator.srtp[0], second.responder.srtp[0])
    assert first.initiator.srtp[0].master_key != second.initiator.srtp[0].master_key


def test_single_use_ticket_second_resolve_is_refused(kms: Kms) -> None:
    ini = kms.initiator(ERIN)
    grant = obtain_ticket(kms.client(), ini, DesiredPolicy(responders=(BOB,)))
    assert not grant.policy.flags & TpFlag.J
    first = run_call(kms.client(), ini, kms.client(), kms.responder(BOB), grant=grant)
    check_srtp(first.initiator.srtp[0], first.responder.srtp[0])
    with pytest.raises(KmsRefused) as info:
        run_call(kms.client(), ini, kms.client(), kms.responder(BOB), grant=grant)
    refused = info.value
    assert refused.code is grpc.StatusCode.FAILED_PRECONDITION, refused
    assert refused.error_message is not None and refused.error_no is not None
    assert Message.decode(refused.error_message).data_type == DataType.ERROR
