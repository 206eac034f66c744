"""Federation across three `kms serve` processes (RFC 6043 9), see conftest.py for the set-up.

A Responder resolves at its own KMS; a ticket another KMS issued is resolved by asking the
issuer, over mutual TLS, with a RESOLVE_INIT of the Responder's KMS's own. What the Responder
sees (MIKEY error and gRPC status) and what both audit logs say is checked for each case.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import grpc
import pytest

from kms import rpc
from kms.endpoint.client import KmsRefused, obtain_ticket, run_call
from kms.endpoint.initiator import DEFAULT_FLAGS, DesiredPolicy, Initiator, TicketGrant
from kms.endpoint.session import CryptoSession, EndpointError
from kms.mikey.base_ticket import ticket_id
from kms.mikey.constants import DataType, ErrorNo
from kms.mikey.message import Message
from kms.mikey.payloads import Error
from kms.mikey.ticket import TpFlag
from tests.e2e.harness import check_srtp, run_kms
from tests.federation.conftest import (
    ALICE,
    BOB,
    BOB2,
    BOB3,
    C_RATE_FOR_B,
    CAROL,
    CAROL_AT_B_PSK,
    DEADLINE_B_TO_A_MS,
    DEADLINE_B_TO_C_MS,
    Fed,
)

FORKING = TpFlag.E | TpFlag.F | TpFlag.G | TpFlag.H | TpFlag.I
SESSIONS = (CryptoSession(1, 0xFED00001),)


def cid() -> str:
    return "fed-" + uuid.uuid4().hex[:16]


def grant_from(
    fed: Fed, domain: str, who: bytes, to: tuple[bytes, ...], flags: TpFlag = DEFAULT_FLAGS
) -> tuple[Initiator, TicketGrant]:
    ini = fed.initiator(who, domain)
    return ini, obtain_ticket(fed.client(domain), ini, DesiredPolicy(responders=to, flags=flags))


def resolve_refused(
    fed: Fed, ini: Initiator, grant: TicketGrant, who: bytes, at: str, psk: bytes | None = None
) -> tuple[KmsRefused, str, float]:
    """Transfer ``grant`` to ``who`` and let ``who`` resolve it at ``at``: it must fail."""
    correlation = cid()
    ti, _pending = ini.transfer_init(grant, time.time(), who, SESSIONS)
    res = fed.responder(who, at, psk)
    wire, _pr = res.receive_transfer_init(ti, time.time())
    t0 = time.monotonic()
    with pytest.raises(KmsRefused) as info:
        fed.client(at).resolve_ticket(wire, correlation_id=correlation)
    return info.value, correlation, time.monotonic() - t0


def error_no(refused: KmsRefused) -> int:
    assert refused.error_message is not None, refused
    msg = Message.decode(refused.error_message)
    assert msg.data_type == DataType.ERROR
    return msg.one(Error).error_no


@pytest.mark.parametrize("flags", [DEFAULT_FLAGS, FORKING], ids=["plain", "forking"])
def test_user_of_a_calls_user_of_b(fed: Fed, flags: TpFlag) -> None:
    ini, grant = grant_from(fed, "A", ALICE, (BOB,), flags)
    correlation = cid()
    ti, pending = ini.transfer_init(grant, time.time(), BOB, SESSIONS)
    res = fed.responder(BOB, "B")
    wire, pr = res.receive_transfer_init(ti, time.time())
    answer = fed.client("B").resolve_ticket(wire, correlation_id=correlation)
    call = res.accept_resolve(pr, answer, time.time())
    alice = ini.establish(pending, call.transfer_resp, time.time())
    assert call.initiator == ALICE
    assert [k.key_and_salt for k in alice.srtp] == [k.key_and_salt for k in call.srtp]
    check_srtp(alice.srtp[0], call.srtp[0])

    # One linked event on both sides: the same correlation id, B forwarded, A resolved for B.
    (b_rec,) = fed["B"].audit(correlation)
    (a_rec,) = fed["A"].audit(correlation)
    assert b_rec["event"] == a_rec["event"] == "ticket.resolved"
    assert b_rec["via_peer"] is True and b_rec["peer"] == "kms:a.example"
    assert b_rec["issuer"] == "kms:a.example" and b_rec["sender"] == BOB.decode()
    assert a_rec["method"] == "peer" and a_rec["peer"] == "kms:b.example"
    assert a_rec["sender"] == BOB.decode()
    assert a_rec["hops"] == 1
    assert a_rec["forking"] is (flags == FORKING) is b_rec["forking"]


def test_forking_across_domains(fed: Fed) -> None:
    """A ticket from A for two users of B with forking: each resolves through B and gets keys
    bound to themselves; a third user of B (not named in the ticket) is refused by A."""
    ini, grant = grant_from(fed, "A", ALICE, (BOB, BOB2), FORKING)
    assert grant.policy.flags & TpFlag.I
    calls = [
        run_call(fed.client("A"), ini, fed.client("B"), fed.responder(who, "B"),
                 grant=grant, to=who, sessions=SESSIONS)
        for who in (BOB, BOB2)
    ]  # fmt: skip
    for c in calls:
        check_srtp(c.initiator.srtp[0], c.responder.srtp[0])
    # RFC 6043 5.1.1: forked keys, Bob and Bob2 do not share SRTP keys.
    assert calls[0].responder.srtp[0].key_and_salt != calls[1].responder.srtp[0].key_and_salt

    # Bob3 (B trusted for him by A) is not a responder of this ticket: A refuses, B passes
    # the refusal on.
    refused, correlation, _ = resolve_refused(fed, ini, grant, BOB3, "B")
    assert refused.code is grpc.StatusCode.PERMISSION_DENIED
    assert error_no(refused) == ErrorNo.INVALID_ID
    (a_rec,) = fed["A"].audit(correlation)
    assert a_rec["reason"] == "not an authorised responder for this ticket"


def test_user_of_c_is_refused_a_does_not_trust_c(fed: Fed) -> None:
    """C has no peer entry for A (and A none for C): Carol cannot resolve A's ticket at C."""
    ini, grant = grant_from(fed, "A", ALICE, (CAROL,))
    refused, correlation, _ = resolve_refused(fed, ini, grant, CAROL, "C")
    assert refused.code is grpc.StatusCode.PERMISSION_DENIED
    assert error_no(refused) == ErrorNo.INVALID_TICKET
    (rec,) = fed["C"].audit(correlation)
    assert rec["reason"] == "unknown issuer" and rec["issuer"] == "kms:a.example"
    assert fed["A"].audit(correlation) == []  # nothing ever reached A


