"""Core slots: how many KMS core calls one worker computes at once, where they run (inline
on the event loop or in threads), and how a federated call gives its slot up (or leaves the
loop) while it waits for the peer."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kms import rpc
from kms.core.api import KmsReply, Outcome
from kms.core.federation import PeerCall
from kms.core.ports import PeerError, PeerKms
from kms.server.config import KmsConfig, parse_config
from kms.server.federated import FederatingHandler
from kms.server.grpc_server import KmsServer
from kms.server.slots import CALLS_ENV, ENV, CoreSlots, core_slots_for, core_threads_for

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
    def __init__(self, slots: CoreSlots, fail: PeerError | None = None) -> None:
        self.slots = slots
        self.others_ran = False
        self.fail = fail
        self.rebuild: Callable[[], bytes] | None = None

    def forward_resolve(self, peer: PeerKms, wire: bytes, *, correlation_id: str,
                        hops: int, rebuild: Callable[[], bytes] | None = None) -> bytes:
        # While this call waits for its peer, another core call of the worker can run.
        self.others_ran = _enters_within(self.slots, 5)
        self.rebuild = rebuild
        time.sleep(0.01)
        if self.fail is not None:
            raise self.fail
        return b"answer:" + wire


class SteppedCore:
    """The two steps of the core's federated resolve: a PeerCall out, the answer back in."""

    def __init__(self) -> None:
        self.finished: list[tuple[bytes | PeerError, float]] = []
        self.cancelled: list[PeerCall] = []

    def resolve_step(self, wire: bytes, now: float, *, correlation_id: str = "",
                     hops: int = 0) -> PeerCall:
        peer = PeerKms(b"kms:peer.example.org", psk=None)
        return PeerCall(peer, wire, correlation_id, hops + 1, lambda: b"fresh",
                        None)  # type: ignore[arg-type]

    def resolve_first_steps(self, wire: bytes, now: float, *, correlation_id: str = "",
                            hops: int = 0) -> Generator[Any, Any, PeerCall]:
        """The core's first step as steps (it yields no token operation here)."""
        return self.resolve_step(wire, now, correlation_id=correlation_id, hops=hops)
        yield  # a generator

    def cancel_resolve(self, call: PeerCall) -> KmsReply:
        self.cancelled.append(call)
        return KmsReply(Outcome.CANCELLED, audit={"reason": "cancelled"})

    def finish_resolve(self, call: PeerCall, answer: bytes | PeerError,
                       now: float) -> KmsReply:
        self.finished.append((answer, now))
        if isinstance(answer, PeerError):
            return KmsReply(answer.outcome or Outcome.UNAVAILABLE)
        return KmsReply(Outcome.OK, answer)


def test_federated_call_waits_without_its_slot() -> None:
    slots = CoreSlots(1)
    inner = SlowPeer(slots)
    core = SteppedCore()
    handler = FederatingHandler(core, inner, slots)  # type: ignore[arg-type]
    with slots.held():
        reply = handler.resolve_ticket(b"x", 1000.0, correlation_id="c")
        assert not _enters_within(slots, 0.2)  # held again after the call
    assert inner.others_ran  # the slot was free while the peer answered
    assert reply.data == b"answer:x"
    assert inner.rebuild is not None and inner.rebuild() == b"fresh"
    answer, now = core.finished[0]
    assert answer == b"answer:x"
    assert now >= 1000.01  # the time the answer arrived, on the caller's clock


def test_peer_refusal_is_mapped_to_the_cores_outcome_in_the_adapter() -> None:
    slots = CoreSlots(1)
    for status, outcome in [("PERMISSION_DENIED", Outcome.DENIED),
                            ("RESOURCE_EXHAUSTED", Outcome.RATE_LIMITED),
                            ("DATA_LOSS", Outcome.UNAVAILABLE)]:
        core = SteppedCore()
        inner = SlowPeer(slots, PeerError("refused", "no", status))
        reply = FederatingHandler(core, inner, slots).resolve_ticket(  # type: ignore[arg-type]
            b"x", 1000.0)
        assert reply.outcome is outcome, status
        failure = core.finished[0][0]
        assert isinstance(failure, PeerError) and failure.status == status


