"""CSB updating (RFC 6043 5.2) after a real exchange through the KMS core."""

from __future__ import annotations

import pytest

from kms.endpoint.initiator import DesiredPolicy
from kms.endpoint.session import CryptoSession, EndpointError
from kms.endpoint.update import (
    accept_update,
    accept_update_resp,
    apply_own_update,
    update_init,
)
from kms.mikey.constants import KeyDataType
from kms.mikey.payloads import KeyData, KvSpi
from kms.mikey.ticket import TpFlag
from tests.core.world import BOB, TEAM, World

FORKING = TpFlag.E | TpFlag.F | TpFlag.G | TpFlag.H | TpFlag.I


@pytest.mark.parametrize(("responder", "flags"), [(BOB, None), (TEAM, FORKING)])
def test_initiator_sends_new_tgk_and_adds_a_crypto_session(
    world: World, responder: bytes, flags: TpFlag | None
) -> None:
    desired = DesiredPolicy(responders=(responder,))
    if flags is not None:
        desired = DesiredPolicy(responders=(responder,), flags=flags)
    grant = world.grant(desired)
    ini = world.initiator()
    ti, pt = ini.transfer_init(grant, world.now, responder, [CryptoSession(1, 10)])
    res = world.responder(BOB)
    ri, pr = res.receive_transfer_init(ti, world.now)
    call = res.accept_resolve(pr, world.resolve(ri).data, world.now)
    alice = ini.establish(pt, call.transfer_resp, world.now)
    bob = call.state
    assert bob is not None
    assert alice.srtp[0].key_and_salt == bob.srtp[0].key_and_salt

    tgk = KeyData(KeyDataType.TGK, bytes(range(50, 66)), None, KvSpi(b"\x00\x00\x00\x02"))
    sessions = [CryptoSession(1, 10), CryptoSession(2, 20)]
    upd, pending = update_init(world.sw, alice, world.now + 5, [tgk], sessions)
    resp, bob2 = accept_update(world.sw, bob, upd, world.now + 5)
    assert resp is not None
    alice2 = accept_update_resp(world.sw, pending, resp, world.now + 6)
    assert [k.key_and_salt for k in alice2.srtp] == [k.key_and_salt for k in bob2.srtp]
    assert len(alice2.srtp) == 2
    assert alice2.srtp[0].master_key != alice.srtp[0].master_key  # new TGK, new TEK

    # The Responder may update too (RFC 6043 5.2), here without asking for a response.
    tgk3 = KeyData(KeyDataType.TGK, bytes(range(80, 96)), None, KvSpi(b"\x00\x00\x00\x03"))
    upd3, pending3 = update_init(world.sw, bob2, world.now + 9, [tgk3], want_response=False)
    none, alice3 = accept_update(world.sw, alice2, upd3, world.now + 9)
    assert none is None
    bob3 = apply_own_update(world.sw, pending3)
    assert [k.key_and_salt for k in alice3.srtp] == [k.key_and_salt for k in bob3.srtp]
    assert alice3.srtp[1].master_key != alice2.srtp[1].master_key


def test_tampered_or_foreign_update_is_refused(world: World) -> None:
    grant = world.grant(DesiredPolicy(responders=(BOB,)))
    ini = world.initiator()
    ti, pt = ini.transfer_init(grant, world.now, BOB, [CryptoSession(1, 10)])
    res = world.responder(BOB)
    ri, pr = res.receive_transfer_init(ti, world.now)
    call = res.accept_resolve(pr, world.resolve(ri).data, world.now)
    alice = ini.establish(pt, call.transfer_resp, world.now)
    assert call.state is not None
    upd, _ = update_init(world.sw, alice, world.now + 1)
    bad = bytearray(upd)
    bad[-1] ^= 1
    with pytest.raises(EndpointError):
        accept_update(world.sw, call.state, bytes(bad), world.now + 1)
    with pytest.raises(EndpointError):  # stale
        accept_update(world.sw, call.state, upd, world.now + 1000)