def test_peer_not_trusted_for_the_identity(fed: Fed) -> None:
    """A trusts B only for sip:*@b.example: a ticket for Carol resolved through B (where Carol
    also has an account) is refused by A, and both logs say so under one correlation id."""
    ini, grant = grant_from(fed, "A", ALICE, (CAROL,))
    refused, correlation, _ = resolve_refused(fed, ini, grant, CAROL, "B", CAROL_AT_B_PSK)
    assert refused.code is grpc.StatusCode.PERMISSION_DENIED
    assert error_no(refused) == ErrorNo.INVALID_ID
    assert "issuing KMS refused" in refused.detail
    (a_rec,) = fed["A"].audit(correlation)
    assert a_rec["reason"] == "peer not trusted for sip:carol@c.example"
    (b_rec,) = fed["B"].audit(correlation)
    assert b_rec["event"] == "ticket.forwarded" and b_rec["outcome"] == "denied"
    assert b_rec["peer"] == "kms:a.example"
    assert "PERMISSION_DENIED" in str(b_rec["reason"])


def test_c_ticket_through_the_relay_and_c_quota(fed: Fed) -> None:
    """Carol (C) calls Bob (B) through B's route to C; C limits B to a few resolves a second."""
    fed.relay.mode = "pass"
    ini, grant = grant_from(fed, "C", CAROL, (BOB,), DEFAULT_FLAGS | TpFlag.J)
    call = run_call(fed.client("C"), ini, fed.client("B"), fed.responder(BOB, "B"),
                    grant=grant, sessions=SESSIONS)  # fmt: skip
    check_srtp(call.initiator.srtp[0], call.responder.srtp[0])

    codes = []
    for _ in range(3 * C_RATE_FOR_B):
        try:
            run_call(fed.client("C"), ini, fed.client("B"), fed.responder(BOB, "B"),
                     grant=grant, sessions=SESSIONS)  # fmt: skip
            codes.append(grpc.StatusCode.OK)
        except KmsRefused as exc:
            codes.append(exc.code)
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert any(r.get("reason") == "peer quota exceeded" for r in fed["C"].audit())
    time.sleep(1.0)  # let C's bucket for B fill up again for the tests that follow


