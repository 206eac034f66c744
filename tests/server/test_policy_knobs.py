"""The operator's policy knobs that limit whom tickets are for: responders must be registered
(`[policy] responders = "registered"`), and authorised applications (`kms app`)."""

from __future__ import annotations

from dataclasses import replace

from kms.endpoint.initiator import DesiredPolicy
from kms.mikey.constants import ErrorNo, IdRole
from kms.mikey.ticket import Idr, TpFlag
from kms.server.compose import kms_policy
from kms.server.config import parse_config
from tests.server.world import ALICE, BOB, TEAM, World

STRANGER = b"sip:stranger@elsewhere.example"


def _restrict_responders(world: World) -> None:
    deps = world.kms.deps  # type: ignore[attr-defined]
    deps.policy = replace(deps.policy, responders_must_be_known=True)


def _idrs(grant_policy: object, role: IdRole) -> list[bytes]:
    return [p.data for p in grant_policy.payloads if isinstance(p, Idr) and p.role == role]  # type: ignore[attr-defined]


def test_registered_responders_only(world: World) -> None:
    _restrict_responders(world)
    # A stranger is dropped from the responders (flag K), registered ones and groups stay.
    grant = world.grant(DesiredPolicy(responders=(BOB, STRANGER, TEAM)))
    assert _idrs(grant.policy, IdRole.IDRR) == [BOB, TEAM]
    assert grant.policy.flags & TpFlag.K
    # Only strangers: refused with Invalid ID.
    wire, _ = world.initiator(ALICE).request_ticket(
        DesiredPolicy(responders=(STRANGER,)), world.now
    )
    reply = world.request(ALICE, wire)
    assert not reply.ok
    assert reply.audit["error_no"] == ErrorNo.INVALID_ID


def test_any_responder_by_default(world: World) -> None:
    grant = world.grant(DesiredPolicy(responders=(STRANGER,)))
    assert _idrs(grant.policy, IdRole.IDRR) == [STRANGER]


def test_authorised_applications(world: World) -> None:
    # None registered: any IDRapp is kept.
    grant = world.grant(DesiredPolicy(responders=(BOB,), applications=(b"urn:app:x",)))
    assert _idrs(grant.policy, IdRole.IDRAPP) == [b"urn:app:x"]
    world.home.registry.add_application(b"urn:app:voice")
    grant = world.grant(
        DesiredPolicy(responders=(BOB,), applications=(b"urn:app:voice", b"urn:app:x"))
    )
    assert _idrs(grant.policy, IdRole.IDRAPP) == [b"urn:app:voice"]
    assert grant.policy.flags & TpFlag.K
    wire, _ = world.initiator(ALICE).request_ticket(
        DesiredPolicy(responders=(BOB,), applications=(b"urn:app:x",)), world.now
    )
    reply = world.request(ALICE, wire)
    assert reply.audit["error_no"] == ErrorNo.INVALID_ID


def test_config_knob_reaches_the_core(world: World) -> None:
    text = (world.home.path / "kms.toml").read_text()
    assert 'responders = "any"' in text
    cfg = parse_config(
        text.replace('responders = "any"', 'responders = "registered"'), world.home.path
    )
    assert kms_policy(cfg).responders_must_be_known
    assert not kms_policy(parse_config(text, world.home.path)).responders_must_be_known
