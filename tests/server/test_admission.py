"""The call guard: request-arrival timeout, shedding of waiting calls, per-peer admission,
and the transport limits (streams per connection, metadata size), on a real gRPC server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from kms import rpc
from kms.server.admission import CallGuard, Limits, peer_address
from kms.server.grpc_server import SERVICE_NAME, KmsServer
from tests.server.test_grpc_adapter import ScriptedHandler

OWN = [("grpc.use_local_subchannel_pool", 1)]


class FakeCall:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


def test_peer_address_drops_the_port() -> None:
    assert peer_address("ipv4:127.0.0.1:5000") == "ipv4:127.0.0.1"
    assert peer_address("ipv6:[::1]:5000") == "ipv6:[::1]"
    assert peer_address("unix:/tmp/s") == "unix:/tmp/s"


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="request_timeout_s"):
        Limits(request_timeout_s=0)
    with pytest.raises(ValueError, match="max_waiting"):
        Limits(max_waiting=0)


def test_waiting_call_is_cancelled_after_the_timeout() -> None:
    async def run() -> CallGuard:
        guard = CallGuard(Limits(request_timeout_s=0.2))
        slow, fast = FakeCall(), FakeCall()
        t_slow = guard.waiting(slow, "p")
        t_fast = guard.waiting(fast, "p")
        assert guard.received(t_fast)  # its request arrived in time
        for _ in range(100):
            if slow.cancelled.is_set():
                break
            await asyncio.sleep(0.05)
        assert slow.cancelled.is_set()
        assert not fast.cancelled.is_set()
        assert not guard.received(t_slow)  # the guard had cancelled it
        guard.stop()
        return guard

    guard = asyncio.run(run())
    assert guard.counters["request_timeouts"] == 1
    assert guard.waiting_count == 0


def test_shedding_takes_the_oldest_call_of_the_address_with_most_waiting() -> None:
    async def run() -> None:
        guard = CallGuard(Limits(request_timeout_s=60, max_waiting=4))
        legit = FakeCall()
        guard.waiting(legit, "client")  # the oldest of all
        a = [FakeCall() for _ in range(3)]
        for call in a:
            guard.waiting(call, "attacker")
        assert not any(c.cancelled.is_set() for c in [legit, *a])  # 4: at the bound
        others = [FakeCall() for _ in range(2)]
        for i, call in enumerate(others):
            guard.waiting(call, f"other-{i}")
        # 6 > 4 twice: the attacker holds the most waiting calls; its oldest go, not the
        # older call of the client.
        assert [c.cancelled.is_set() for c in a] == [True, True, False]
        assert not legit.cancelled.is_set()
        assert not any(c.cancelled.is_set() for c in others)
        # Now every address has one waiting: the oldest of all goes.
        guard.waiting(FakeCall(), "late")
        assert legit.cancelled.is_set()
        assert guard.counters["shed_waiting"] == 3
        assert guard.waiting_count == 4
        assert guard.peak_waiting_per_peer == 3
        guard.stop()

    asyncio.run(run())


def test_calls_per_peer_are_bounded() -> None:
    guard = CallGuard(Limits(max_calls_per_peer=2))
    try:
        assert guard.admit("p") and guard.admit("p")
        assert not guard.admit("p")
        assert guard.admit("q")  # another address is not affected
        guard.leave("p")
        assert guard.admit("p")
        assert guard.counters["refused_peer_limit"] == 1
    finally:
        guard.stop()


@pytest.fixture
def small_server(free_port: Any) -> Iterator[KmsServer]:
    limits = Limits(request_timeout_s=0.5, max_waiting=8, max_calls_per_peer=8,
                    max_streams_per_connection=4)
    s = KmsServer(ScriptedHandler(), f"127.0.0.1:{free_port()}", limits=limits, threads=16)
    try:
        s.start()
        yield s
    finally:
        s.stop()


def never(stop: threading.Event) -> Iterator[Any]:
    stop.wait()
    return
    yield


def test_stalled_call_is_cancelled_and_others_served(small_server: KmsServer) -> None:
    target = f"127.0.0.1:{small_server.port}"
    stop = threading.Event()
    with grpc.insecure_channel(target, options=OWN) as attacker, grpc.insecure_channel(
        target, options=OWN
    ) as victim:
        method = attacker.stream_unary(f"/{SERVICE_NAME}/RequestTicket")
        futures = [method.future(never(stop)) for _ in range(20)]  # > 16 admitted calls
        stub = rpc.client_stub(victim)
        for _ in range(5):
            assert stub.RequestTicket(rpc.MikeyMessage(data=b"ok"), timeout=5).data
        for f in futures:
            assert f.exception(timeout=10) is not None
            assert f.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        stop.set()
    counters = small_server.guard.counters
    assert counters["shed_waiting"] + counters["request_timeouts"] >= 1
    assert small_server.guard.waiting_count == 0


def test_unary_client_still_works_and_empty_stream_is_invalid(small_server: KmsServer) -> None:
    target = f"127.0.0.1:{small_server.port}"
    with grpc.insecure_channel(target) as ch:
        method = ch.stream_unary(
            f"/{SERVICE_NAME}/RequestTicket",
            request_serializer=rpc.MikeyMessage.SerializeToString,
            response_deserializer=rpc.MikeyMessage.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            method(iter(()), timeout=5)  # half-closed without a request message
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "no request message"


def test_oversized_metadata_is_refused_clearly(small_server: KmsServer) -> None:
    target = f"127.0.0.1:{small_server.port}"
    with grpc.insecure_channel(target) as ch:
        stub = rpc.client_stub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.RequestTicket(
                rpc.MikeyMessage(data=b"ok"), metadata=[("x-junk", "a" * 4096)], timeout=5
            )
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "metadata size exceeds" in (info.value.details() or "")
        # Ordinary metadata (a correlation id) is fine.
        assert stub.RequestTicket(
            rpc.MikeyMessage(data=b"ok"), metadata=[("x-correlation-id", "c" * 64)], timeout=5
        ).data


def test_many_clients_behind_one_address_are_not_cancelled(free_port: Any) -> None:
    """64 clients share one address (a proxy, or the bench) and their requests are on the
    way, not yet read, all at once. None may be cancelled (a bound of 16 waiting calls per
    address cancelled hundreds of calls per second)."""
    s = KmsServer(ScriptedHandler(), f"127.0.0.1:{free_port()}")  # default limits
    s.start()
    codes: Counter[str] = Counter()
    lock = threading.Lock()
    go = threading.Barrier(64)

    def late_request() -> Iterator[Any]:
        time.sleep(0.3)  # the request follows the call's HEADERS a moment later
        yield rpc.MikeyMessage(data=b"ok")

    def client() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{s.port}", options=OWN) as ch:
            method = ch.stream_unary(
                f"/{SERVICE_NAME}/RequestTicket",
                request_serializer=rpc.MikeyMessage.SerializeToString,
                response_deserializer=rpc.MikeyMessage.FromString,
            )
            go.wait(30)
            for _ in range(2):
                try:
                    method(late_request(), timeout=30)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    codes[code] += 1

    try:
        threads = [threading.Thread(target=client) for _ in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert codes == {"OK": 128}
        assert s.guard.counters["shed_waiting"] == 0
        # What made the old per-address bound cancel calls happened: many waiting at once.
        assert s.guard.peak_waiting_per_peer > 16
    finally:
        s.stop()


def test_health_watches_are_bounded(free_port: Any) -> None:
    """Watch streams never end by themselves: at most MAX_WATCHES per worker, so that they
    cannot take every admitted call; Check and the KMS methods stay served."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from kms.server.admission import MAX_WATCHES

    s = KmsServer(ScriptedHandler(), f"127.0.0.1:{free_port()}", threads=32)
    s.start()
    try:
        target = f"127.0.0.1:{s.port}"
        with grpc.insecure_channel(target, options=OWN) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            watches = [stub.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(24)]
            first = []
            for w in watches:
                try:
                    first.append(next(w).status)
                except grpc.RpcError as exc:
                    first.append(exc.code())
            assert first.count(health_pb2.HealthCheckResponse.SERVING) == MAX_WATCHES
            assert first.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 24 - MAX_WATCHES
            assert s.health.watches == MAX_WATCHES
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
            kms = rpc.client_stub(ch)
            assert kms.RequestTicket(rpc.MikeyMessage(data=b"ok"), timeout=5).data
            for w in watches:
                w.cancel()
        deadline = time.monotonic() + 10
        while s.health.watches and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.health.watches == 0 and s.guard.calls_of("ipv4:127.0.0.1") == 0
    finally:
        s.stop()


