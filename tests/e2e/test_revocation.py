"""Revocation that takes effect at once, end to end: `kms revoke` against a running
`kms serve` (the operator's commands while calls go on), real gRPC, real SRTP afterwards."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import grpc
import pytest

from kms.endpoint.client import KmsRefused, obtain_ticket, resolve
from kms.endpoint.initiator import DEFAULT_FLAGS, DesiredPolicy, TicketGrant
from kms.endpoint.session import CryptoSession
from kms.mikey.base_ticket import ticket_id
from kms.mikey.constants import ErrorNo
from kms.mikey.ticket import TpFlag
from tests.e2e.harness import (
    ALICE,
    BOB,
    CAROL,
    ERIN,
    FRANK,
    GRACE,
    MALLORY,
    Kms,
    check_srtp,
    make_home,
    run_kms,
    running_kms,
)

SESSIONS = (CryptoSession(1, 0x5E550001),)
REUSABLE = DEFAULT_FLAGS | TpFlag.J


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kms]:
    home = make_home(tmp_path_factory.mktemp("revoke") / "home")
    with running_kms(home) as k:
        yield k


def call(kms: Kms, grant: TicketGrant, initiator: bytes, responder: bytes) -> None:
    """Transfer ``grant`` to ``responder``, resolve at the KMS, and run real SRTP."""
    ini = kms.initiator(initiator)
    ti, pending = ini.transfer_init(grant, time.time(), responder, SESSIONS)
    got = resolve(kms.client(), kms.responder(responder), ti)
    assert got.transfer_resp is not None
    ends = ini.establish(pending, got.transfer_resp, time.time())
    check_srtp(ends.srtp[0], got.srtp[0])


def refused(kms: Kms, grant: TicketGrant, initiator: bytes, responder: bytes) -> KmsRefused:
    ini = kms.initiator(initiator)
    ti, _ = ini.transfer_init(grant, time.time(), responder, SESSIONS)
    with pytest.raises(KmsRefused) as info:
        resolve(kms.client(), kms.responder(responder), ti)
    return info.value


def audit(kms: Kms) -> list[dict[str, object]]:
    lines = (kms.home / "audit.log").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_suspend_refuses_both_roles_and_its_tickets_until_resumed(kms: Kms) -> None:
    before = obtain_ticket(kms.client(), kms.initiator(ALICE),
                           DesiredPolicy(responders=(BOB,), flags=REUSABLE))  # fmt: skip
    call(kms, before, ALICE, BOB)
    to_alice = obtain_ticket(kms.client(), kms.initiator(CAROL),
                             DesiredPolicy(responders=(ALICE,)))  # fmt: skip

    out = run_kms(kms.home, "revoke", "suspend", ALICE.decode(), "--reason", "lost phone")
    assert "suspended endpoint sip:alice@example.org" in out.stdout

    # As Initiator: refused at once, Invalid ID.
    with pytest.raises(KmsRefused) as info:
        obtain_ticket(kms.client(), kms.initiator(ALICE), DesiredPolicy(responders=(BOB,)))
    assert info.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert info.value.error_no == ErrorNo.INVALID_ID
    # As Responder: refused, Invalid ID.
    r = refused(kms, to_alice, CAROL, ALICE)
    assert (r.code, r.error_no) == (grpc.StatusCode.PERMISSION_DENIED, ErrorNo.INVALID_ID)
    # A ticket Alice obtained before: no longer resolves, for anyone (Invalid ticket).
    r = refused(kms, before, ALICE, BOB)
    assert (r.code, r.error_no) == (grpc.StatusCode.PERMISSION_DENIED, ErrorNo.INVALID_TICKET)

    listed = json.loads(run_kms(kms.home, "revoke", "list", "--json").stdout)
    assert {"kind": "suspended", "subject": ALICE.decode(), "reason": "lost phone"}.items() <= (
        listed[0].items()
    )

    run_kms(kms.home, "revoke", "resume", ALICE.decode())
    call(kms, before, ALICE, BOB)  # the same reusable ticket works again
    call(kms, to_alice, CAROL, ALICE)
    assert run_kms(kms.home, "revoke", "resume", ALICE.decode(), check=False).returncode == 1

    records = audit(kms)
    events = [r.get("event") for r in records]
    assert "revocation.suspend" in events and "revocation.resume" in events
    reasons = [r.get("reason") for r in records if r.get("event") == "refused"]
    assert "identity suspended (revocation)" in reasons
    assert "ticket revoked (initiator suspended)" in reasons


def test_revoke_one_ticket_by_id(kms: Kms) -> None:
    leaked = obtain_ticket(kms.client(), kms.initiator(ERIN),
                           DesiredPolicy(responders=(FRANK, GRACE), flags=REUSABLE))  # fmt: skip
    other = obtain_ticket(kms.client(), kms.initiator(ERIN),
                          DesiredPolicy(responders=(FRANK,), flags=REUSABLE))  # fmt: skip
    call(kms, leaked, ERIN, FRANK)
    tid = ticket_id(leaked.ticket.ticket_data)
    out = run_kms(kms.home, "revoke", "ticket", tid, "--reason", "leaked")
    assert f"revoked ticket {tid}" in out.stdout

    for responder in (FRANK, GRACE):  # every responder of that ticket, at once
        r = refused(kms, leaked, ERIN, responder)
        assert r.error_no == ErrorNo.INVALID_TICKET
    call(kms, other, ERIN, FRANK)  # Erin's other ticket and Erin herself are unaffected
    assert any(
        r.get("event") == "revocation.ticket" and r.get("ticket_id") == tid for r in audit(kms)
    )
    refusals = [r for r in audit(kms) if r.get("reason") == "ticket revoked (by id)"]
    assert refusals and all(r["ticket_id"] == tid for r in refusals)
    bad = run_kms(kms.home, "revoke", "ticket", "not-hex", check=False)
    assert bad.returncode == 1 and "32 hex digits" in bad.stderr


def test_revoke_every_ticket_requested_before_a_time(kms: Kms) -> None:
    old = obtain_ticket(kms.client(), kms.initiator(CAROL),
                        DesiredPolicy(responders=(MALLORY,), flags=REUSABLE))  # fmt: skip
    out = run_kms(kms.home, "revoke", "requested-before", CAROL.decode())
    assert "revoked every ticket sip:carol@example.org requested before" in out.stdout
    cutoff = next(
        r["before"] for r in audit(kms) if r.get("event") == "revocation.requested_before"
    )
    assert isinstance(cutoff, int)
    r = refused(kms, old, CAROL, MALLORY)
    assert r.error_no == ErrorNo.INVALID_TICKET
    # Carol herself is not suspended: a ticket requested after the cutoff works.
    while time.time() < cutoff:
        time.sleep(0.05)
    new = obtain_ticket(kms.client(), kms.initiator(CAROL),
                        DesiredPolicy(responders=(MALLORY,)))  # fmt: skip
    call(kms, new, CAROL, MALLORY)
    listed = run_kms(kms.home, "revoke", "list").stdout
    assert "requested_before" in listed and CAROL.decode() in listed


def test_cli_refuses_unknown_endpoints_and_documents_itself(kms: Kms) -> None:
    p = run_kms(kms.home, "revoke", "suspend", "sip:nobody@example.org", check=False)
    assert p.returncode == 1 and "unknown endpoint" in p.stderr and "Traceback" not in p.stderr
    p = run_kms(kms.home, "revoke", "requested-before", BOB.decode(), "--before", "soon",
                check=False)  # fmt: skip
    assert p.returncode == 1 and "cannot read time" in p.stderr
    helptext = run_kms(kms.home, "revoke", "--help").stdout
    for verb in ("suspend", "resume", "ticket", "requested-before", "list"):
        assert verb in helptext


def test_revoke_list_prunes_ticket_revocations_that_can_match_nothing(kms: Kms) -> None:
    """Once every ticket it could match has expired (2 x max_lifetime_s + window), a ticket
    revocation is pruned, and `kms revoke list` never shows it."""
    import sqlite3

    from kms.store.registry import REGISTRY_FILE

    old, new = "ab" * 16, "cd" * 16
    run_kms(kms.home, "revoke", "ticket", old)
    run_kms(kms.home, "revoke", "ticket", new)
    conn = sqlite3.connect(kms.home / REGISTRY_FILE)
    with conn:  # as if revoked three days ago (max_lifetime_s is one day)
        conn.execute("UPDATE revocations SET created_at = created_at - 3 * 86400 "
                     "WHERE subject = ?", (bytes.fromhex(old),))  # fmt: skip
    conn.close()
    listed = json.loads(run_kms(kms.home, "revoke", "list", "--json").stdout)
    subjects = {e["subject"] for e in listed}
    assert new in subjects and old not in subjects
    assert "pruned" in run_kms(kms.home, "revoke", "list", "--help").stdout
