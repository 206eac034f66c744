"""A peer KMS that is a cluster: its address lists several replicas (or one DNS name with a
record per replica); forwarded resolves are spread over them and a replica that is down is
skipped."""

from __future__ import annotations

import socket
from collections.abc import Callable

import grpc
import pytest

from kms.core.ports import PeerKms
from kms.server.federation import GrpcPeerResolver, PeerRoute, peer_target
from tests.federation.test_resolver import FakePeer, fake  # noqa: F401  (fixture)

PEER = PeerKms(kms_id=b"kms:b.example.org", psk=None, deadline_s=3.0)


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed again: connection refused


def test_peer_target_forms() -> None:
    assert peer_target("kms-b.example.org:50051") == (
        "kms-b.example.org:50051", ["kms-b.example.org"])
    assert peer_target("10.0.0.1:1, 10.0.0.2:2") == ("ipv4:10.0.0.1:1,10.0.0.2:2",
                                                     ["10.0.0.1", "10.0.0.2"])
    assert peer_target("[::1]:1,[::2]:2")[0] == "ipv6:[::1]:1,[::2]:2"
    for bad in ("a.example:1,b.example:2", "10.0.0.1:1,[::1]:2", "nope", "10.0.0.1:1,"):
        with pytest.raises(ValueError):  # noqa: PT011
            peer_target(bad)


def test_resolves_spread_over_replicas_and_skip_a_dead_one(
    fake: Callable[..., FakePeer],  # noqa: F811
) -> None:
    a = fake(lambda data, _ctx: b"a:" + data)
    b = fake(lambda data, _ctx: b"b:" + data)
    address = ",".join([a.address, dead_address(), b.address])
    r = GrpcPeerResolver(lambda _id: PeerRoute(address), allow_plaintext=True, backoff_s=0.01)
    try:
        answers = [r.forward_resolve(PEER, b"m%d" % i, correlation_id="c", hops=0)
                   for i in range(8)]
    finally:
        r.close()
    assert {x[:2] for x in answers} == {b"a:", b"b:"}  # both live replicas served
    assert len(a.calls) + len(b.calls) == 8


def test_retry_after_a_replica_failed_mid_call_sends_a_fresh_message(
    fake: Callable[..., FakePeer],  # noqa: F811
) -> None:
    """The first replica took the message and failed (UNAVAILABLE): it may have stored it in
    the shared replay cache, so the retry must be a freshly built message."""
    seen: list[bytes] = []

    def flaky(data: bytes, ctx: object) -> bytes:
        seen.append(data)
        if len(seen) == 1:
            ctx.abort(grpc.StatusCode.UNAVAILABLE, "replica went away")  # type: ignore[attr-defined]
        return b"ok:" + data

    peer = fake(flaky)
    fresh = iter([b"second", b"third"])
    r = GrpcPeerResolver(lambda _id: PeerRoute(peer.address), allow_plaintext=True,
                         backoff_s=0.01, max_retries=2)
    try:
        answer = r.forward_resolve(PEER, b"first", correlation_id="c", hops=0,
                                   rebuild=lambda: next(fresh))
    finally:
        r.close()
    assert seen == [b"first", b"second"]
    assert answer == b"ok:second"
