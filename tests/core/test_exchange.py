"""Whole MIKEY-TICKET exchanges against the real KMS core and a SoftHSM2 token: request,
transfer, resolve; both ends must derive identical SRTP keys (RFC 6043 4.2, 5.1)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kms.endpoint.initiator import DEFAULT_FLAGS, DesiredPolicy
from kms.endpoint.session import CryptoSession
from kms.mikey.compose import compose
from kms.mikey.constants import IdRole, KeyDataType, PrfFunc, TsRole
from kms.mikey.message import Message
from kms.mikey.payloads import KeyData, KvSpi
from kms.mikey.protect import SUITE_256
from kms.mikey.ticket import Idr, TpFlag, Tr
from kms.mikey.views import TransferResp
from tests.core.world import ALICE, BOB, CAROL, TEAM, World

FORKING = TpFlag.E | TpFlag.F | TpFlag.G | TpFlag.H | TpFlag.I


def test_request_transfer_resolve_gives_both_ends_the_same_srtp_keys(world: World) -> None:
    grant = world.grant(DesiredPolicy(responders=(BOB,), lifetime_s=3600))
    sessions = (CryptoSession(1, 0xAAAA0001), CryptoSession(2, 0xBBBB0002))
    keys_a, call, _ = world.call(grant, BOB, sessions=sessions)
    keys_b = call.srtp
    assert [k.cs_id for k in keys_a] == [1, 2]
    assert [k.key_and_salt for k in keys_a] == [k.key_and_salt for k in keys_b]
    assert keys_a[0].master_key != keys_a[1].master_key  # per crypto session (CS ID label)
    assert len(keys_a[0].master_key) == 16 and len(keys_a[0].master_salt) == 14
    assert call.initiator == ALICE
    # The granted policy names the authenticated Initiator and this KMS (reference 14.7).
    tp = grant.policy
    assert tp.flags & TpFlag.D and not tp.flags & TpFlag.K
    assert any(
        isinstance(p, Idr) and p.role == IdRole.IDRI and p.data == ALICE for p in tp.payloads
    )
    # No TRs asked (no lower bound): none granted; the TRe asked for is kept.
    assert [p.role for p in tp.payloads if isinstance(p, Tr)] == [TsRole.TRE]
    # The default KEMAC holds one TGK (RFC 6043 4.2.1.5).
    assert [k.key_type for k in grant.session_keys] == [KeyDataType.TGK]
    events = [r["event"] for r in world.audit()]
    assert events == ["ticket.issued", "ticket.resolved"]


def test_forking_gives_each_group_member_its_own_tgk(world: World) -> None:
    grant = world.grant(DesiredPolicy(responders=(TEAM,), flags=FORKING))
    assert grant.policy.flags & TpFlag.I and grant.mpkr is not None
    keys_bob, call_bob, _ = world.call(grant, TEAM, resolver=BOB)
    keys_carol, call_carol, _ = world.call(grant, TEAM, resolver=CAROL)
    assert keys_bob[0].key_and_salt == call_bob.srtp[0].key_and_salt
    assert keys_carol[0].key_and_salt == call_carol.srtp[0].key_and_salt
    # Forked TGK': Bob and Carol (same ticket) get different keys (RFC 6043 5.1.1).
    assert call_bob.session_keys[0].key != call_carol.session_keys[0].key
    assert call_bob.session_keys[0].key != grant.session_keys[0].key
    # TRANSFER_RESP echoes the identity the keys are bound to and RANDRkms.
    resp = compose(Message.decode(call_bob.transfer_resp or b""))
    assert isinstance(resp, TransferResp)
    assert resp.idr_r == Idr(IdRole.IDRR, 1, BOB)
    assert resp.rand_kms is not None


@pytest.mark.parametrize(
    "key_types",
    [
        (KeyDataType.TEK_SALT,),
        (KeyDataType.TGK_SALT,),
        (KeyDataType.GTGK,),
        (KeyDataType.TEK_SALT, KeyDataType.TEK_SALT),
    ],
)
def test_requested_key_types_reach_both_ends(world: World, key_types: tuple[int, ...]) -> None:
    length = 16
    grant = world.grant(
        DesiredPolicy(responders=(BOB,), key_types=key_types, key_length=length)  # type: ignore[arg-type]
    )
    assert [k.key_type for k in grant.session_keys] == list(key_types)
    assert all(isinstance(k.kv, KvSpi) and len(k.kv.spi) == 4 for k in grant.session_keys)
    sessions = tuple(CryptoSession(i + 1, 100 + i) for i in range(len(key_types)))
    keys_a, call, _ = world.call(grant, BOB, sessions=sessions)
    assert [k.key_and_salt for k in keys_a] == [k.key_and_salt for k in call.srtp]


def test_256_bit_suite_end_to_end(world: World) -> None:
    ini = world.initiator()
    ini.suite = SUITE_256
    wire, pending = ini.request_ticket(
        DesiredPolicy(responders=(BOB,), prf_func=PrfFunc.PRF_HMAC_SHA_256), world.now
    )
    reply = world.request(ALICE, wire)
    assert reply.ok, reply.audit
    grant = ini.accept_ticket(pending, reply.data, world.now)
    assert len(grant.session_keys[0].key) == 32 and len(grant.mpki) == 32
    ti, pt = ini.transfer_init(grant, world.now, BOB, [CryptoSession(1, 7)])
    res = world.responder(BOB)
    res.suite = SUITE_256
    ri, pr = res.receive_transfer_init(ti, world.now)
    rr = world.resolve(ri)
    assert rr.ok, rr.audit
    call = res.accept_resolve(pr, rr.data, world.now)
    keys = ini.accept_transfer_resp(pt, call.transfer_resp or b"", world.now)
    assert keys[0].key_and_salt == call.srtp[0].key_and_salt


def test_initiator_supplied_tek_is_carried_to_the_responder(world: World) -> None:
    """Appendix B.2 (key translation): the Initiator's TEK travels in the ticket."""
    tek = KeyData(
        KeyDataType.TEK_SALT, bytes(range(16)), bytes(range(100, 114)), KvSpi(b"\x00\x00\x00\x07")
    )
    grant = world.grant(DesiredPolicy(responders=(BOB,), supplied_teks=(tek,)))
    assert grant.policy.flags & TpFlag.L
    keys_a, call, _ = world.call(grant, BOB)
    assert call.session_keys == (tek,)
    assert keys_a[0].master_key == call.srtp[0].master_key == tek.key


