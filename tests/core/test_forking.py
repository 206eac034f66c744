"""RANDRkms as a keyed function of (ticket, IDRr) computed in the key store (RFC 6043 5.1.1,
5.3, 12.1): the same Responder gets the same modifier again, another Responder another."""

from __future__ import annotations

import pytest

from hsm.software import SoftwareKeyStore
from kms.core.forking import modifier_input, rand_kms
from kms.endpoint.initiator import DesiredPolicy
from kms.keystore import KeyRef
from kms.mikey.compose import compose
from kms.mikey.message import Message
from kms.mikey.ticket import TpFlag
from kms.mikey.views import TransferResp
from tests.core.world import BOB, CAROL, TEAM, World

FORKING_REUSE = TpFlag.E | TpFlag.F | TpFlag.G | TpFlag.H | TpFlag.I | TpFlag.J


def _rand_kms(transfer_resp: bytes | None) -> bytes:
    view = compose(Message.decode(transfer_resp or b""))
    assert isinstance(view, TransferResp) and view.rand_kms is not None
    return view.rand_kms.value


def test_same_ticket_and_responder_same_modifier_others_differ(world: World) -> None:
    grant = world.grant(DesiredPolicy(responders=(TEAM,), flags=FORKING_REUSE))
    _, bob1, _ = world.call(grant, TEAM, resolver=BOB)
    _, bob2, _ = world.call(grant, TEAM, resolver=BOB)  # J = 1: the ticket is reused (5.3)
    _, carol, _ = world.call(grant, TEAM, resolver=CAROL)
    assert _rand_kms(bob1.transfer_resp) == _rand_kms(bob2.transfer_resp)
    assert bob1.session_keys[0].key == bob2.session_keys[0].key
    assert _rand_kms(bob1.transfer_resp) != _rand_kms(carol.transfer_resp)
    assert len(_rand_kms(bob1.transfer_resp)) >= 16  # RFC 6043 12.1
    other = world.grant(DesiredPolicy(responders=(TEAM,), flags=FORKING_REUSE))
    _, bob_other, _ = world.call(other, TEAM, resolver=BOB)
    assert _rand_kms(bob_other.transfer_resp) != _rand_kms(bob1.transfer_resp)


def test_rand_kms_is_keyed_and_expands_past_one_block() -> None:
    ks = SoftwareKeyStore()
    ks.generate_secret("a", 32)
    ks.generate_secret("b", 32)
    tid = bytes(range(16))
    one = rand_kms(ks, KeyRef("a"), tid, BOB, 32)
    assert rand_kms(ks, KeyRef("a"), tid, BOB, 16) == one[:16]
    long = rand_kms(ks, KeyRef("a"), tid, BOB, 48)
    assert long[:32] == one and len(long) == 48 and long[32:] != one[:16]
    assert rand_kms(ks, KeyRef("b"), tid, BOB, 32) != one
    # len16(IDRr) keeps (ticket id, IDRr) pairs apart whatever their bytes.
    assert modifier_input(tid, b"ab", 1) != modifier_input(tid + b"a", b"b", 1)
    with pytest.raises(ValueError, match="length"):
        rand_kms(ks, KeyRef("a"), tid, BOB, 0)
