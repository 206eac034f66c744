"""Mode-3 tickets (RFC 6043 4.1.1, D = 0) across a PSK rotation, on the core alone: the
ticket's IDRpsk (A.1) must name a live version of its IDRi's PSK, as the rotation names
them (``<identity>#psk<N>``; version 1 by the identity)."""

from __future__ import annotations

import dataclasses

import pytest

from hsm.software import SoftwareKeyStore
from kms.core.psk_versions import PskVersionRef
from kms.core.service import Kms
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DesiredPolicy, Initiator
from kms.endpoint.modes import build_ticket, mode3_ticket
from kms.endpoint.session import CryptoSession
from kms.keystore import KeyRef
from kms.mikey.constants import ErrorNo, IdType
from kms.mikey.ticket import TpFlag
from tests.core.world import ALICE, BOB, DAVE, KMS_ID, PSKS, World

SESSIONS = (CryptoSession(1, 0x3300),)
NEW_PSK = bytes.fromhex("a2" * 16)
V2 = ALICE + b"#psk2"


class MemoryPskVersions:
    """The core's PskVersions port over a dict (the registry's rows, by IDRpsk name)."""

    def __init__(self) -> None:
        self.rows: dict[bytes, PskVersionRef] = {}

    def psk_version(self, name: bytes) -> PskVersionRef | None:
        return self.rows.get(name)

    def set(self, name: bytes, ref: PskVersionRef) -> None:
        self.rows[name] = ref


@pytest.fixture
def versions(world: World) -> MemoryPskVersions:
    """Alice rotated: version 1 (her registered PSK) and version 2 (NEW_PSK) both live."""
    v = MemoryPskVersions()
    world.directory.keystore.import_secret("psk/alice-2", NEW_PSK)
    v.set(ALICE, PskVersionRef(ALICE, 1, KeyRef(world.directory.psks[ALICE]), False, None))
    v.set(V2, PskVersionRef(ALICE, 2, KeyRef("psk/alice-2"), False, None))
    world.kms = Kms(dataclasses.replace(world.kms.deps, psk_versions=v))
    return v


def alice(psk: bytes, name: bytes | None) -> Initiator:
    return Initiator(Credentials(ALICE, psk, KMS_ID, IdType.URI, psk_name=name),
                     SoftwareKeyStore())  # fmt: skip


def resolve_mode3(world: World, ini: Initiator) -> tuple[bool, dict[str, object]]:
    """Alice makes a mode-3 ticket for Bob; Bob resolves it at the KMS."""
    grant = mode3_ticket(ini, DesiredPolicy(responders=(BOB,)), world.now)
    ti, pt = ini.transfer_init(grant, world.now, BOB, SESSIONS)
    res = world.responder(BOB)
    ri, pr = res.receive_transfer_init(ti, world.now)
    reply = world.resolve(ri)
    if reply.ok:
        call = res.accept_resolve(pr, reply.data, world.now)
        keys = ini.accept_transfer_resp(pt, call.transfer_resp or b"", world.now)
        assert keys[0].key_and_salt == call.srtp[0].key_and_salt
    return reply.ok, dict(reply.audit)


def ticket_idr_psk(ini: Initiator, world: World) -> bytes | None:
    """The IDRpsk ID Data of the Ticket Data (RFC 6043 A.1) of a mode-3 ticket ``ini`` makes."""
    grant = mode3_ticket(ini, DesiredPolicy(responders=(BOB,)), world.now)
    assert not grant.policy.flags & TpFlag.D
    idr = grant.ticket.base_ticket().idr_psk
    return idr.data if idr is not None else None


def test_endpoint_library_names_the_version_it_holds_in_the_ticket(world: World) -> None:
    assert ticket_idr_psk(alice(NEW_PSK, V2), world) == V2
    assert ticket_idr_psk(alice(PSKS[ALICE], None), world) == ALICE


def test_both_live_versions_resolve_after_a_rotation(
    world: World, versions: MemoryPskVersions
) -> None:
    assert resolve_mode3(world, alice(PSKS[ALICE], None))[0]  # old phone: version 1
    assert resolve_mode3(world, alice(NEW_PSK, V2))[0]  # new phone: version 2
    ok, audit = resolve_mode3(world, alice(PSKS[ALICE], ALICE))  # version 1 by its name
    assert ok, audit


def test_a_retired_version_is_refused(world: World, versions: MemoryPskVersions) -> None:
    old = versions.rows[ALICE]
    versions.set(ALICE, dataclasses.replace(old, retired=True))
    ok, audit = resolve_mode3(world, alice(PSKS[ALICE], None))
    assert not ok
    assert audit["error_no"] == ErrorNo.AUTH_FAILURE
    assert audit["reason"] == "ticket refused: PSK version 1 retired"
    assert resolve_mode3(world, alice(NEW_PSK, V2))[0]


def test_a_version_whose_overlap_ended_is_refused(
    world: World, versions: MemoryPskVersions
) -> None:
    old = versions.rows[ALICE]
    versions.set(ALICE, dataclasses.replace(old, retire_at=int(world.now) - 1))
    ok, audit = resolve_mode3(world, alice(PSKS[ALICE], None))
    assert (ok, audit["reason"]) == (False, "ticket refused: PSK version 1 retired")
    versions.set(ALICE, dataclasses.replace(old, retire_at=int(world.now) + 60))
    assert resolve_mode3(world, alice(PSKS[ALICE], None))[0]


def test_wrong_key_under_a_version_name_fails_the_ticket_mac(
    world: World, versions: MemoryPskVersions
) -> None:
    ok, audit = resolve_mode3(world, alice(PSKS[ALICE], V2))
    assert not ok
    assert audit["error_no"] == ErrorNo.AUTH_FAILURE
    assert audit["reason"] == "ticket refused: ticket MAC verification failed"


def test_another_identitys_version_or_unknown_name_is_refused(
    world: World, versions: MemoryPskVersions
) -> None:
    dave = world.initiator(DAVE)
    for tpk, name, why in (
        (NEW_PSK, V2, "IDRpsk names a PSK of another identity"),
        (PSKS[DAVE], DAVE + b"#psk9", "IDRpsk does not name a PSK of the ticket's IDRi"),
        (PSKS[DAVE], ALICE, "IDRpsk names a PSK of another identity"),
    ):
        grant = build_ticket(dave, tpk, name, DesiredPolicy(responders=(BOB,)), world.now)
        ti, _ = dave.transfer_init(grant, world.now, BOB, SESSIONS)
        ri, _ = world.responder(BOB).receive_transfer_init(ti, world.now)
        reply = world.resolve(ri)
        assert not reply.ok
        assert reply.audit["error_no"] == ErrorNo.AUTH_FAILURE
        assert reply.audit["reason"] == f"ticket refused: {why}", name


def test_without_rotation_only_the_identity_names_the_psk(world: World) -> None:
    """No PskVersions port (or no rotation): IDRpsk = IDRi, the registered PSK."""
    assert resolve_mode3(world, alice(PSKS[ALICE], None))[0]
    ok, audit = resolve_mode3(world, alice(PSKS[ALICE], V2))
    assert (ok, audit["reason"]) == (
        False, "ticket refused: IDRpsk does not name a PSK of the ticket's IDRi"
    )
