"""The metered decorators on their own, around real parts: the key store of a SoftHSM2 token
(a home made by `kms init`), the KMS core built by the composition root, and the gRPC peer
resolver talking to small in-process KeyManagement servers; plus the [metrics] settings."""

from __future__ import annotations

import http.client
import json
import ssl
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from kms.core.api import KmsReply, Outcome
from kms.core.ports import PeerError, PeerKms
from kms.home import Home, open_home
from kms.keystore import Digest, KeyNotFound, KeyRef, KeyStore
from kms.server.compose import build_handler
from kms.server.config import ConfigError, parse_config
from kms.server.federation import GrpcPeerResolver, PeerRoute
from kms.server.metrics import ServerMetrics, key_type_label
from kms.server.metrics_http import MetricsListen, MetricsServer, exposition_registry
from kms.server.observed import ObservedHandler, ObservedKeyStore, ObservedPeers
from tests.e2e.harness import free_port, run_kms
from tests.federation.pki import TestCa
from tests.federation.test_resolver import FakePeer

PEER_A = PeerKms(kms_id=b"kms:a.example", psk=None, deadline_s=1.0)
PEER_B = PeerKms(kms_id=b"kms:b.example", psk=None, deadline_s=1.0)
PEER_DOWN = PeerKms(kms_id=b"kms:down.example", psk=None, deadline_s=0.5)


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float:
    v = reg.get_sample_value(name, labels)
    return 0.0 if v is None else v


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    path = tmp_path_factory.mktemp("ports") / "home"
    run_kms(path, "init", "--kms-id", "kms:ports.example")
    h = open_home(path)
    try:
        yield h
    finally:
        h.close()


def test_key_store_operations_are_timed_and_errors_classified(home: Home) -> None:
    reg = CollectorRegistry()
    m = ServerMetrics(reg)
    ks = ObservedKeyStore(home.keystore(), m)
    assert isinstance(ks, KeyStore)
    tpk = KeyRef(home.registry.tpk_current().key_label)  # type: ignore[union-attr]
    a = ks.hmac(tpk, b"data", Digest.SHA1)
    assert a == home.keystore().hmac(tpk, b"data", Digest.SHA1)  # same answers
    ks.prf_many(tpk, [(b"label-1", 16), (b"label-2", 32)], Digest.SHA1)
    assert len(ks.random(8)) == 8
    with pytest.raises(KeyNotFound):
        ks.hmac(KeyRef("psk/nobody"), b"x", Digest.SHA1)
    assert sample(reg, "kms_token_operation_duration_seconds_count", operation="hmac") == 2
    assert sample(reg, "kms_token_operation_duration_seconds_count", operation="prf_many") == 1
    assert sample(reg, "kms_token_operation_duration_seconds_count", operation="random") == 1
    assert sample(reg, "kms_token_operation_errors_total", operation="hmac",
                  error="not_found") == 1
    # A missing key is an answer from the token: it is up, and never went down.
    assert ks.probe() is True
    assert sample(reg, "kms_token_up") == 1
    assert sample(reg, "kms_token_reconnects_total") == 0
    # Key labels never become label values.
    for metric in reg.collect():
        for s in metric.samples:
            assert not any("psk/" in v or "tpk/" in v for v in s.labels.values()), s


def test_handler_counts_calls_from_the_core(home: Home) -> None:
    reg = CollectorRegistry()
    m = ServerMetrics(reg)
    handler = ObservedHandler(build_handler(home, keystore=ObservedKeyStore(home.keystore(), m)), m)
    r = handler.request_ticket(b"\x01garbage", time.time(), correlation_id="c1")
    assert r.outcome is Outcome.MALFORMED
    # ``hops`` (set by the gRPC adapter for forwarded resolves) passes through.
    r = handler.resolve_ticket(b"\x01garbage", time.time(), correlation_id="c2", hops=1)
    assert r.outcome is Outcome.MALFORMED
    calls = [(s.labels, s.value) for f in reg.collect() for s in f.samples
             if s.name == "kms_calls_total"]
    for method in ("RequestTicket", "ResolveTicket"):
        [(labels, n)] = [(ls, v) for ls, v in calls if ls["method"] == method]
        assert n == 1
        assert (labels["outcome"], labels["code"]) == ("malformed", "INVALID_ARGUMENT")
        # The core answers with a MIKEY error message; its error number is the label.
        assert labels["mikey_error"].isdigit() and 0 <= int(labels["mikey_error"]) <= 15
        assert sample(reg, "kms_call_duration_seconds_count", method=method) == 1
    # An undecodable resolve never got to a ticket: not a resolve.
    assert sample(reg, "kms_resolves_total", path="local", result="refused") == 0


