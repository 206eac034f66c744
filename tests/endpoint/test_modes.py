"""The four modes of RFC 6043 4.1.1 with the real KMS core (on the software key store)."""

from __future__ import annotations

import pytest

from kms.endpoint.initiator import DesiredPolicy
from kms.endpoint.modes import build_ticket, resolve_locally
from kms.endpoint.session import CryptoSession, EndpointError
from kms.mikey.constants import ErrorNo
from kms.mikey.ticket import TpFlag
from tests.core.world import ALICE, BOB, DAVE, PSKS, World

SESSIONS = (CryptoSession(1, 0xC0FFEE),)
FORKING = TpFlag.E | TpFlag.F | TpFlag.G | TpFlag.H | TpFlag.I | TpFlag.L


def test_mode_2_responder_resolves_with_a_tpk_it_shares_with_the_kms(world: World) -> None:
    shared = bytes.fromhex("5e" * 32)
    world.add_current_tpk(7, shared)
    grant = world.grant(DesiredPolicy(responders=(BOB,)))
    ini = world.initiator()
    ti, pt = ini.transfer_init(grant, world.now, BOB, SESSIONS)
    call = resolve_locally(
        world.responder(BOB), ti, world.now, lambda tid: shared if tid == b"tpk/7" else None
    )
    keys = ini.accept_transfer_resp(pt, call.transfer_resp or b"", world.now)
    assert keys[0].key_and_salt == call.srtp[0].key_and_salt
    assert [r["event"] for r in world.audit()] == ["ticket.issued"]  # no Ticket Resolve


@pytest.mark.parametrize("flags", [TpFlag.E | TpFlag.F | TpFlag.G | TpFlag.H, FORKING])
def test_mode_3_initiator_creates_the_ticket_and_the_kms_resolves_it(
    world: World, flags: TpFlag
) -> None:
    ini = world.initiator(ALICE)
    grant = build_ticket(
        ini, PSKS[ALICE], ALICE, DesiredPolicy(responders=(BOB,), flags=flags), world.now
    )
    assert not grant.policy.flags & TpFlag.D
    assert grant.policy.flags & TpFlag.L
    keys, call, _ = world.call(grant, BOB)
    assert keys[0].key_and_salt == call.srtp[0].key_and_salt


def test_mode_3_ticket_in_someone_elses_name_is_refused(world: World) -> None:
    # Dave builds a ticket that names Alice's key (IDRpsk = Alice) but Dave is IDRi: refused,
    # and a ticket naming Alice as creator but protected with Dave's PSK fails its MAC.
    dave = world.initiator(DAVE)
    for tpk, tpk_id in ((PSKS[DAVE], ALICE), (PSKS[DAVE], DAVE + b"x")):
        grant = build_ticket(dave, tpk, tpk_id, DesiredPolicy(responders=(BOB,)), world.now)
        ti, _ = dave.transfer_init(grant, world.now, BOB, SESSIONS)
        res = world.responder(BOB)
        ri, _ = res.receive_transfer_init(ti, world.now)
        reply = world.resolve(ri)
        assert not reply.ok
        assert reply.audit["error_no"] == ErrorNo.AUTH_FAILURE


def test_mode_4_no_kms_at_all(world: World) -> None:
    shared = bytes.fromhex("44" * 16)
    for flags in (TpFlag.E | TpFlag.F | TpFlag.G | TpFlag.H, FORKING):
        ini = world.initiator(ALICE)
        grant = build_ticket(
            ini, shared, b"alice-bob", DesiredPolicy(responders=(BOB,), flags=flags), world.now
        )
        ti, pt = ini.transfer_init(grant, world.now, BOB, SESSIONS)
        call = resolve_locally(world.responder(BOB), ti, world.now, lambda tid: shared)
        keys = ini.accept_transfer_resp(pt, call.transfer_resp or b"", world.now)
        assert keys[0].key_and_salt == call.srtp[0].key_and_salt
    # Nobody else can resolve it locally without the key, or if not named in the policy.
    with pytest.raises(EndpointError):
        resolve_locally(world.responder(BOB), ti, world.now, lambda tid: bytes(16))
    with pytest.raises(EndpointError):
        resolve_locally(world.responder(DAVE), ti, world.now, lambda tid: shared)
    assert world.audit() == []