def test_several_slots_admit_that_many_at_once() -> None:
    slots = CoreSlots(2)
    entered = threading.Event()
    leave = threading.Event()

    def hold() -> None:
        with slots.held():
            entered.set()
            leave.wait(5)

    other = threading.Thread(target=hold)
    other.start()
    try:
        assert entered.wait(5)
        with slots.held():  # the second slot
            assert not _enters_within(slots, 0.2)  # no third
        assert _enters_within(slots, 5)
    finally:
        leave.set()
        other.join(5)


def test_core_calls_auto_is_inline_only_for_one_slot_on_sqlite(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(CALLS_ENV, raising=False)
    assert core_threads_for(config(), 1, 128) == 0  # SoftHSM, SQLite: inline on the loop
    assert core_threads_for(config(), 8, 128) == 128  # a hardware HSM: threads
    cluster = '[store]\nbackend = "postgresql"\ndsn = "postgresql://kms@db/kms"\n'
    assert core_threads_for(config(extra=cluster), 1, 128) == 128  # database waits
    assert core_threads_for(config(extra='[server]\ncore_calls = "threads"\n'), 1, 64) == 64
    assert core_threads_for(config(extra='[server]\ncore_calls = "inline"\n'), 8, 64) == 0
    monkeypatch.setenv(CALLS_ENV, "threads")
    assert core_threads_for(config(), 1, 32) == 32
    monkeypatch.setenv(CALLS_ENV, "sideways")
    with pytest.raises(ValueError, match=CALLS_ENV):
        core_threads_for(config(), 1, 32)


class LoopCore(SteppedCore):
    """Records the thread of each core step; also answers Ticket Requests."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[tuple[str, str]] = []

    def resolve_step(self, wire: bytes, now: float, *, correlation_id: str = "",
                     hops: int = 0) -> PeerCall:
        self.threads.append(("step", threading.current_thread().name))
        return super().resolve_step(wire, now, correlation_id=correlation_id, hops=hops)

    def finish_resolve(self, call: PeerCall, answer: bytes | PeerError,
                       now: float) -> KmsReply:
        self.threads.append(("finish", threading.current_thread().name))
        return super().finish_resolve(call, answer, now)

    def request_ticket(self, wire: bytes, now: float, *, correlation_id: str = "") -> KmsReply:
        self.threads.append(("request", threading.current_thread().name))
        return KmsReply(Outcome.OK, b"ticket")

    def request_steps(self, wire: bytes, now: float, *,
                      correlation_id: str = "") -> Generator[Any, Any, KmsReply]:
        return self.request_ticket(wire, now, correlation_id=correlation_id)
        yield  # a generator


class BlockedPeer:
    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.thread = ""

    def forward_resolve(self, peer: PeerKms, wire: bytes, *, correlation_id: str,
                        hops: int, rebuild: Callable[[], bytes] | None = None) -> bytes:
        self.thread = threading.current_thread().name
        self.entered.set()
        assert self.release.wait(10)
        return b"answer:" + wire


def test_inline_server_awaits_the_peer_call_off_the_loop(free_port: Any) -> None:
    """RFC 6043 9 on the event-loop server: the core's steps run on the loop, the peer call
    in a thread, and the loop serves other calls while the peer has not answered."""
    core, peer = LoopCore(), BlockedPeer()
    handler = FederatingHandler(core, peer, CoreSlots(1))  # type: ignore[arg-type]
    server = KmsServer(handler, f"127.0.0.1:{free_port()}", slots=CoreSlots(1))
    assert server.inline
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = rpc.client_stub(ch)
            pending = stub.ResolveTicket.future(rpc.MikeyMessage(data=b"t"), timeout=10)
            assert peer.entered.wait(5)
            # The peer has not answered: a Ticket Request is served meanwhile.
            assert stub.RequestTicket(rpc.MikeyMessage(data=b"r"), timeout=5).data == b"ticket"
            peer.release.set()
            assert pending.result().data == b"answer:t"
    finally:
        peer.release.set()
        server.stop()
    assert core.threads == [("step", "kms-loop"), ("request", "kms-loop"),
                            ("finish", "kms-loop")]
    assert peer.thread.startswith("kms-peer")
