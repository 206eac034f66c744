"""Attacks on a running `kms serve`, each reproduced from outside as an attacker would try
it, and named after the attack (the regression tests of the hardening pass)."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from kms.endpoint.client import KmsClient, KmsRefused
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DesiredPolicy, Initiator
from kms.mikey.constants import DataType, IdType
from kms.mikey.message import Message
from kms.mikey.payloads import Error, Verification
from kms.server.home import open_home
from tests.e2e.harness import BOB, CAROL, KMS_ID, Kms

UNKNOWN = b"sip:nobody@example.org"


def answer(client: KmsClient, wire: bytes) -> tuple[grpc.StatusCode, str, int, bool]:
    """(status, detail, MIKEY error number, whether the error message carries a V)."""
    with pytest.raises(KmsRefused) as info:
        client.request_ticket(wire)
    r = info.value
    assert r.error_message is not None
    err = Message.decode(r.error_message)
    assert err.data_type == DataType.ERROR
    return r.code, r.detail, err.one(Error).error_no, err.first(Verification) is not None


def forged(kms: Kms, who: bytes, sent: float) -> bytes:
    """A REQUEST_INIT_PSK from ``who`` with timestamp ``sent`` and a MAC that cannot verify
    (the attacker does not know the PSK: a random one)."""
    ini = Initiator(Credentials(who, bytes(range(16)), KMS_ID, IdType.URI), kms.ks)
    wire, _ = ini.request_ticket(DesiredPolicy(responders=(BOB,)), sent)
    return wire


def test_attack_registration_oracle(kms: Kms) -> None:
    """A forged REQUEST_INIT gets the same answer for a registered and an unknown identity,
    whatever its timestamp: the timestamp is only judged after the MAC has verified."""
    c = kms.client()
    now = time.time()
    for sent in (now - 1000, now + 1000, now):
        registered = answer(c, forged(kms, CAROL, sent))
        unknown = answer(c, forged(kms, UNKNOWN, sent))
        assert registered == unknown, (sent - now, registered, unknown)
        assert registered == (grpc.StatusCode.UNAUTHENTICATED, "authentication failed", 0, False)
    # The audit log keeps the real reasons apart (the operator may know).
    reasons = [
        json.loads(line).get("reason") for line in (kms.home / "audit.log").read_text().splitlines()
    ]
    assert "unknown identity" in reasons and "MAC verification failed" in reasons


def test_registration_oracle_keeps_timestamp_check_after_mac(kms: Kms) -> None:
    """With the right key, a stale message is still refused as Invalid TS (after the MAC)."""
    c = kms.client()
    stale, _ = kms.initiator(CAROL).request_ticket(
        DesiredPolicy(responders=(BOB,)), time.time() - 1000
    )
    code, _detail, error_no, has_v = answer(c, stale)
    assert (code, error_no, has_v) == (grpc.StatusCode.FAILED_PRECONDITION, 1, True)


def test_dummy_key_is_in_the_token_and_not_an_endpoint(kms: Kms) -> None:
    with open_home(kms.home) as h:
        labels = {k.label for k in h.keystore().list_keys()}
        assert "authn/dummy" in labels
        assert h.registry.find_endpoint(b"authn/dummy") is None
