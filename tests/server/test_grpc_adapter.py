"""The gRPC adapter over real gRPC on 127.0.0.1, with a scripted handler (no KMS core).

What a client sees for every outcome: status code, details, ``mikey-error-bin``,
``x-correlation-id``; plus health checking, reflection, size limit and draining. Every test
of the ``server`` fixture runs twice: the core inline on the event loop, and in threads.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kms import rpc
from kms.core.api import KmsReply, Outcome
from kms.server.federated import ResolveSteps
from kms.server.grpc_server import (
    ERROR_TRAILER,
    MAX_REQUEST_BYTES,
    KmsServer,
    ServerError,
    correlation_id,
)

NOW = 1_700_000_000.25
SECRET = b"\x13\x37-never-log-this-request-\xfe"


@dataclass
class ScriptedHandler:
    """Replies by the request bytes: b"ok", b"<outcome>", b"raise", b"block"."""

    calls: list[tuple[str, bytes, float, str]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)

    def request_ticket(self, wire: bytes, now: float, *, correlation_id: str = "") -> KmsReply:
        return self._reply("request", wire, now, correlation_id)

    def resolve_ticket(self, wire: bytes, now: float, *, correlation_id: str = "") -> KmsReply:
        return self._reply("resolve", wire, now, correlation_id)

    def resolve_steps(self, wire: bytes, now: float, *, correlation_id: str = "") -> ResolveSteps:
        """What the inline server calls: b"block" waits like a federated resolve's peer
        call (off the event loop), everything else is one step."""
        if wire != b"block":
            return self._reply("resolve", wire, now, correlation_id)
        self.calls.append(("resolve", wire, now, correlation_id))
        answer = yield self._wait
        assert isinstance(answer, bytes)
        return KmsReply(Outcome.OK, data=answer)

    def _wait(self) -> bytes:
        self.entered.set()
        self.release.wait(10)
        return b"late"

    def _reply(self, kind: str, wire: bytes, now: float, cid: str) -> KmsReply:
        self.calls.append((kind, wire, now, cid))
        if wire == b"raise" or wire.startswith(SECRET):
            raise ValueError(f"boom while parsing {wire!r}")  # text quotes the request
        if wire == b"block":
            self.entered.set()
            self.release.wait(10)
            return KmsReply(Outcome.OK, data=b"late")
        if wire == b"ok":
            return KmsReply(Outcome.OK, data=b"RESP:" + kind.encode())
        outcome = Outcome(wire.decode())
        return KmsReply(
            outcome,
            error_message=b"ERRMSG\x00\xff" + outcome.value.encode(),
            detail=f"{outcome.value} because\nreasons",
        )


@pytest.fixture
def handler() -> ScriptedHandler:
    return ScriptedHandler()


@pytest.fixture(params=["inline", "threads"])
def server(
    handler: ScriptedHandler, free_port: Any, request: pytest.FixtureRequest
) -> Iterator[KmsServer]:
    s = KmsServer(handler, f"127.0.0.1:{free_port()}", clock=lambda: NOW,
                  core_threads=0 if request.param == "inline" else 4)
    assert s.inline is (request.param == "inline")
    try:
        s.start()
        yield s
    finally:
        handler.release.set()
        s.stop()


@pytest.fixture
def target(server: KmsServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture
def stub(target: str) -> Iterator[Any]:
    with grpc.insecure_channel(target) as channel:
        yield rpc.client_stub(channel)


def call(stub: Any, data: bytes, method: str = "RequestTicket", **kw: Any) -> Any:
    """-> (response or None, code, details, initial metadata, trailing metadata)."""
    multi = getattr(stub, method)
    try:
        resp, c = multi.with_call(rpc.MikeyMessage(data=data), timeout=5, **kw)
    except grpc.RpcError as err:
        e: Any = err
        return (None, e.code(), e.details(), dict(e.initial_metadata()),
                dict(e.trailing_metadata()))
    return resp, c.code(), c.details(), dict(c.initial_metadata()), dict(c.trailing_metadata())


@pytest.mark.parametrize("method", ["RequestTicket", "ResolveTicket"])
def test_ok_returns_reply_bytes_and_passes_time_and_cid(
    stub: Any, handler: ScriptedHandler, method: str
) -> None:
    resp, code, _details, initial, trailing = call(stub, b"ok", method)
    kind = "request" if method == "RequestTicket" else "resolve"
    assert code is grpc.StatusCode.OK
    assert resp.data == b"RESP:" + kind.encode()
    assert ERROR_TRAILER not in trailing
    [(got_kind, wire, now, cid)] = handler.calls
    assert (got_kind, wire, now) == (kind, b"ok", NOW)
    assert uuid.UUID(hex=cid).version == 4 and uuid.UUID(hex=cid).hex == cid  # fresh uuid4 hex
    assert initial["x-correlation-id"] == cid == trailing["x-correlation-id"]


EXPECTED = {
    Outcome.MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    Outcome.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Outcome.DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Outcome.PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Outcome.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Outcome.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Outcome.INTERNAL: grpc.StatusCode.INTERNAL,
    # Only a cancelled call gets it, and its client is gone; the mapping is still one.
    Outcome.CANCELLED: grpc.StatusCode.CANCELLED,
}


def test_every_refusal_outcome_is_mapped() -> None:
    assert set(EXPECTED) == set(Outcome) - {Outcome.OK}


@pytest.mark.parametrize("outcome", list(EXPECTED))
@pytest.mark.parametrize("method", ["RequestTicket", "ResolveTicket"])
def test_refusal_status_details_and_error_trailer(
    stub: Any, outcome: Outcome, method: str
) -> None:
    resp, code, details, initial, trailing = call(stub, outcome.value.encode(), method)
    assert resp is None
    assert code is EXPECTED[outcome]
    if outcome is Outcome.INTERNAL:
        assert details == "internal error"  # INTERNAL never carries the core's detail
    else:
        assert details == f"{outcome.value} because reasons"  # one line
    assert trailing[ERROR_TRAILER] == b"ERRMSG\x00\xff" + outcome.value.encode()
    assert trailing["x-correlation-id"] == initial["x-correlation-id"]


def test_refusal_without_error_message_has_no_trailer(free_port: Any) -> None:
    class NoErr:
        def request_ticket(self, wire: bytes, now: float, *, correlation_id: str = "") -> Any:
            return KmsReply(Outcome.DENIED, detail="")

        resolve_ticket = request_ticket

    s = KmsServer(NoErr(), f"127.0.0.1:{free_port()}")
    s.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{s.port}") as ch:
            _, code, details, _, trailing = call(rpc.client_stub(ch), b"x")
    finally:
        s.stop()
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert details == "permission_denied"  # never an empty status message
    assert ERROR_TRAILER not in trailing


def test_client_correlation_id_is_echoed_sanitised_and_bounded(
    stub: Any, handler: ScriptedHandler
) -> None:
    _, _, _, initial, trailing = call(stub, b"ok", metadata=(("x-correlation-id", "abc-123.X:y"),))
    assert initial["x-correlation-id"] == trailing["x-correlation-id"] == "abc-123.X:y"
    assert handler.calls[-1][3] == "abc-123.X:y"

    _, _, _, initial, _ = call(stub, b"ok", metadata=(("x-correlation-id", "a b\"c{}" + "z" * 99),))
    assert initial["x-correlation-id"] == "abc" + "z" * 61
    assert handler.calls[-1][3] == "abc" + "z" * 61

    _, _, _, initial, _ = call(stub, b"ok", metadata=(("x-correlation-id", "  {} "),))
    assert len(initial["x-correlation-id"]) == 32  # nothing usable: a fresh one


def test_correlation_id_function() -> None:
    assert correlation_id([("x-correlation-id", "ok-1")]) == "ok-1"
    assert correlation_id([("other", "v"), ("x-correlation-id", "a\nb")]) == "ab"
    assert len(correlation_id(None)) == 32
    assert correlation_id(None) != correlation_id(None)


def test_handler_exception_is_internal_without_leaking(
    stub: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="kms.server.grpc")
    _, code, details, initial, trailing = call(
        stub, SECRET, metadata=(("x-correlation-id", "cid-boom"),)
    )
    assert code is grpc.StatusCode.INTERNAL
    assert details == "internal error"
    assert trailing["x-correlation-id"] == initial["x-correlation-id"] == "cid-boom"
    assert ERROR_TRAILER not in trailing
    [rec] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert rec.getMessage() == "handler raised ValueError"
    assert rec.fields["correlation_id"] == "cid-boom"  # type: ignore[attr-defined]
    logged = caplog.text + repr([r.__dict__ for r in caplog.records])
    assert "never-log-this" not in logged
    assert "boom while" not in logged
    # The server keeps working after a handler bug.
    assert call(stub, b"ok")[1] is grpc.StatusCode.OK


def test_handler_returning_garbage_is_internal(free_port: Any) -> None:
    class Bad:
        def request_ticket(self, wire: bytes, now: float, *, correlation_id: str = "") -> Any:
            return b"not a reply"

        resolve_ticket = request_ticket

    s = KmsServer(Bad(), f"127.0.0.1:{free_port()}")
    s.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{s.port}") as ch:
            _, code, details, _, _ = call(rpc.client_stub(ch), b"x")
    finally:
        s.stop()
    assert (code, details) == (grpc.StatusCode.INTERNAL, "internal error")


def test_oversize_request_rejected(stub: Any, handler: ScriptedHandler) -> None:
    _, code, _, _, _ = call(stub, b"\0" * (MAX_REQUEST_BYTES + 1))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert handler.calls == []
    # Just under the limit (framing included) still reaches the handler.
    _, code, _, _, _ = call(stub, b"ok")
    assert code is grpc.StatusCode.OK


def test_health_serving_for_both_names(target: str, health_status: Any) -> None:
    assert health_status(target, "") == "SERVING"
    assert health_status(target, "mikey.kms.v1.KeyManagement") == "SERVING"
    with pytest.raises(grpc.RpcError) as exc:
        health_status(target, "no.such.Service")
    assert exc.value.code() is grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_reflection_lists_and_describes_the_service(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reqs = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="mikey.kms.v1.KeyManagement"
            ),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(reqs), timeout=5))
    names = {s.name for s in listed.list_services_response.service}
    assert {"mikey.kms.v1.KeyManagement", "grpc.health.v1.Health"} <= names
    from google.protobuf import descriptor_pb2

    fd = descriptor_pb2.FileDescriptorProto.FromString(
        described.file_descriptor_response.file_descriptor_proto[0]
    )
    assert fd.name == "mikey/kms/v1/kms.proto"
    assert fd.package == "mikey.kms.v1"
    [svc] = fd.service
    assert [(m.name, m.input_type, m.output_type) for m in svc.method] == [
        ("RequestTicket", ".mikey.kms.v1.MikeyMessage", ".mikey.kms.v1.MikeyMessage"),
        ("ResolveTicket", ".mikey.kms.v1.MikeyMessage", ".mikey.kms.v1.MikeyMessage"),
    ]
    [msg] = fd.message_type
    assert [(f.name, f.number, f.type) for f in msg.field] == [
        ("data", 1, descriptor_pb2.FieldDescriptorProto.TYPE_BYTES)
    ]


def test_drain_finishes_inflight_refuses_new_and_ends_watches(
    server: KmsServer, handler: ScriptedHandler, target: str
) -> None:
    channel = grpc.insecure_channel(target)
    stub = rpc.client_stub(channel)
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service="mikey.kms.v1.KeyManagement"), timeout=10
    )
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    # On the inline server a call is in flight while it waits off the loop (a federated
    # resolve's peer call); on the threaded one while its thread computes.
    slow = stub.ResolveTicket.future(rpc.MikeyMessage(data=b"block"), timeout=10)
    assert handler.entered.wait(5)

    result: list[bool] = []
    drainer = threading.Thread(target=lambda: result.append(server.drain(8.0)))
    t0 = time.monotonic()
    drainer.start()
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    # New calls are refused while the old one is still running: UNAVAILABLE from our servicer
    # while draining, or CANCELLED from gRPC core once server.stop() has run (a race we do not
    # control). Either way the handler never runs.
    with grpc.insecure_channel(target) as fresh:
        _, code, _, _, _ = call(rpc.client_stub(fresh), b"ok")
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert slow.running()
    handler.release.set()
    assert slow.result().data == b"late"  # the in-flight call completed normally
    drainer.join(10)
    assert result == [True]
    # The open Watch did not hold the shutdown for the whole grace period.
    assert time.monotonic() - t0 < 5
    channel.close()


def test_drain_cuts_off_calls_that_outlive_the_grace(
    server: KmsServer, handler: ScriptedHandler, stub: Any
) -> None:
    slow = stub.ResolveTicket.future(rpc.MikeyMessage(data=b"block"), timeout=10)
    assert handler.entered.wait(5)
    t0 = time.monotonic()
    assert server.drain(0.5) is False
    assert time.monotonic() - t0 < 3
    with pytest.raises(grpc.RpcError):
        slow.result()


def test_steps_that_ignore_a_cancel_leave_the_server_serving(
    stub: Any, handler: ScriptedHandler, server: KmsServer
) -> None:
    """A handler's own steps that do not answer a cancellation (no core behind them): the
    cancellation still ends the call, and nothing escapes the adapter."""
    pending = stub.ResolveTicket.future(rpc.MikeyMessage(data=b"block"), timeout=10)
    assert handler.entered.wait(5)
    assert pending.cancel()
    resp, code, *_ = call(stub, b"ok")
    assert code is grpc.StatusCode.OK and resp.data == b"RESP:request"
    handler.release.set()
    resp, code, *_ = call(stub, b"ok", "ResolveTicket")
    assert code is grpc.StatusCode.OK and resp.data == b"RESP:resolve"


def test_port_in_use_is_a_one_line_error(server: KmsServer) -> None:
    with pytest.raises(ServerError, match=r"^cannot listen on 127\.0\.0\.1:\d+ \(address in use"):
        KmsServer(ScriptedHandler(), f"127.0.0.1:{server.port}")
