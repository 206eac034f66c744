"""GrpcPeerResolver (kms.server.federation) against small in-process gRPC servers: metadata,
status mapping, bounded retries, one deadline for every attempt, mutual TLS and when
plaintext is allowed; ``mikey-hops`` parsing and the [federation] settings of kms.toml."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from kms import rpc
from kms.core.ports import PeerError, PeerKms
from kms.server.config import ConfigError, parse_config
from kms.server.federation import ClientIdentity, GrpcPeerResolver, PeerRoute
from kms.server.grpc_server import peer_hops
from tests.federation.pki import TestCa

PEER = PeerKms(kms_id=b"kms:a.example", psk=None, deadline_s=1.0)

Behaviour = Callable[[bytes, Any], bytes]


class FakePeer:
    """A KeyManagement server whose ResolveTicket does what ``behaviour`` says."""

    def __init__(self, behaviour: Behaviour, creds: grpc.ServerCredentials | None = None) -> None:
        self.behaviour = behaviour
        self.calls: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._pool = futures.ThreadPoolExecutor(max_workers=4)
        self.server = grpc.server(self._pool)
        try:
            rpc.add_servicer(self, self.server)
            if creds is None:
                self.port = self.server.add_insecure_port("127.0.0.1:0")
            else:
                self.port = self.server.add_secure_port("127.0.0.1:0", creds)
            self.address = f"127.0.0.1:{self.port}"
            self.server.start()
        except BaseException:
            self.stop()
            raise

    def ResolveTicket(self, request: Any, context: Any) -> Any:
        with self._lock:
            self.calls.append({k: v for k, v in context.invocation_metadata()})
        return rpc.MikeyMessage(data=self.behaviour(request.data, context))

    def RequestTicket(self, request: Any, context: Any) -> Any:  # pragma: no cover
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "no")

    def stop(self) -> None:
        self.server.stop(None).wait(5)
        self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def fake() -> Iterator[Callable[..., FakePeer]]:
    with contextlib.ExitStack() as stack:  # every peer made is stopped, even if one fails

        def make(behaviour: Behaviour, creds: grpc.ServerCredentials | None = None) -> FakePeer:
            f = FakePeer(behaviour, creds)
            stack.callback(f.stop)
            return f

        yield make


def plaintext_resolver(address: str, **kw: Any) -> GrpcPeerResolver:
    return GrpcPeerResolver(
        lambda _id: PeerRoute(address), allow_plaintext=True, backoff_s=0.01, **kw
    )


def test_answer_and_metadata(fake: Callable[..., FakePeer]) -> None:
    peer = fake(lambda data, _ctx: b"resp:" + data)
    r = plaintext_resolver(peer.address)
    try:
        assert r.forward_resolve(PEER, b"init", correlation_id="cid-1", hops=1) == b"resp:init"
    finally:
        r.close()
    assert peer.calls[0]["x-correlation-id"] == "cid-1"
    assert peer.calls[0]["mikey-hops"] == "1"


def test_refusal_is_mapped_with_error_trailer_and_not_retried(
    fake: Callable[..., FakePeer],
) -> None:
    def refuse(_data: bytes, ctx: Any) -> bytes:
        ctx.set_trailing_metadata((("mikey-error-bin", b"\x01\x02"),))
        ctx.abort(grpc.StatusCode.PERMISSION_DENIED, "peer KMS may not resolve for this identity")
        return b""

    peer = fake(refuse)
    r = plaintext_resolver(peer.address, max_retries=3)
    with pytest.raises(PeerError) as info:
        r.forward_resolve(PEER, b"x", correlation_id="c", hops=1)
    r.close()
    e = info.value
    assert (e.kind, e.status) == ("refused", "PERMISSION_DENIED")
    assert e.error_message == b"\x01\x02"
    assert "may not resolve" in e.detail
    assert len(peer.calls) == 1


def test_unavailable_is_retried_a_bounded_number_of_times(
    fake: Callable[..., FakePeer],
) -> None:
    def down(_data: bytes, ctx: Any) -> bytes:
        ctx.abort(grpc.StatusCode.UNAVAILABLE, "token unavailable")
        return b""

    peer = fake(down)
    r = plaintext_resolver(peer.address, max_retries=2)
    with pytest.raises(PeerError) as info:
        r.forward_resolve(PEER, b"x", correlation_id="c", hops=1)
    r.close()
    assert info.value.kind == "unavailable"
    assert len(peer.calls) == 3  # one attempt and two retries, no more


def test_slow_peer_costs_one_deadline_for_all_attempts(fake: Callable[..., FakePeer]) -> None:
    release = threading.Event()

    def slow(_data: bytes, _ctx: Any) -> bytes:
        release.wait(5)
        return b"late"

    peer = fake(slow)
    r = plaintext_resolver(peer.address, max_retries=3)
    t0 = time.monotonic()
    with pytest.raises(PeerError) as info:
        r.forward_resolve(PEER, b"x", correlation_id="c", hops=1)
    elapsed = time.monotonic() - t0
    release.set()
    r.close()
    assert info.value.kind == "unavailable"
    assert "DEADLINE_EXCEEDED" in info.value.detail
    assert 0.9 < elapsed < 1.5
    assert len(peer.calls) == 1  # DEADLINE_EXCEEDED is not retried: the time is spent


def test_dead_peer_is_unavailable_within_the_deadline(fake: Callable[..., FakePeer]) -> None:
    peer = fake(lambda d, _c: d)
    address = peer.address
    peer.stop()
    r = plaintext_resolver(address, max_retries=1)
    t0 = time.monotonic()
    with pytest.raises(PeerError) as info:
        r.forward_resolve(PEER, b"x", correlation_id="c", hops=1)
    r.close()
    assert info.value.kind == "unavailable"
    assert time.monotonic() - t0 < PEER.deadline_s + 0.5


def test_unknown_route_and_bad_address_are_unavailable() -> None:
    r = GrpcPeerResolver(lambda _id: None)
    with pytest.raises(PeerError, match="no longer registered"):
        r.forward_resolve(PEER, b"x", correlation_id="c", hops=1)
    r = GrpcPeerResolver(lambda _id: PeerRoute("no port"))
    with pytest.raises(PeerError, match="bad address"):
        r.forward_resolve(PEER, b"x", correlation_id="c", hops=1)


def test_plaintext_needs_loopback_allow_and_no_ca(fake: Callable[..., FakePeer]) -> None:
    peer = fake(lambda d, _c: d)
    # Not allowed: TLS is required, and without a client certificate mutual TLS cannot start.
    r = GrpcPeerResolver(lambda _id: PeerRoute(peer.address))
    with pytest.raises(PeerError, match="no client certificate for mutual TLS"):
        r.forward_resolve(PEER, b"x", correlation_id="c", hops=1)
    assert peer.calls == []


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCa:
    return TestCa(tmp_path_factory.mktemp("pki"))


def test_mutual_tls(fake: Callable[..., FakePeer], ca: TestCa, tmp_path: Path) -> None:
    server = ca.issue("kms-a")
    client = ca.issue("kms-b")
    creds = grpc.ssl_server_credentials(
        [(server.key_pem, server.cert_pem)],
        root_certificates=ca.path.read_bytes(),
        require_client_auth=True,
    )
    peer = fake(lambda d, _c: b"tls:" + d, creds)
    route = PeerRoute(peer.address, ca.path.read_bytes())
    ident = ClientIdentity(client.cert_pem, client.key_pem)
    # allow_plaintext does not matter once the peer has a CA: TLS it is.
    r = GrpcPeerResolver(lambda _id: route, client=ident, allow_plaintext=True)
    try:
        assert r.forward_resolve(PEER, b"x", correlation_id="c", hops=1) == b"tls:x"
    finally:
        r.close()

    # A server certificate from another CA is not the peer: unavailable, nothing sent.
    other = TestCa(tmp_path / "other", "other CA")
    r = GrpcPeerResolver(lambda _id: PeerRoute(peer.address, other.path.read_bytes()), client=ident)
    with pytest.raises(PeerError) as info:
        r.forward_resolve(PEER, b"y", correlation_id="c", hops=1)
    r.close()
    assert info.value.kind == "unavailable"
    # A client certificate from another CA is refused by the peer's TLS server.
    stranger = other.issue("stranger")
    r = GrpcPeerResolver(
        lambda _id: route, client=ClientIdentity(stranger.cert_pem, stranger.key_pem)
    )
    with pytest.raises(PeerError) as info:
        r.forward_resolve(PEER, b"z", correlation_id="c", hops=1)
    r.close()
    assert info.value.kind == "unavailable"
    assert len(peer.calls) == 1


@pytest.mark.parametrize(
    ("metadata", "hops"),
    [
        ((), 0),
        ((("mikey-hops", "1"),), 1),
        ((("mikey-hops", "3"),), 3),
        ((("mikey-hops", "999"),), 8),
        ((("mikey-hops", "-1"),), 8),
        ((("mikey-hops", "one"),), 8),
        ((("mikey-hops", "\u00b2"),), 8),
        ((("mikey-hops", "1234"),), 8),
        ((("x-correlation-id", "5"),), 0),
    ],
)
def test_peer_hops_metadata(metadata: tuple[tuple[str, str], ...], hops: int) -> None:
    assert peer_hops(metadata) == hops


BASE = """
[kms]
id = "kms:a.example"
[token]
module = "/m.so"
label = "t"
pin_env = "PIN"
"""


def test_federation_settings(tmp_path: Path) -> None:
    cfg = parse_config(BASE, tmp_path)
    f = cfg.federation
    assert (f.client_cert, f.allow_plaintext, f.max_retries, f.default_deadline_ms) == (
        None, False, 1, 2000,
    )  # fmt: skip
    cfg = parse_config(
        BASE + '[federation]\nclient_cert = "c.pem"\nclient_key = "c.key"\n'
        "allow_plaintext = true\nmax_retries = 0\ndefault_deadline_ms = 500\n",
        tmp_path,
    )
    assert cfg.federation.client_cert == tmp_path / "c.pem"
    assert cfg.federation.allow_plaintext is True
    assert cfg.federation.max_retries == 0
    assert cfg.federation.default_deadline_ms == 500


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('client_cert = "c.pem"\n', r"\[federation\] client_key: .* given together"),
        ("max_retries = 9\n", r"\[federation\] max_retries: must be an integer in 0..5"),
        ("default_deadline_ms = 0\n", r"\[federation\] default_deadline_ms: must be"),
        ('allow_plaintext = "yes"\n', r"\[federation\] allow_plaintext: must be true or false"),
        ("retries = 1\n", r"\[federation\] retries: unknown key"),
    ],
)
def test_federation_settings_refused(tmp_path: Path, section: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(BASE + "[federation]\n" + section, tmp_path)
