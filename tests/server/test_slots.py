"""Core slots: how many KMS core calls one worker computes at once, and how a federated call
gives its slot up while it waits for the peer."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from kms.core.ports import PeerKms
from kms.server.config import KmsConfig, parse_config
from kms.server.slots import ENV, CoreSlots, SlotReleasingPeers, core_slots_for

CONFIG = """
[kms]
id = "kms:kms.example.org"
[token]
module = "{module}"
label = "kms"
pin_file = "token/pin"
"""


def config(module: str = "/usr/lib/softhsm/libsofthsm2.so", extra: str = "") -> KmsConfig:
    return parse_config(CONFIG.format(module=module) + extra, Path("/srv/kms"))


def test_auto_is_one_slot_for_softhsm_and_more_for_hardware(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert core_slots_for(config()) == 1
    assert core_slots_for(config("/opt/vendor/lib/libCryptoki2_64.so")) == 8
    assert core_slots_for(config(extra="[server]\ncore_concurrency = 4\n")) == 4
    monkeypatch.setenv(ENV, "3")
    assert core_slots_for(config(extra="[server]\ncore_concurrency = 4\n")) == 3
    for bad in ("0", "x"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ValueError, match=ENV):
            core_slots_for(config())


def _enters_within(slots: CoreSlots, seconds: float) -> bool:
    entered = threading.Event()

    def other() -> None:
        with slots.held():
            entered.set()

    t = threading.Thread(target=other, daemon=True)
    t.start()
    ok = entered.wait(seconds)
    t.join(5)
    return ok


def test_one_slot_serialises_and_released_lets_others_in() -> None:
    slots = CoreSlots(1)
    with slots.held():
        assert not _enters_within(slots, 0.2)  # the slot is taken
        with slots.released():
            assert _enters_within(slots, 5)  # given up while "waiting on the network"
        assert not _enters_within(slots, 0.2)  # and taken back afterwards
    assert _enters_within(slots, 5)
    with slots.released():  # a thread without a slot: nothing to give up
        assert _enters_within(slots, 5)
    with pytest.raises(ValueError, match="at least one"):
        CoreSlots(0)


class SlowPeer:
    def __init__(self, slots: CoreSlots) -> None:
        self.slots = slots
        self.others_ran = False

    def forward_resolve(self, peer: PeerKms, wire: bytes, *, correlation_id: str,
                        hops: int) -> bytes:
        # While this call waits for its peer, another core call of the worker can run.
        self.others_ran = _enters_within(self.slots, 5)
        time.sleep(0.01)
        return b"answer:" + wire


def test_federated_call_waits_without_its_slot() -> None:
    slots = CoreSlots(1)
    inner = SlowPeer(slots)
    peers = SlotReleasingPeers(inner, slots)
    peer = PeerKms(b"kms:peer.example.org", psk=None)
    with slots.held():
        assert peers.forward_resolve(peer, b"x", correlation_id="c", hops=1) == b"answer:x"
        assert not _enters_within(slots, 0.2)  # held again after the call
    assert inner.others_ran