def test_slow_peer_is_unavailable_within_its_deadline(fed: Fed) -> None:
    ini, grant = grant_from(fed, "C", CAROL, (BOB,))
    fed.relay.mode = "slow"
    fed.relay.release.clear()
    try:
        refused, correlation, elapsed = resolve_refused(fed, ini, grant, BOB, "B")
    finally:
        fed.relay.release.set()
        fed.relay.mode = "pass"
    assert refused.code is grpc.StatusCode.UNAVAILABLE
    assert refused.detail == "issuing KMS unavailable"
    assert error_no(refused) == ErrorNo.UNSPECIFIED
    assert DEADLINE_B_TO_C_MS / 1000 - 0.1 < elapsed < DEADLINE_B_TO_C_MS / 1000 + 1.0
    (b_rec,) = fed["B"].audit(correlation)
    assert "DEADLINE_EXCEEDED" in str(b_rec["reason"])


def test_resolve_cancelled_while_the_peer_has_not_answered_is_audited(fed: Fed) -> None:
    """Bob's client gives up (its deadline, shorter than B's to C) while B waits for C's
    answer: B writes one record, outcome cancelled, naming Bob and the peer; B goes on
    serving, and C's late answer (here a refusal) is used for nothing."""
    ini, grant = grant_from(fed, "C", CAROL, (BOB,))
    fed.relay.mode = "slow"
    fed.relay.release.clear()
    correlation = cid()
    try:
        ti, _pending = ini.transfer_init(grant, time.time(), BOB, SESSIONS)
        wire, _pr = fed.responder(BOB, "B").receive_transfer_init(ti, time.time())
        with pytest.raises(KmsRefused) as info:
            fed.client("B", timeout=0.3).resolve_ticket(wire, correlation_id=correlation)
        assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 10  # a bounded wait for B's record, nothing timed
        while not fed["B"].audit(correlation) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        fed.relay.release.set()
        fed.relay.mode = "pass"
    (b_rec,) = fed["B"].audit(correlation)
    assert b_rec["outcome"] == "cancelled"
    assert b_rec["reason"] == "cancelled while waiting for peer KMS kms:c.example"
    assert b_rec["sender"] == BOB.decode() and b_rec["peer"] == "kms:c.example"
    assert "error_no" not in b_rec
    # B serves the next federated resolve through the relay.
    ini, grant = grant_from(fed, "C", CAROL, (BOB,))
    call = run_call(fed.client("C"), ini, fed.client("B"), fed.responder(BOB, "B"),
                    grant=grant, sessions=SESSIONS)  # fmt: skip
    check_srtp(call.initiator.srtp[0], call.responder.srtp[0])
    assert fed["B"].audit(correlation) == [b_rec]  # still one: the late answer added none


@pytest.mark.parametrize("mode", ["forge", "stale"])
def test_forged_peer_response_is_caught(fed: Fed, mode: str) -> None:
    """The answer on B's route to C is tampered with (a flipped MAC byte) or is a genuine
    answer of C to an earlier request: B refuses to use it and says why in its log."""
    if mode == "stale" and fed.relay.last_answer is None:
        ini, grant = grant_from(fed, "C", CAROL, (BOB,))
        run_call(fed.client("C"), ini, fed.client("B"), fed.responder(BOB, "B"), grant=grant)
    ini, grant = grant_from(fed, "C", CAROL, (BOB,))
    correlation = cid()
    ti, _pending = ini.transfer_init(grant, time.time(), BOB, SESSIONS)
    res = fed.responder(BOB, "B")
    wire, pr = res.receive_transfer_init(ti, time.time())
    fed.relay.mode = mode
    try:
        with pytest.raises(KmsRefused) as info:
            fed.client("B").resolve_ticket(wire, correlation_id=correlation)
    finally:
        fed.relay.mode = "pass"
    refused = info.value
    assert refused.code is grpc.StatusCode.UNAVAILABLE
    assert refused.detail == "issuing KMS returned an invalid response"
    (b_rec,) = fed["B"].audit(correlation)
    why = "MAC verification failed" if mode == "forge" else "not a RESOLVE_RESP to our"
    assert why in str(b_rec["reason"])
    if mode == "forge":  # C did resolve it: its log has the same correlation id
        (c_rec,) = fed["C"].audit(correlation)
        assert c_rec["event"] == "ticket.resolved" and c_rec["peer"] == "kms:b.example"
    # The error message B sends is MACed for Bob, so Bob's endpoint gets a verified refusal.
    with pytest.raises(EndpointError):
        res.accept_resolve(pr, refused.error_message or b"", time.time())