def test_no_transfer_resp_when_f_is_0(world: World) -> None:
    flags = TpFlag.E | TpFlag.H | TpFlag.N | TpFlag.O  # G = 0: only RANDRi in the TEK label
    grant = world.grant(DesiredPolicy(responders=(BOB,), flags=flags))
    assert not grant.policy.flags & TpFlag.F
    keys_a, call, _ = world.call(grant, BOB)
    assert call.transfer_resp is None
    assert keys_a[0].key_and_salt == call.srtp[0].key_and_salt


def test_reusable_ticket_resolves_twice_for_the_same_responder(world: World) -> None:
    grant = world.grant(DesiredPolicy(responders=(BOB,), flags=DEFAULT_FLAGS | TpFlag.J))
    assert grant.policy.flags & TpFlag.J
    first, _, _ = world.call(grant, BOB)
    second, _, _ = world.call(grant, BOB)
    # Ticket reuse (RFC 6043 5.3): new CSB and RANDs, so new session keys.
    assert first[0].master_key != second[0].master_key


def test_policy_changes_set_flag_k(world: World) -> None:
    # Asking for a 10-year ticket: the KMS caps it at max_lifetime_s and says so with K.
    grant = world.grant(DesiredPolicy(responders=(BOB,), lifetime_s=10 * 365 * 86400))
    assert grant.policy.flags & TpFlag.K
    end = next(p for p in grant.policy.payloads if isinstance(p, Tr) and p.role == TsRole.TRE)
    from kms.mikey.ntp import decode_ts_value

    assert decode_ts_value(end.ts_type, end.value) == pytest.approx(world.now + 86400, abs=2)  # type: ignore[arg-type]


def test_tickets_of_a_rotated_tpk_still_resolve(world: World) -> None:
    grant = world.grant(DesiredPolicy(responders=(BOB,)))
    world.home.rotate_tpk()
    keys_a, call, _ = world.call(grant, BOB)
    assert keys_a[0].key_and_salt == call.srtp[0].key_and_salt
    newer = world.grant(DesiredPolicy(responders=(BOB,)))
    assert newer.ticket.base_ticket().idr_psk == Idr(IdRole.IDRPSK, 2, b"tpk/2")
    assert grant.ticket.base_ticket().idr_psk == Idr(IdRole.IDRPSK, 2, b"tpk/1")


def test_grant_keeps_desired_flags_that_policy_allows(world: World) -> None:
    desired = DesiredPolicy(responders=(BOB, CAROL), flags=DEFAULT_FLAGS | TpFlag.M)
    grant = world.grant(desired)
    assert grant.policy.flags & TpFlag.M
    assert [
        p.data for p in grant.policy.payloads if isinstance(p, Idr) and p.role == IdRole.IDRR
    ] == [BOB, CAROL]
    assert replace(desired, flags=desired.flags) == desired
