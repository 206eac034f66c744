"""How long a ticket this KMS resolves can be valid, which bounds how long a ticket
revocation must be kept: Initiator-made tickets (RFC 6043 4.1.1 mode 3, D = 0) are held at
resolve to the window grant_policy gives KMS-made ones (TRe <= T + 2 x max_lifetime_s)."""

from __future__ import annotations

import dataclasses

import pytest

from kms.core.errors import Refusal
from kms.core.policy import KmsPolicy, initiator_ticket_window
from kms.core.revocation import ticket_revocation_horizon
from kms.endpoint.common import now_timestamp
from kms.endpoint.initiator import DesiredPolicy
from kms.endpoint.modes import build_ticket
from kms.endpoint.session import CryptoSession
from kms.mikey.constants import ErrorNo, TsRole
from kms.mikey.ticket import Tr
from tests.core.world import ALICE, BOB, KMS_ID, PSKS, World

SESSIONS = (CryptoSession(1, 0x4400),)
DAY = 86400


def resolve_mode3(world: World, made_at: float, lifetime_s: int) -> dict[str, object]:
    ini = world.initiator(ALICE)
    grant = build_ticket(ini, PSKS[ALICE], ALICE, DesiredPolicy(responders=(BOB,)), made_at,
                         lifetime_s)  # fmt: skip
    ti, _ = ini.transfer_init(grant, world.now, BOB, SESSIONS)
    ri, _ = world.responder(BOB).receive_transfer_init(ti, world.now)
    reply = world.resolve(ri)
    return {"ok": reply.ok, **reply.audit}


def test_mode_3_validity_longer_than_the_policy_allows_is_refused(world: World) -> None:
    assert resolve_mode3(world, world.now, DAY)["ok"]  # exactly max_lifetime_s: fine
    got = resolve_mode3(world, world.now, DAY + 5)
    assert not got["ok"]
    assert got["error_no"] == ErrorNo.INVALID_TPPAR
    assert got["reason"] == "validity longer than max_lifetime_s"


def test_mode_3_ticket_made_in_the_future_is_refused(world: World) -> None:
    got = resolve_mode3(world, world.now + 3600, 60)
    assert (got["ok"], got["error_no"], got["reason"]) == (
        False, ErrorNo.INVALID_TS, "ticket made in the future"
    )
    # Within the timestamp window (clock skew) it is fine, as for messages.
    assert resolve_mode3(world, world.now + 60, 600)["ok"]


def test_mode_3_ticket_without_tre_is_refused(world: World) -> None:
    """No TRe would mean valid for ever: no revocation could ever be pruned."""
    ini = world.initiator(ALICE)
    grant = build_ticket(ini, PSKS[ALICE], ALICE, DesiredPolicy(responders=(BOB,)), world.now)
    kept = tuple(p for p in grant.policy.payloads
                 if not (isinstance(p, Tr) and p.role == TsRole.TRE))  # fmt: skip
    policy = dataclasses.replace(grant.policy, payloads=kept)
    with pytest.raises(Refusal) as info:
        initiator_ticket_window(policy, now_timestamp(world.now), KmsPolicy(KMS_ID), world.now)
    assert info.value.error_no == ErrorNo.INVALID_TPPAR
    assert info.value.reason == "an Initiator-made ticket must carry TRe"


def test_horizon_covers_the_longest_ticket_the_kms_grants() -> None:
    """TRs may start max_lifetime_s after issue and last max_lifetime_s more (grant_policy);
    plus the clock-skew window and the whole-second rounding."""
    assert ticket_revocation_horizon(DAY, 120) == 2 * DAY + 121
    p = KmsPolicy(KMS_ID)
    assert ticket_revocation_horizon(p.max_lifetime_s, p.timestamp_window_s) > 2 * DAY