def test_loop_is_stopped_after_one_hop(fed: Fed) -> None:
    """B's route to C leads back to B (a relay forwarding it on, one hop more): B does not
    take its own forwarded request for a peer's, nothing is forwarded a second time, and the
    Responder gets an answer at once instead of a deadline."""
    ini, grant = grant_from(fed, "C", CAROL, (BOB,))
    before = len(fed.relay.calls)
    fed.relay.mode = "loop"
    try:
        refused, correlation, elapsed = resolve_refused(fed, ini, grant, BOB, "B")
    finally:
        fed.relay.mode = "pass"
    assert refused.code is grpc.StatusCode.PERMISSION_DENIED
    assert elapsed < 1.0
    assert len(fed.relay.calls) - before == 1  # exactly one forwarded request
    records = fed["B"].audit(correlation)
    assert [r.get("hops", 0) for r in records] == [2, 0]  # the looped one, then Bob's
    looped, bobs = records
    assert looped["outcome"] != "ok" and looped["event"] == "refused"
    assert bobs["peer"] == "kms:c.example" and "peer refused" in str(bobs["reason"])
    assert fed["C"].audit(correlation) == []


def test_request_that_already_crossed_a_kms_is_not_forwarded(fed: Fed) -> None:
    """mikey-hops says this request came through a KMS already: B does not forward it."""
    ini, grant = grant_from(fed, "A", ALICE, (BOB,))
    correlation = cid()
    ti, _ = ini.transfer_init(grant, time.time(), BOB, SESSIONS)
    wire, _ = fed.responder(BOB, "B").receive_transfer_init(ti, time.time())
    stub = fed.client("B")._stub
    with pytest.raises(grpc.RpcError) as info:
        stub.ResolveTicket(
            rpc.MikeyMessage(data=wire),
            metadata=(("x-correlation-id", correlation), ("mikey-hops", "1")),
            timeout=5,
        )
    err: Any = info.value
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    (b_rec,) = fed["B"].audit(correlation)
    assert b_rec["reason"] == "hop limit" and b_rec["hops"] == 1
    assert fed["A"].audit(correlation) == []


def test_issuer_down_is_unavailable_within_the_deadline(fed: Fed) -> None:
    ini, grant = grant_from(fed, "A", ALICE, (BOB,))
    fed["A"].stop()
    try:
        refused, correlation, elapsed = resolve_refused(fed, ini, grant, BOB, "B")
    finally:
        fed["A"].start()
    assert refused.code is grpc.StatusCode.UNAVAILABLE
    assert refused.detail == "issuing KMS unavailable"
    assert error_no(refused) == ErrorNo.UNSPECIFIED
    assert elapsed < DEADLINE_B_TO_A_MS / 1000 + 0.5
    (b_rec,) = fed["B"].audit(correlation)
    assert str(b_rec["reason"]).startswith("peer unavailable")
    # A is back: the next federated resolve works again (B's channel reconnects quickly).
    ini, grant = grant_from(fed, "A", ALICE, (BOB,))
    call = run_call(fed.client("A"), ini, fed.client("B"), fed.responder(BOB, "B"),
                    grant=grant, sessions=SESSIONS)  # fmt: skip
    check_srtp(call.initiator.srtp[0], call.responder.srtp[0])


def test_revoked_ticket_is_refused_by_the_issuer_for_a_peer_kms(fed: Fed) -> None:
    """A revokes one of its tickets: B (resolving it for its Responder, RFC 6043 9) is
    refused by A, and B's Responder gets the issuer's refusal (Invalid ticket)."""
    ini, grant = grant_from(fed, "A", ALICE, (BOB2,), DEFAULT_FLAGS | TpFlag.J)
    call = run_call(fed.client("A"), ini, fed.client("B"), fed.responder(BOB2, "B"),
                    grant=grant, sessions=SESSIONS)  # fmt: skip
    check_srtp(call.initiator.srtp[0], call.responder.srtp[0])
    tid = ticket_id(grant.ticket.ticket_data)
    run_kms(fed["A"].home, "revoke", "ticket", tid, "--reason", "leaked")

    refused, correlation, _ = resolve_refused(fed, ini, grant, BOB2, "B")
    assert refused.code is grpc.StatusCode.PERMISSION_DENIED
    assert error_no(refused) == ErrorNo.INVALID_TICKET
    (a_rec,) = fed["A"].audit(correlation)
    assert a_rec["method"] == "peer" and a_rec["peer"] == "kms:b.example"
    assert a_rec["reason"] == "ticket revoked (by id)" and a_rec["ticket_id"] == tid
