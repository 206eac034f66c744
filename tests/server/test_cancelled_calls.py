"""A call its client cancels while the core waits for a step off the event loop (here the
PKE's RSA decryption, RFC 3830 4.2.5) still gets its one audit record, outcome
``cancelled``, with the initiator's identity; it is counted under that outcome, nothing is
issued for it, and the server goes on serving. Both core modes: inline on the loop (the
core is told at once) and in threads (the core thread tells the core when the operation it
waits for returns). Also when drain cuts the call off after its grace.

A real KMS home with its SoftHSM2 token and a real gRPC server on 127.0.0.1; the key store
holds rsa_decrypt until the test lets it go (tests/server/test_pk_offloop.py)."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from kms import rpc
from kms.core.api import Outcome
from kms.core.steps import cancel
from kms.endpoint.initiator import DesiredPolicy
from kms.rpc import CORRELATION_KEY
from kms.server.federated import FederatingHandler
from kms.server.grpc_server import KmsServer
from kms.server.metrics import ServerMetrics
from kms.server.observed import ObservedHandler
from kms.server.slots import CoreSlots
from kms.server.tracing import Tracer
from tests.pki import Pki, make_pki
from tests.server.test_pk import PkWorld, enable_pk
from tests.server.test_pk_offloop import HeldKeyStore, Spans
from tests.server.test_slots import BlockedPeer, SteppedCore
from tests.server.world import ALICE, BOB, make_world


@pytest.fixture(scope="module")
def cancel_pki() -> Pki:
    return make_pki(dt.datetime.now(dt.UTC).replace(microsecond=0))


@dataclass
class Held:
    pk: PkWorld
    store: HeldKeyStore
    server: KmsServer
    registry: CollectorRegistry
    mode: str

    def records(self, cid: str) -> list[dict[str, Any]]:
        path = self.pk.world.home.path / "audit.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return [r for r in map(json.loads, lines) if r.get("correlation_id") == cid]

    def wait_record(self, cid: str) -> dict[str, Any]:
        """The call's record, once written (the core writes it synchronously when told; in
        threads mode when the held operation returns). Bounded wait, no timing asserted."""
        deadline = time.monotonic() + 10
        while not (found := self.records(cid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(found) == 1, found
        return found[0]

    def calls(self, outcome: str, code: str) -> float:
        value = self.registry.get_sample_value(
            "kms_calls_total",
            {"method": "RequestTicket", "outcome": outcome, "code": code, "mikey_error": "none"},
        )
        return value or 0.0

    def tickets(self) -> float:
        return sum(
            s.value for m in self.registry.collect() if m.name == "kms_tickets_issued"
            for s in m.samples if s.name == "kms_tickets_issued_total"
        )


@pytest.fixture(params=["inline", "threads"])
def held(request: pytest.FixtureRequest, tmp_path: Path, cancel_pki: Pki, free_port: Any
         ) -> Iterator[Held]:
    for world in make_world(tmp_path / "home"):
        pk = enable_pk(world, cancel_pki)
        deps = pk.world.kms.deps  # type: ignore[attr-defined]
        store = HeldKeyStore(deps.keystore)
        deps.keystore = store
        registry = CollectorRegistry()
        handler = ObservedHandler(pk.world.kms, ServerMetrics(registry))  # type: ignore[arg-type]
        threads = 0 if request.param == "inline" else 2
        server = KmsServer(handler, f"127.0.0.1:{free_port()}", slots=CoreSlots(1),
                           core_threads=threads)
        assert server.inline is (request.param == "inline")
        server.start()
        try:
            yield Held(pk, store, server, registry, request.param)
        finally:
            store.release.set()
            server.stop()


def _check_cancelled(h: Held, record: dict[str, Any], cid: str) -> None:
    assert record["outcome"] == "cancelled"
    assert record["event"] == "refused"
    assert record["reason"] == "cancelled while waiting for the token"
    assert record["sender"] == ALICE.decode()
    assert record["data_type"] == "REQUEST_INIT_PK"
    assert record["correlation_id"] == cid
    assert "error_no" not in record  # no MIKEY error message: nobody to send it to
    assert not any(isinstance(v, bytes) for v in record.values())


def test_a_pk_request_cancelled_while_its_rsa_step_is_held(held: Held) -> None:
    pk, store = held.pk, held.store
    ini = pk.initiator()
    wire, _ = ini.request_ticket(DesiredPolicy(responders=(BOB,)), pk.now)
    cid = f"cancel-{held.mode}"
    with grpc.insecure_channel(f"127.0.0.1:{held.server.port}") as ch:
        stub = rpc.client_stub(ch)
        pending = stub.RequestTicket.future(rpc.MikeyMessage(data=wire), timeout=15,
                                            metadata=((CORRELATION_KEY, cid),))
        assert store.entered.wait(5)
        assert pending.cancel()
        if held.mode == "inline":
            # Recorded at once, while the RSA operation is still held in the token thread.
            record = held.wait_record(cid)
            store.release.set()
        else:
            # The core thread waits in the operation; the core hears of it when it returns.
            # (The call is over for the server once its handler has seen the cancel.)
            _wait_for(lambda: held.server.servicer.inflight == 0)
            assert held.records(cid) == []
            store.release.set()
            record = held.wait_record(cid)
        _check_cancelled(held, record, cid)
        # The server goes on serving: the next PK Ticket Request is issued.
        wire2, state2 = ini.request_ticket(DesiredPolicy(responders=(BOB,)), pk.now)
        data = stub.RequestTicket(rpc.MikeyMessage(data=wire2), timeout=10).data
        assert ini.accept_ticket(state2, data, pk.now).session_keys
    assert len(held.records(cid)) == 1  # exactly one record, never also an "ok" one
    assert held.calls("cancelled", "CANCELLED") == 1
    assert held.calls("ok", "OK") == 1
    assert held.tickets() == 1  # the second request's only


def test_a_pk_request_cut_off_by_drain_is_recorded_cancelled(held: Held) -> None:
    pk, store = held.pk, held.store
    wire, _ = pk.initiator().request_ticket(DesiredPolicy(responders=(BOB,)), pk.now)
    cid = f"drained-{held.mode}"
    with grpc.insecure_channel(f"127.0.0.1:{held.server.port}") as ch:
        pending = rpc.client_stub(ch).RequestTicket.future(
            rpc.MikeyMessage(data=wire), timeout=15, metadata=((CORRELATION_KEY, cid),))
        assert store.entered.wait(5)
        drained: list[bool] = []
        drainer = threading.Thread(target=lambda: drained.append(held.server.drain(0.3)))
        drainer.start()
        drainer.join(20)
        assert drained == [False]  # the grace passed with the call in flight: cut off
        with pytest.raises(grpc.RpcError):
            pending.result()
    if held.mode == "threads":
        store.release.set()
    record = held.wait_record(cid)
    store.release.set()
    _check_cancelled(held, record, cid)
    assert held.calls("cancelled", "CANCELLED") == 1
    assert held.tickets() == 0


def test_the_observed_federating_handler_passes_a_cancel_to_the_core() -> None:
    """A resolve cancelled at its peer call (RFC 6043 9): the observing layer hands the
    cancellation to the federating handler, which has the core record it; the call is
    counted as cancelled and its span says so (a client's cancel is no server error)."""
    core, peer = SteppedCore(), BlockedPeer()
    registry, spans = CollectorRegistry(), Spans()
    handler = ObservedHandler(
        FederatingHandler(core, peer, CoreSlots(1)),  # type: ignore[arg-type]
        ServerMetrics(registry), Tracer(spans),  # type: ignore[arg-type]
    )
    steps = handler.resolve_steps(b"t", 1000.0, correlation_id="c")
    next(steps)  # the peer call, never made here
    reply = cancel(steps)
    assert reply.outcome is Outcome.CANCELLED
    assert [c.wire for c in core.cancelled] == [b"t"] and core.finished == []
    assert not peer.entered.is_set()
    assert registry.get_sample_value("kms_calls_total", {
        "method": "ResolveTicket", "outcome": "cancelled", "code": "CANCELLED",
        "mikey_error": "none"}) == 1
    [span] = spans.spans
    assert span.attributes["kms.outcome"] == "cancelled" and not span.error


@pytest.mark.parametrize("mode", ["inline", "threads"])
def test_a_federated_resolve_cancelled_before_the_peer_answers(mode: str,
                                                               free_port: Any) -> None:
    """RFC 6043 9 over a real server: the client cancels while the peer call waits; the
    core records the cancel (inline at once; in threads mode when the peer call returns)
    and the peer's late answer is used for nothing; the next resolve is answered."""
    core, peer = SteppedCore(), BlockedPeer()
    handler = FederatingHandler(core, peer, CoreSlots(1))  # type: ignore[arg-type]
    server = KmsServer(handler, f"127.0.0.1:{free_port()}", slots=CoreSlots(1),
                       core_threads=0 if mode == "inline" else 2)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = rpc.client_stub(ch)
            pending = stub.ResolveTicket.future(rpc.MikeyMessage(data=b"t"), timeout=10)
            assert peer.entered.wait(5)
            assert pending.cancel()
            if mode == "threads":
                _wait_for(lambda: server.servicer.inflight == 0)  # the server saw the cancel
                assert core.cancelled == []  # the core thread still waits for the peer
            else:
                _wait_for(lambda: bool(core.cancelled))
            peer.release.set()
            _wait_for(lambda: bool(core.cancelled))
            assert [c.wire for c in core.cancelled] == [b"t"]
            assert stub.ResolveTicket(rpc.MikeyMessage(data=b"u"), timeout=10).data == b"answer:u"
    finally:
        peer.release.set()
        server.stop()
    assert [answer for answer, _ in core.finished] == [b"answer:u"]  # never b"answer:t"


def _wait_for(cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10  # bounded; no timing asserted
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cond()