def test_non_protobuf_body_without_core_auditing(small_server: KmsServer) -> None:
    """A handler without ``refuse_undecodable`` still gets INVALID_ARGUMENT, counted."""
    target = f"127.0.0.1:{small_server.port}"
    with grpc.insecure_channel(target) as ch:
        raw = ch.unary_unary(f"/{SERVICE_NAME}/ResolveTicket")
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\xff\xff\xff", timeout=5)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "request is not a mikey.kms.v1.MikeyMessage"
    assert small_server.servicer.counters["undecodable_body"] == 1


@pytest.mark.parametrize("core_threads", [0, 4], ids=["inline", "threads"])
def test_calls_beyond_the_admitted_are_refused_at_once(free_port: Any, core_threads: int) -> None:
    """``maximum_concurrent_rpcs``: a call beyond the admitted ones is refused with
    RESOURCE_EXHAUSTED (no hidden queue), and served again once one has finished."""
    handler = ScriptedHandler()
    s = KmsServer(handler, f"127.0.0.1:{free_port()}", threads=4, core_threads=core_threads,
                  limits=Limits(max_calls_per_peer=64))
    s.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{s.port}", options=OWN) as ch:
            stub = rpc.client_stub(ch)
            # Four calls in flight (a peer call off the loop; or a thread computing).
            held = [stub.ResolveTicket.future(rpc.MikeyMessage(data=b"block"), timeout=20)
                    for _ in range(4)]
            deadline = time.monotonic() + 10
            while s.servicer.inflight < 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert s.servicer.inflight == 4
            with pytest.raises(grpc.RpcError) as info:
                stub.RequestTicket(rpc.MikeyMessage(data=b"ok"), timeout=5)
            assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            handler.release.set()
            assert [f.result().data for f in held] == [b"late"] * 4
            assert stub.RequestTicket(rpc.MikeyMessage(data=b"ok"), timeout=5).data
    finally:
        handler.release.set()
        s.stop()


def test_event_loop_lag_is_sampled_and_shows_a_stall(small_server: KmsServer) -> None:
    """``watch_lag`` reports, every LAG_PROBE_S, how late the loop ran a callback due then;
    a 600 ms stall of the loop (here: a blocking callback) holds the next sample, due within
    0.25 s of its start, at least 350 ms late; the server answers again afterwards."""
    lags: list[float] = []
    small_server.watch_lag(lags.append)
    deadline = time.monotonic() + 10
    while len(lags) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(lags) >= 3
    assert all(lag >= 0.0 for lag in lags)
    small_server._loop.call_soon_threadsafe(time.sleep, 0.6)
    deadline = time.monotonic() + 10
    while not any(lag >= 0.3 for lag in lags) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(lag >= 0.3 for lag in lags)
    with grpc.insecure_channel(f"127.0.0.1:{small_server.port}", options=OWN) as ch:
        assert rpc.client_stub(ch).RequestTicket(rpc.MikeyMessage(data=b"ok"), timeout=5).data