def test_federation_calls_by_peer_and_outcome() -> None:
    def answer(data: bytes, _ctx: Any) -> bytes:
        return b"resp:" + data

    def refuse(_data: bytes, ctx: Any) -> bytes:
        ctx.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
        return b""

    good, bad = FakePeer(answer), FakePeer(refuse)
    routes = {PEER_A.kms_id: good.address, PEER_B.kms_id: bad.address,
              PEER_DOWN.kms_id: f"127.0.0.1:{free_port()}"}
    reg = CollectorRegistry()
    m = ServerMetrics(reg)
    inner = GrpcPeerResolver(lambda kms_id: PeerRoute(routes[kms_id]), allow_plaintext=True,
                             backoff_s=0.01, max_retries=0)
    peers = ObservedPeers(inner, m)
    try:
        assert peers.forward_resolve(PEER_A, b"x", correlation_id="c", hops=1) == b"resp:x"
        assert peers.forward_resolve(PEER_A, b"y", correlation_id="c", hops=1) == b"resp:y"
        with pytest.raises(PeerError) as refused:
            peers.forward_resolve(PEER_B, b"x", correlation_id="c", hops=1)
        assert refused.value.kind == "refused"
        with pytest.raises(PeerError) as down:
            peers.forward_resolve(PEER_DOWN, b"x", correlation_id="c", hops=1)
        assert down.value.kind == "unavailable"
    finally:
        inner.close()
        good.stop()
        bad.stop()
    assert sample(reg, "kms_federation_calls_total", peer="kms:a.example", outcome="ok") == 2
    assert sample(reg, "kms_federation_calls_total", peer="kms:b.example",
                  outcome="refused") == 1
    assert sample(reg, "kms_federation_calls_total", peer="kms:down.example",
                  outcome="unavailable") == 1
    assert sample(reg, "kms_federation_peer_up", peer="kms:a.example") == 1
    assert sample(reg, "kms_federation_peer_up", peer="kms:b.example") == 1  # it answered
    assert sample(reg, "kms_federation_peer_up", peer="kms:down.example") == 0
    assert sample(reg, "kms_federation_call_duration_seconds_count", peer="kms:a.example") == 2


def test_key_type_label_is_bounded() -> None:
    assert key_type_label(["TGK", "TGK_SALT"]) == "tgk"
    assert key_type_label(["TEK", "TGK"]) == "tek+tgk"
    assert key_type_label(["GTGK"]) == "gtgk"
    assert key_type_label(["WHATEVER"]) == "other"
    assert key_type_label(None) == "none"


def test_node_key_requests_by_role_and_outcome() -> None:
    """Intermediate nodes (RFC 6043 11.1): releases and refusals by role, bounded labels."""
    reg = CollectorRegistry()
    metrics = ServerMetrics(reg)
    released = {"node": "sip:rec@x", "role": "recorder", "event": "ticket.node_keys",
                "ticket_id": "00" * 16}  # fmt: skip
    metrics.observe_call("resolve_ticket", KmsReply(Outcome.OK, b"x", audit=released), 0.001)
    refused = {"node": "sip:who@x", "event": "refused", "error_no": 7}
    metrics.observe_call("resolve_ticket", KmsReply(Outcome.UNAUTHENTICATED, audit=refused), 0.001)
    bogus = {"node": "sip:b@x", "role": "spy", "event": "refused"}
    metrics.observe_call("resolve_ticket", KmsReply(Outcome.DENIED, audit=bogus), 0.001)
    metrics.observe_call("resolve_ticket", KmsReply(Outcome.OK, b"x", audit={}), 0.001)
    name = "kms_node_key_requests_total"
    assert sample(reg, name, role="recorder", outcome="released") == 1
    assert sample(reg, name, role="unknown", outcome="refused") == 2
    assert sample(reg, name, role="recorder", outcome="refused") == 0


BASE = '[kms]\nid = "kms:x"\n[token]\nmodule = "m.so"\nlabel = "t"\npin_env = "P"\n'


