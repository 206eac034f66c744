"""The PKE's RSA private-key decryption (RFC 3830 4.2.5; RFC 6043 5.1, 5.3 with PKE) off the
event loop: on the inline server (one core slot, SQLite) the core yields it and the server
runs it in its token thread, serving the worker's other calls meanwhile; its failures reach
the client as they did when it ran on the loop.

A real KMS home with its SoftHSM2 token and a real gRPC server on 127.0.0.1; the only
change is a key store wrapper that holds rsa_decrypt until the test lets it go."""

from __future__ import annotations

import datetime as dt
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kms import rpc
from kms.endpoint.initiator import DesiredPolicy
from kms.keystore import KeyRef, KeyStore, RsaPadding, TokenUnavailable
from kms.mikey.constants import ErrorNo
from kms.mikey.message import Message
from kms.mikey.payloads import Error, Pke
from kms.rpc import ERROR_TRAILER
from kms.server.grpc_server import KmsServer
from kms.server.observed import ObservedHandler, ObservedKeyStore
from kms.server.slots import CoreSlots
from kms.server.tracing import Span, Tracer
from tests.pki import Pki, make_pki
from tests.server.test_pk import PkWorld, enable_pk, resign
from tests.server.world import ALICE, BOB, make_world


class HeldKeyStore:
    """The token's key store, with rsa_decrypt held until ``release`` is set (and then
    failing with ``fail``, if set); records the thread each decryption ran on."""

    def __init__(self, inner: KeyStore) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail: Exception | None = None
        self.threads: list[str] = []

    def rsa_decrypt(self, key: KeyRef, data: bytes, pad: RsaPadding) -> bytes:
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        assert self.release.wait(10)
        if self.fail is not None:
            raise self.fail
        return self.inner.rsa_decrypt(key, data, pad)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def offloop_pki() -> Pki:
    return make_pki(dt.datetime.now(dt.UTC).replace(microsecond=0))


@pytest.fixture
def held(tmp_path: Path, offloop_pki: Pki, free_port: Any
         ) -> Iterator[tuple[PkWorld, HeldKeyStore, KmsServer]]:
    for world in make_world(tmp_path / "home"):
        pk = enable_pk(world, offloop_pki)
        deps = pk.world.kms.deps  # type: ignore[attr-defined]
        store = HeldKeyStore(deps.keystore)
        deps.keystore = store
        server = KmsServer(pk.world.kms, f"127.0.0.1:{free_port()}",  # type: ignore[arg-type]
                           slots=CoreSlots(1))
        assert server.inline  # the core on the loop: the SoftHSM default
        server.start()
        try:
            yield pk, store, server
        finally:
            store.release.set()
            server.stop()


def _health(channel: grpc.Channel) -> str:
    resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


def test_other_calls_are_served_while_the_rsa_decryption_runs(
    held: tuple[PkWorld, HeldKeyStore, KmsServer],
) -> None:
    pk, store, server = held
    ini = pk.initiator()
    pk_wire, pk_pending = ini.request_ticket(DesiredPolicy(responders=(BOB,)), pk.now)
    psk = pk.world.initiator(ALICE)
    psk_wire, psk_pending = psk.request_ticket(DesiredPolicy(responders=(BOB,)), pk.now)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = rpc.client_stub(ch)
        pending = stub.RequestTicket.future(rpc.MikeyMessage(data=pk_wire), timeout=15)
        assert store.entered.wait(5)
        # The PK request's RSA decryption has not finished: the same worker serves a PSK
        # Ticket Request and a health check meanwhile.
        psk_reply = stub.RequestTicket(rpc.MikeyMessage(data=psk_wire), timeout=5)
        assert psk.accept_ticket(psk_pending, psk_reply.data, pk.now).session_keys
        assert _health(ch) == "SERVING"
        assert not pending.done()
        store.release.set()
        grant = ini.accept_ticket(pk_pending, pending.result().data, pk.now)
    assert grant.session_keys
    assert len(store.threads) == 1 and store.threads[0].startswith("kms-token")


