"""Every refusal status over real gRPC, each with its MIKEY error message in the trailing
metadata ``mikey-error-bin`` (RFC 6043 5.4): decoded with the MIKEY codec, ERR checked."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import replace

import grpc
import pytest

from kms.endpoint.client import KmsClient, KmsRefused, obtain_ticket, resolve
from kms.endpoint.initiator import DesiredPolicy
from kms.endpoint.session import CryptoSession
from kms.mikey.constants import DataType, ErrorNo
from kms.mikey.message import Message
from kms.mikey.payloads import Error, Verification
from tests.e2e.harness import (
    ALICE,
    BOB,
    CAROL,
    ERIN,
    FRANK,
    GRACE,
    MALLORY,
    PSKS,
    Kms,
    make_home,
    running_kms,
    set_policy,
)


def refused(call: object, *args: object) -> KmsRefused:
    with pytest.raises(KmsRefused) as info:
        call(*args)  # type: ignore[operator]
    return info.value


def error_of(r: KmsRefused) -> Message:
    """The MIKEY error message of a refusal: HDR (ERROR), T, ERR, [V]."""
    assert r.error_message is not None, f"no mikey-error-bin with {r}"
    msg = Message.decode(r.error_message)
    assert msg.data_type == DataType.ERROR
    assert msg.one(Error).error_no == r.error_no
    return msg


def test_garbage_and_wrong_type_are_invalid_argument(kms: Kms) -> None:
    c = kms.client()
    for call in (c.request_ticket, c.resolve_ticket):
        r = refused(call, b"\x01\x02 definitely not MIKEY")
        assert r.code is grpc.StatusCode.INVALID_ARGUMENT
        assert r.detail == "malformed MIKEY message"
        assert error_of(r).one(Error).error_no == ErrorNo.UNSPECIFIED
    # A well-formed MIKEY message of the wrong type: a REQUEST_INIT sent to ResolveTicket.
    wire, _ = kms.initiator(ALICE).request_ticket(DesiredPolicy(responders=(BOB,)), time.time())
    r = refused(c.resolve_ticket, wire)
    assert r.code is grpc.StatusCode.INVALID_ARGUMENT
    assert r.error_no == ErrorNo.INVALID_DT
    # The error answers the request's CSB ID.
    assert error_of(r).header.csb_id == Message.decode(wire).header.csb_id


def test_bad_mac_and_unknown_identity_are_unauthenticated(kms: Kms) -> None:
    c = kms.client()
    wire, _ = kms.initiator(ALICE).request_ticket(DesiredPolicy(responders=(BOB,)), time.time())
    bad = bytearray(wire)
    bad[-1] ^= 0x01  # the last byte of the V payload's MAC
    r = refused(c.request_ticket, bytes(bad))
    assert r.code is grpc.StatusCode.UNAUTHENTICATED
    assert r.error_no == ErrorNo.AUTH_FAILURE
    # Unauthenticated: the error message carries no V (nothing to key it with).
    assert error_of(r).first(Verification) is None

    stranger = kms.initiator(ALICE)
    stranger.creds = kms.creds(ALICE, psk=bytes(16))  # Alice's identity, a wrong PSK
    r = refused(obtain_ticket, c, stranger, DesiredPolicy(responders=(BOB,)))
    assert r.code is grpc.StatusCode.UNAUTHENTICATED and r.error_no == ErrorNo.AUTH_FAILURE

    # A resolve whose MAC is broken.
    grant = kms.grant(DesiredPolicy(responders=(BOB,)), who=FRANK)
    ti, _ = kms.initiator(FRANK).transfer_init(grant, time.time(), BOB, [CryptoSession(1, 5)])
    ri, _ = kms.responder(BOB).receive_transfer_init(ti, time.time())
    bad = bytearray(ri)
    bad[-1] ^= 0x80
    r = refused(c.resolve_ticket, bytes(bad))
    assert r.code is grpc.StatusCode.UNAUTHENTICATED and r.error_no == ErrorNo.AUTH_FAILURE


def test_unauthorised_responder_is_permission_denied(kms: Kms) -> None:
    grant = kms.grant(DesiredPolicy(responders=(BOB,)), who=ERIN)
    ti, _ = kms.initiator(ERIN).transfer_init(grant, time.time(), BOB, [CryptoSession(1, 6)])
    for who in (MALLORY, CAROL):
        r = refused(resolve, kms.client(), kms.responder(who), ti)
        assert r.code is grpc.StatusCode.PERMISSION_DENIED
        err = error_of(r)
        assert r.error_no == ErrorNo.INVALID_ID
        # The resolver was authenticated: the error message is MAC-protected (V).
        assert err.first(Verification) is not None
    # Asking a ticket from another KMS (IDRkms) is a policy refusal too.
    other = kms.initiator(ALICE)
    other.creds = replace(other.creds, kms_id=b"kms:elsewhere.example.org")
    r = refused(obtain_ticket, kms.client(), other, DesiredPolicy(responders=(BOB,)))
    assert r.code is grpc.StatusCode.PERMISSION_DENIED and r.error_no == ErrorNo.INVALID_ID


def test_replay_stale_timestamp_and_reused_ticket_are_failed_precondition(kms: Kms) -> None:
    c = kms.client()
    ini = kms.initiator(GRACE)
    wire, pending = ini.request_ticket(DesiredPolicy(responders=(BOB,)), time.time())
    ini.accept_ticket(pending, c.request_ticket(wire), time.time())
    r = refused(c.request_ticket, wire)  # the same REQUEST_INIT again
    assert r.code is grpc.StatusCode.FAILED_PRECONDITION
    assert r.detail == "replayed message" and r.error_no == ErrorNo.INVALID_TS
    assert error_of(r).first(Verification) is not None

    stale, _ = ini.request_ticket(DesiredPolicy(responders=(BOB,)), time.time() - 1000)
    r = refused(c.request_ticket, stale)
    assert r.code is grpc.StatusCode.FAILED_PRECONDITION and r.error_no == ErrorNo.INVALID_TS
    error_of(r)
    future, _ = ini.request_ticket(DesiredPolicy(responders=(BOB,)), time.time() + 1000)
    r = refused(c.request_ticket, future)
    assert r.code is grpc.StatusCode.FAILED_PRECONDITION and r.error_no == ErrorNo.INVALID_TS

    # A single-use ticket resolved a second time (new TRANSFER_INIT, new RESOLVE_INIT).
    grant = kms.grant(DesiredPolicy(responders=(BOB,)), who=GRACE)
    for attempt in range(2):
        ti, _ = ini.transfer_init(grant, time.time(), BOB, [CryptoSession(1, 9)])
        if attempt == 0:
            resolve(c, kms.responder(BOB), ti)
        else:
            r = refused(resolve, c, kms.responder(BOB), ti)
    assert r.code is grpc.StatusCode.FAILED_PRECONDITION
    assert r.detail == "ticket already resolved (reuse not allowed)"
    assert r.error_no == ErrorNo.UNSPECIFIED  # the core's choice: RFC 6043 names none
    error_of(r)


# ------------------------------------------------------------------------------------------
# a second server: a low rate limit, and a token that goes away


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kms]:
    who = (ALICE, BOB, CAROL, ERIN)
    home = make_home(tmp_path_factory.mktemp("e2e-limited") / "home", {w: PSKS[w] for w in who}, {})
    set_policy(home, rate_limit_per_s=1)  # bursts of 2 per identity
    with running_kms(home) as k:
        yield k


def test_rate_limit_is_resource_exhausted(limited: Kms) -> None:
    c = limited.client()
    ini = limited.initiator(ALICE)
    codes = []
    for _ in range(5):
        try:
            obtain_ticket(c, ini, DesiredPolicy(responders=(BOB,)))
            codes.append(grpc.StatusCode.OK)
        except KmsRefused as exc:
            codes.append(exc.code)
            last = exc
    assert codes[:2] == [grpc.StatusCode.OK] * 2
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes[2:]
    assert last.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert last.detail == "rate limit exceeded" and last.error_no == ErrorNo.UNSPECIFIED
    error_of(last)
    # Per identity: Erin is not limited by Alice's rate.
    obtain_ticket(c, limited.initiator(ERIN), DesiredPolicy(responders=(BOB,)))


def test_token_gone_is_unavailable_then_recovers(limited: Kms) -> None:
    tokens = limited.home / "token" / "tokens"
    away = limited.home.parent / "tokens-moved-away"
    c = limited.client(timeout=5)
    ini = limited.initiator(BOB)
    obtain_ticket(c, ini, DesiredPolicy(responders=(CAROL,)))
    shutil.move(tokens, away)
    try:
        r = refused(obtain_ticket, c, ini, DesiredPolicy(responders=(CAROL,)))
        assert r.code is grpc.StatusCode.UNAVAILABLE, r
        assert r.detail == "token unavailable" and r.error_no == ErrorNo.UNSPECIFIED
        error_of(r)
        # The server keeps serving (and refusing) while the token is gone.
        time.sleep(0.6)
        r = refused(obtain_ticket, c, ini, DesiredPolicy(responders=(CAROL,)))
        assert r.code is grpc.StatusCode.UNAVAILABLE
    finally:
        shutil.move(away, tokens)
    deadline = time.monotonic() + 15
    meanwhile: set[grpc.StatusCode] = set()
    grant = None
    while grant is None and time.monotonic() < deadline:
        try:
            grant = obtain_ticket(c, ini, DesiredPolicy(responders=(CAROL,)))
        except KmsRefused as exc:
            meanwhile.add(exc.code)
            time.sleep(0.2)
    assert grant is not None, "the KMS did not recover its token"
    assert meanwhile <= {grpc.StatusCode.UNAVAILABLE}
    call_ti, _ = ini.transfer_init(grant, time.time(), CAROL, [CryptoSession(1, 1)])
    resolve(KmsClient(limited.target), limited.responder(CAROL), call_ti)
