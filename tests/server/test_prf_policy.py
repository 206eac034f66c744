"""``[policy] prf`` reaches the core: with "hmac-sha-256" the KMS accepts only
PRF-HMAC-SHA-256 in message headers (else Invalid PRF) and grants it in every ticket policy
(a desired MIKEY-1 TP is changed, flag K); the default "hmac-sha-1" accepts both."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kms.core.api import Outcome
from kms.endpoint.initiator import DesiredPolicy, Initiator
from kms.endpoint.responder import Responder
from kms.endpoint.session import CryptoSession
from kms.home import open_home
from kms.mikey.constants import DataType, ErrorNo, PrfFunc
from kms.mikey.message import Message
from kms.mikey.payloads import Error
from kms.mikey.protect import suite_for
from kms.mikey.ticket import TpFlag
from kms.server.compose import build_handler
from kms.server.config import CONFIG_FILE
from tests.server.world import ALICE, BOB, World, make_world

SHA256 = suite_for(PrfFunc.PRF_HMAC_SHA_256)


@pytest.fixture
def strict(tmp_path: Path) -> Iterator[World]:
    """A KMS whose kms.toml says prf = "hmac-sha-256", built by the composition root."""
    for world in make_world(tmp_path / "home"):
        toml = world.home.path / CONFIG_FILE
        text = toml.read_text()
        assert 'prf = "hmac-sha-1"' in text
        toml.write_text(text.replace('prf = "hmac-sha-1"', 'prf = "hmac-sha-256"'))
        home = open_home(world.home.path)
        try:
            yield World(home, build_handler(home), world.now)
        finally:
            home.close()


def _refused_invalid_prf(world: World, wire: bytes, resolve: bool = False) -> None:
    reply = world.resolve(wire) if resolve else world.request(ALICE, wire)
    assert reply.outcome is Outcome.DENIED
    assert reply.error_message is not None
    err = Message.decode(reply.error_message)
    assert err.data_type == DataType.ERROR
    assert err.one(Error).error_no == ErrorNo.INVALID_PRF
    record = world.audit()[-1]
    assert (record["event"], record["error_no"]) == ("refused", ErrorNo.INVALID_PRF)


def test_mikey_1_header_is_refused(strict: World) -> None:
    wire, _ = strict.initiator().request_ticket(DesiredPolicy((BOB,), lifetime_s=600), strict.now)
    _refused_invalid_prf(strict, wire)


def test_mikey_1_ticket_policy_is_changed_to_sha_256(strict: World) -> None:
    ini = Initiator(strict.creds(ALICE), strict.sw, SHA256)
    wire, pending = ini.request_ticket(
        DesiredPolicy((BOB,), lifetime_s=600, prf_func=PrfFunc.MIKEY_1), strict.now
    )
    reply = strict.request(ALICE, wire)
    assert reply.ok, reply.audit
    grant = ini.accept_ticket(pending, reply.data, strict.now)
    assert grant.policy.prf_func == PrfFunc.PRF_HMAC_SHA_256
    assert grant.policy.flags & TpFlag.K
    assert len(grant.session_keys[0].key) == 32  # RFC 6043 12.1: 256-bit keys go with it
    # Resolving: a MIKEY-1 RESOLVE_INIT is refused, a SHA-256 one resolves.
    ti, _ = ini.transfer_init(grant, strict.now, BOB, (CryptoSession(1, 0x11223344),))
    ri, _ = Responder(strict.creds(BOB), strict.sw).receive_transfer_init(ti, strict.now)
    _refused_invalid_prf(strict, ri, resolve=True)
    ri, _ = Responder(strict.creds(BOB), strict.sw, SHA256).receive_transfer_init(ti, strict.now)
    assert strict.resolve(ri).ok


def test_sha_256_request_keeps_k_0(strict: World) -> None:
    ini = Initiator(strict.creds(ALICE), strict.sw, SHA256)
    desired = DesiredPolicy((BOB,), lifetime_s=600, prf_func=PrfFunc.PRF_HMAC_SHA_256)
    wire, pending = ini.request_ticket(desired, strict.now)
    reply = strict.request(ALICE, wire)
    assert reply.ok, reply.audit
    assert not ini.accept_ticket(pending, reply.data, strict.now).policy.flags & TpFlag.K


def test_default_accepts_both(world: World) -> None:
    grant = world.grant(DesiredPolicy((BOB,), lifetime_s=600))
    assert grant.policy.prf_func == PrfFunc.MIKEY_1 and not grant.policy.flags & TpFlag.K
    ini = Initiator(world.creds(ALICE), world.sw, SHA256)
    wire, _ = ini.request_ticket(DesiredPolicy((BOB,), lifetime_s=600), world.now)
    assert world.request(ALICE, wire).ok
