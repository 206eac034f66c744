"""Operator commands while `kms serve` runs: a new endpoint, added by another process,
requests and resolves at once (its PSK is found by one rate-limited token rescan); a removed
group member is refused at once."""

from __future__ import annotations

import time

import pytest

from kms.endpoint.client import KmsRefused, obtain_ticket, resolve
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DesiredPolicy, Initiator
from kms.endpoint.responder import Responder
from kms.endpoint.session import CryptoSession
from tests.e2e.harness import ALICE, BOB, CAROL, KMS_ID, TEAM, Kms, run_kms

HEIDI = b"sip:heidi@example.org"
HEIDI_PSK = bytes.fromhex("4e" * 16)


def test_endpoint_added_while_serving_works_without_a_restart(kms: Kms) -> None:
    run_kms(kms.home, "endpoint", "add", HEIDI.decode(), "--psk-hex", HEIDI_PSK.hex())
    heidi = Credentials(HEIDI, HEIDI_PSK, KMS_ID)
    # Heidi as Initiator (her PSK protects the request) ...
    grant = obtain_ticket(kms.client(), Initiator(heidi, kms.ks), DesiredPolicy(responders=(BOB,)))
    assert grant.policy.payloads
    # ... and as Responder of Alice's ticket.
    ini = kms.initiator(ALICE)
    g2 = obtain_ticket(kms.client(), ini, DesiredPolicy(responders=(HEIDI,)))
    ti, pending = ini.transfer_init(g2, time.time(), HEIDI, (CryptoSession(1, 77),))
    call = resolve(kms.client(), Responder(heidi, kms.ks), ti)
    alice = ini.establish(pending, call.transfer_resp, time.time())
    assert alice.srtp[0].key_and_salt == call.srtp[0].key_and_salt


def test_group_member_removed_while_serving_is_refused_at_once(kms: Kms) -> None:
    ini = kms.initiator(ALICE)
    grant = obtain_ticket(kms.client(), ini, DesiredPolicy(responders=(TEAM,)))
    run_kms(kms.home, "group", "remove", TEAM.decode(), CAROL.decode())
    try:
        ti, _ = ini.transfer_init(grant, time.time(), TEAM, (CryptoSession(1, 78),))
        with pytest.raises(KmsRefused) as info:
            resolve(kms.client(), kms.responder(CAROL), ti)
        assert info.value.code.name == "PERMISSION_DENIED"
        # Bob, still a member, resolves the same ticket.
        ti2, _ = ini.transfer_init(grant, time.time(), TEAM, (CryptoSession(1, 79),))
        assert resolve(kms.client(), kms.responder(BOB), ti2).transfer_resp is not None
    finally:
        run_kms(kms.home, "group", "add", TEAM.decode(), CAROL.decode())