def test_metrics_settings(tmp_path: Path) -> None:
    c = parse_config(BASE, tmp_path)
    assert c.metrics.listen is None and not c.metrics.enabled
    c = parse_config(BASE + '[metrics]\nlisten = "127.0.0.1:9464"\ntpk_max_age_s = 3600\n',
                     tmp_path)
    assert c.metrics.enabled and c.metrics.tpk_max_age_s == 3600
    c = parse_config(BASE + '[metrics]\nlisten = "0.0.0.0:9464"\ntls_cert = "m.pem"\n'
                     'tls_key = "m.key"\n', tmp_path)
    assert c.metrics.tls_cert == tmp_path / "m.pem"
    c = parse_config(BASE + '[metrics]\nlisten = "0.0.0.0:9464"\n'
                     "allow_plaintext_non_loopback = true\n", tmp_path)
    assert c.metrics.listen == "0.0.0.0:9464"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('listen = "0.0.0.0:9464"', "[metrics] listen: 0.0.0.0:9464 is not a loopback address"),
        ('listen = "nonsense"', "[metrics] listen: expected HOST:PORT"),
        ('tls_cert = "m.pem"', "[metrics] tls_key: tls_cert and tls_key must be given together"),
        ("tpk_max_age_s = 0", "[metrics] tpk_max_age_s: must be an integer in 60.."),
        ("port = 9464", "[metrics] port: unknown key"),
    ],
)
def test_metrics_settings_refused(tmp_path: Path, section: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + "[metrics]\n" + section + "\n", tmp_path)
    assert message in str(info.value)


def test_serve_refuses_plain_metrics_off_loopback_and_a_busy_port(home: Home) -> None:
    r = run_kms(home.path, "serve", "--listen", f"127.0.0.1:{free_port()}",
                "--metrics-listen", "0.0.0.0:9464", check=False)
    assert r.returncode == 1
    assert "kms: error: --metrics-listen: 0.0.0.0:9464 is not a loopback address" in r.stderr
    assert "Traceback" not in r.stderr
    with socket_bound() as port:
        r = run_kms(home.path, "serve", "--listen", f"127.0.0.1:{free_port()}",
                    "--metrics-listen", f"127.0.0.1:{port}", check=False)
    assert r.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in r.stderr
    assert "Traceback" not in r.stderr


class socket_bound:  # noqa: N801 - used as a context manager
    """A listening socket on a free loopback port for the duration."""

    def __enter__(self) -> int:
        import socket

        self.s = socket.socket()
        self.s.bind(("127.0.0.1", 0))
        self.s.listen()
        return int(self.s.getsockname()[1])

    def __exit__(self, *_: object) -> None:
        self.s.close()


def test_metrics_over_tls(home: Home, tmp_path: Path) -> None:
    ca = TestCa(tmp_path / "ca", "metrics test CA")
    leaf = ca.issue("metrics")
    reg = exposition_registry(home.config, home.registry.path, None)
    port = free_port()
    server = MetricsServer(MetricsListen(f"127.0.0.1:{port}", leaf.cert, leaf.key), reg)
    try:
        assert server.tls and server.port == port
        ctx = ssl.create_default_context(cafile=str(ca.path))
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=ctx,
                                    timeout=10) as r:
            text = r.read().decode()
        assert 'kms_tpk_versions{state="current"} 1.0' in text
        assert "kms_build_info{" in text
        # Plain HTTP to the TLS listener gets no metrics.
        with pytest.raises((OSError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        # kms status reads HTTPS metrics with --metrics-ca.
        r2 = run_kms(home.path, "status", "--target", f"127.0.0.1:{free_port()}", "--metrics",
                     f"https://127.0.0.1:{port}/metrics", "--metrics-ca", str(ca.path),
                     "--json", "--timeout", "2", check=False)
        assert r2.returncode == 1  # no gRPC server there
        report = json.loads(r2.stdout)
        assert report["health"] == "unreachable"
        assert report["tpk"]["versions"]["current"] == 1
    finally:
        server.close()


@pytest.mark.parametrize(("outcome", "resolve", "node"), [
    (Outcome.OK, "ok", "released"),
    (Outcome.UNAUTHENTICATED, "refused", "refused"),
    (Outcome.CANCELLED, "cancelled", "cancelled"),
])
def test_a_cancelled_resolve_is_counted_cancelled_not_refused(
    outcome: Outcome, resolve: str, node: str
) -> None:
    """The client went away while the KMS waited (kms.core.steps): nothing was refused, so
    the resolve and node counters say cancelled, as kms_calls_total does."""
    reg = CollectorRegistry()
    m = ServerMetrics(reg)
    audit: dict[str, object] = {"ticket_id": "ab" * 16, "node": "sip:rec@example.org",
                                "role": "recorder", "event": "ticket.forwarded"}
    m.observe_call("resolve_ticket", KmsReply(outcome, audit=audit), 0.01)
    assert sample(reg, "kms_resolves_total", path="forwarded", result=resolve) == 1
    assert sample(reg, "kms_node_key_requests_total", role="recorder", outcome=node) == 1