def test_draining_waits_for_a_pk_call_in_the_token_thread(
    held: tuple[PkWorld, HeldKeyStore, KmsServer],
) -> None:
    pk, store, server = held
    ini = pk.initiator()
    wire, state = ini.request_ticket(DesiredPolicy(responders=(BOB,)), pk.now)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        pending = rpc.client_stub(ch).RequestTicket.future(rpc.MikeyMessage(data=wire),
                                                           timeout=15)
        assert store.entered.wait(5)
        drained: list[bool] = []
        drainer = threading.Thread(target=lambda: drained.append(server.drain(10.0)))
        drainer.start()
        assert server.servicer.inflight == 1  # in flight while its RSA op is in the pool
        store.release.set()
        drainer.join(20)
        assert ini.accept_ticket(state, pending.result().data, pk.now).session_keys
    assert drained == [True]  # finished within the grace, nothing cut off


def _refusal(stub: Any, wire: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        stub.RequestTicket(rpc.MikeyMessage(data=wire), timeout=10)
    return err.value


def test_pke_failures_over_the_off_loop_path(
    held: tuple[PkWorld, HeldKeyStore, KmsServer],
) -> None:
    pk, store, server = held
    store.release.set()
    creds = pk.creds()
    ini = pk.initiator(creds)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = rpc.client_stub(ch)
        # A PKE the token cannot decrypt: the opaque Auth failure, as on the loop.
        wire, _ = ini.request_ticket(DesiredPolicy(responders=(BOB,)), pk.now)
        bad = resign(creds, wire, lambda p: Pke(0, secrets.token_bytes(256))
                     if isinstance(p, Pke) else p)
        err = _refusal(stub, bad)
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED
        assert err.details() == "authentication failed"
        trailer = dict(err.trailing_metadata())[ERROR_TRAILER]
        assert [e.error_no for e in Message.decode(trailer).all(Error)] == [ErrorNo.AUTH_FAILURE]
        # The token gone in the middle of the RSA operation: UNAVAILABLE.
        store.fail = TokenUnavailable("token gone")
        wire, _ = ini.request_ticket(DesiredPolicy(responders=(BOB,)), pk.now)
        err = _refusal(stub, wire)
        assert err.code() is grpc.StatusCode.UNAVAILABLE
        assert err.details() == "token unavailable"
    assert len(store.threads) == 2
    assert all(t.startswith("kms-token") for t in store.threads)


class Spans:
    """An exporter that keeps the finished spans (the Tracer's only use of it)."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    def export(self, span: Span) -> None:
        self.spans.append(span)


def test_the_token_span_of_the_off_loop_operation_is_a_child_of_the_call_span(
    tmp_path: Path, offloop_pki: Pki, free_port: Any,
) -> None:
    spans = Spans()
    tracer = Tracer(spans)  # type: ignore[arg-type]
    for world in make_world(tmp_path / "home"):
        pk = enable_pk(world, offloop_pki)
        deps = pk.world.kms.deps  # type: ignore[attr-defined]
        deps.keystore = ObservedKeyStore(deps.keystore, None, tracer)
        handler = ObservedHandler(pk.world.kms, None, tracer)  # type: ignore[arg-type]
        server = KmsServer(handler, f"127.0.0.1:{free_port()}", slots=CoreSlots(1))
        assert server.inline
        server.start()
        try:
            ini = pk.initiator()
            wire, state = ini.request_ticket(DesiredPolicy(responders=(BOB,)), pk.now)
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                data = rpc.client_stub(ch).RequestTicket(rpc.MikeyMessage(data=wire),
                                                         timeout=10).data
            assert ini.accept_ticket(state, data, pk.now).session_keys
        finally:
            server.stop()
    [call] = [s for s in spans.spans if s.name == "kms/RequestTicket"]
    assert call.attributes["kms.outcome"] == "ok"
    token_spans = [s for s in spans.spans if s.name.startswith("token/")]
    [rsa] = [s for s in token_spans if s.name == "token/rsa_decrypt"]
    assert len(token_spans) > 1  # the exchange's other token calls, made on the loop
    # Every token span, the one made in the token thread included, is the call's child.
    assert {s.parent_span_id for s in token_spans} == {call.context.span_id}
    assert rsa.context.trace_id == call.context.trace_id
