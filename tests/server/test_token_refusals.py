"""Refusals that need the token itself: the KMS answers UNAVAILABLE while its token is gone
and recovers by itself when it comes back (the refusal checks of tests/core/test_refusals.py,
on the composed KMS of tests/server/world.py)."""

from __future__ import annotations

import shutil
import time

from hsm.pkcs11 import RECONNECT_INTERVAL
from kms.core.api import Outcome
from kms.endpoint.initiator import DesiredPolicy
from kms.mikey.constants import ErrorNo
from tests.core.test_refusals import (
    csb_of,
    expect_refusal,
    key_material,
    resolve_init,
    serves,
)
from tests.server.world import ALICE, BOB, World


def test_token_unavailable_then_recovered(world: World) -> None:
    grant = world.grant(DesiredPolicy(responders=(BOB,)))  # the token is in use
    tokens = world.home.path / "token" / "tokens"
    away = world.home.path / "tokens-away"
    desired = DesiredPolicy(responders=(BOB,))
    shutil.move(tokens, away)
    try:
        wire, _ = world.initiator().request_ticket(desired, world.now)
        expect_refusal(
            world,
            lambda: world.request(ALICE, wire),
            Outcome.UNAVAILABLE,
            ErrorNo.UNSPECIFIED,
            csb_id=csb_of(wire),
            reason="token unavailable",
            secrets=key_material([grant]),
        )
        ri = resolve_init(world, grant, BOB)
        expect_refusal(
            world,
            lambda: world.resolve(ri),
            Outcome.UNAVAILABLE,
            ErrorNo.UNSPECIFIED,
            csb_id=csb_of(ri),
            reason="token unavailable",
            secrets=key_material([grant]),
        )
    finally:
        shutil.move(away, tokens)
    # Recovers by itself (reconnects at most once per RECONNECT_INTERVAL).
    deadline = time.monotonic() + 20 * RECONNECT_INTERVAL
    while True:
        wire, _ = world.initiator().request_ticket(desired, world.now)
        reply = world.request(ALICE, wire)
        if reply.ok:
            break
        assert reply.outcome is Outcome.UNAVAILABLE, reply.audit
        assert time.monotonic() < deadline, "KMS did not recover after the token came back"
        time.sleep(RECONNECT_INTERVAL / 5)
    # The RESOLVE_INIT refused while the token was away was not remembered either.
    assert world.resolve(ri).ok
    serves(world)
