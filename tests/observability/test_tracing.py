"""Traces: W3C traceparent parsing, a real `kms serve` with [tracing] exporting OTLP/HTTP
JSON to a collector run here (a server span per call, child of the caller's traceparent, token
spans under it, no identity or ticket id in attributes), and the federation client sending
the traceparent of its span to the peer KMS (RFC 6043 9 forwarded resolve)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from hsm.software import SoftwareKeyStore
from kms import rpc
from kms.core.ports import PeerKms
from kms.endpoint.client import KmsClient, obtain_ticket, resolve
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DesiredPolicy, Initiator
from kms.endpoint.responder import Responder
from kms.endpoint.session import CryptoSession
from kms.mikey.constants import IdType
from kms.server.config import ConfigError, parse_config
from kms.server.federation import GrpcPeerResolver, PeerRoute
from kms.server.observed import ObservedPeers
from kms.server.tracing import (
    OtlpJsonExporter,
    SpanContext,
    Tracer,
    parse_traceparent,
)
from tests.e2e.harness import (
    ALICE,
    BOB,
    Kms,
    ServeProcess,
    free_port,
    make_home,
    run_kms,
    running_kms,
)
from tests.federation.test_resolver import FakePeer

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Collector:
    """An OTLP/HTTP JSON trace receiver: POST /v1/traces, spans kept in memory."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.resources: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == "/v1/traces"
                assert self.headers["Content-Type"] == "application/json"
                with outer.lock:
                    for rs in body["resourceSpans"]:
                        outer.resources.append(rs["resource"])
                        for ss in rs["scopeSpans"]:
                            outer.spans.extend(ss["spans"])
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *_: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait_for(self, pred: Any, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [s for s in self.spans if pred(s)]
            if found:
                return found
            time.sleep(0.2)
        raise AssertionError(f"no such span among {len(self.spans)}")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def attrs(span: dict[str, Any]) -> dict[str, str]:
    return {a["key"]: next(iter(a["value"].values())) for a in span.get("attributes", [])}


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Kms, Collector]]:
    collector = Collector()
    try:
        home = make_home(tmp_path_factory.mktemp("trace") / "home")
        cfg = home / "kms.toml"
        text = cfg.read_text()
        example = '# otlp_endpoint = "http://127.0.0.1:4318"'
        assert example in text and 'service_name = "kms"' in text
        cfg.write_text(text.replace(example, f'otlp_endpoint = "{collector.url}"')
                       .replace('service_name = "kms"', 'service_name = "kms-test"'))
        with running_kms(home) as k:
            yield k, collector
    finally:
        collector.close()


def test_traceparent_parsing() -> None:
    ctx = parse_traceparent(f"00-{TRACE_ID}-{PARENT_ID}-01")
    assert ctx == SpanContext(TRACE_ID, PARENT_ID, True)
    assert ctx.traceparent == f"00-{TRACE_ID}-{PARENT_ID}-01"
    for bad in (None, "", "garbage", f"01-{TRACE_ID}-{PARENT_ID}-01",
                f"00-{'0' * 32}-{PARENT_ID}-01", f"00-{TRACE_ID}-{'0' * 16}-01",
                f"00-{TRACE_ID.upper()}-{PARENT_ID}-01"):
        assert parse_traceparent(bad) is None, bad


def test_tracing_settings(tmp_path: Any) -> None:
    base = '[kms]\nid = "kms:x"\n[token]\nmodule = "m.so"\nlabel = "t"\npin_env = "P"\n'
    assert not parse_config(base, tmp_path).tracing.enabled
    c = parse_config(base + '[tracing]\notlp_endpoint = "http://127.0.0.1:4318"\n', tmp_path)
    assert c.tracing.enabled and not c.tracing.record_identities
    with pytest.raises(ConfigError, match=r"\[tracing\] otlp_endpoint: must be an http"):
        parse_config(base + '[tracing]\notlp_endpoint = "127.0.0.1:4318"\n', tmp_path)


def test_call_span_continues_the_callers_trace(traced: tuple[Kms, Collector]) -> None:
    k, collector = traced
    wire, _ = k.initiator(ALICE).request_ticket(DesiredPolicy(responders=(BOB,)), time.time())
    with grpc.insecure_channel(k.target) as ch:
        stub = rpc.client_stub(ch)
        resp, _call = stub.RequestTicket.with_call(
            rpc.MikeyMessage(data=wire), timeout=10,
            metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),),
        )
    assert resp.data
    [server] = collector.wait_for(
        lambda s: s["name"] == "kms/RequestTicket" and s["traceId"] == TRACE_ID)
    assert server["parentSpanId"] == PARENT_ID
    assert server["kind"] == 2
    assert attrs(server)["kms.outcome"] == "ok"
    token = collector.wait_for(
        lambda s: s["traceId"] == TRACE_ID and s.get("parentSpanId") == server["spanId"])
    assert {s["name"] for s in token} >= {"token/prf_many", "token/aes_cm"}
    assert all(int(s["startTimeUnixNano"]) >= int(server["startTimeUnixNano"]) for s in token)
    assert collector.resources[0]["attributes"][0]["value"]["stringValue"] == "kms-test"
    # No identity, no ticket id, no key label in any attribute (record_identities is off).
    audit = [json.loads(line) for line in (k.home / "audit.log").read_text().splitlines()]
    secrets = {str(r[key]) for r in audit for key in ("ticket_id", "sender") if r.get(key)}
    for span in collector.spans:
        for v in attrs(span).values():
            assert v not in secrets and "example.org" not in v and "psk/" not in v


def test_call_without_traceparent_starts_a_trace(traced: tuple[Kms, Collector]) -> None:
    k, collector = traced
    before = {s["traceId"] for s in collector.spans}
    wire, _ = k.initiator(ALICE).request_ticket(DesiredPolicy(responders=(BOB,)), time.time())
    k.client().request_ticket(wire)
    roots = collector.wait_for(lambda s: s["name"] == "kms/RequestTicket"
                               and s["traceId"] not in before and "parentSpanId" not in s)
    assert len(roots[0]["traceId"]) == 32


def test_forwarded_resolve_carries_the_trace_to_the_peer() -> None:
    collector = Collector()
    seen: list[dict[str, str]] = []

    def answer(data: bytes, ctx: Any) -> bytes:
        seen.append(dict(ctx.invocation_metadata()))
        return b"resp"

    peer_server = FakePeer(answer)
    exporter = OtlpJsonExporter(collector.url, "kms-b")
    tracer = Tracer(exporter)
    inner = GrpcPeerResolver(lambda _id: PeerRoute(peer_server.address), allow_plaintext=True)
    peers = ObservedPeers(inner, tracer=tracer)
    peer = PeerKms(kms_id=b"kms:a.example", psk=None, deadline_s=2.0)
    try:
        with tracer.span("kms/ResolveTicket", kind=2) as call:
            assert peers.forward_resolve(peer, b"x", correlation_id="c", hops=1) == b"resp"
        exporter.close()
        [client] = collector.wait_for(lambda s: s["name"] == "peer/ResolveTicket")
    finally:
        inner.close()
        peer_server.stop()
        collector.close()
    sent = parse_traceparent(seen[0]["traceparent"])
    assert sent is not None
    assert sent.trace_id == call.context.trace_id == client["traceId"]
    assert sent.span_id == client["spanId"]  # the peer's server span will be its child
    assert client["parentSpanId"] == call.context.span_id
    assert attrs(client)["kms.peer"] == "kms:a.example"
    assert seen[0]["x-correlation-id"] == "c"


def _tracing_home(path: Path, kms_id: str, users: dict[bytes, bytes], peer: list[str],
                  collector: Collector, service: str, plaintext_peers: bool) -> Path:
    run_kms(path, "init", "--kms-id", kms_id)
    for who, psk in users.items():
        run_kms(path, "endpoint", "add", who.decode(), "--psk-hex", psk.hex())
    run_kms(path, "peer", "add", *peer)
    cfg = path / "kms.toml"
    text = cfg.read_text()
    text = text.replace('# otlp_endpoint = "http://127.0.0.1:4318"',
                        f'otlp_endpoint = "{collector.url}"')
    text = text.replace('service_name = "kms"', f'service_name = "{service}"')
    if plaintext_peers:
        text, n = re.subn(r"(?m)^allow_plaintext = false$", "allow_plaintext = true", text)
        assert n == 1
    cfg.write_text(text)
    return path


def test_one_trace_across_a_federated_resolve(tmp_path: Path) -> None:
    """Bob's KMS (F) forwards the resolve of a ticket issued by Alice's KMS (I), RFC 6043 9:
    F's call span, F's peer span and I's call span are one trace, I's span the child of F's
    peer span."""
    alice, bob = b"sip:alice@i.example", b"sip:bob@f.example"
    psks = {alice: bytes.fromhex("a1" * 16), bob: bytes.fromhex("b0" * 16)}
    shared = ("fe" * 32)
    collector = Collector()
    pi, pf = free_port(), free_port()
    homes = [
        _tracing_home(tmp_path / "i", "kms:i.example", {alice: psks[alice]},
                      ["kms:f.example", "--address", f"127.0.0.1:{pf}", "--psk-hex", shared,
                       "--resolve-for", "sip:*@f.example"], collector, "kms-i", False),
        _tracing_home(tmp_path / "f", "kms:f.example", {bob: psks[bob]},
                      ["kms:i.example", "--address", f"127.0.0.1:{pi}", "--psk-hex", shared],
                      collector, "kms-f", True),
    ]
    servers = [ServeProcess(homes[0], pi), ServeProcess(homes[1], pf)]
    ks = SoftwareKeyStore()
    try:
        for s in servers:
            s.wait_ready()
        ini = Initiator(Credentials(alice, psks[alice], b"kms:i.example", IdType.URI), ks)
        with KmsClient(servers[0].target) as ci, KmsClient(servers[1].target) as cf:
            grant = obtain_ticket(ci, ini, DesiredPolicy(responders=(bob,)))
            ti, _ = ini.transfer_init(grant, time.time(), bob, (CryptoSession(1, 0xB0B),))
            responder = Responder(Credentials(bob, psks[bob], b"kms:f.example", IdType.URI), ks)
            call = resolve(cf, responder, ti)
        assert call.initiator == alice
        [peer_span] = collector.wait_for(lambda s: s["name"] == "peer/ResolveTicket")
        trace = peer_span["traceId"]
        issuer_spans = collector.wait_for(
            lambda s: s["name"] == "kms/ResolveTicket" and s["traceId"] == trace
            and s.get("parentSpanId") == peer_span["spanId"])
        forwarder = collector.wait_for(
            lambda s: s["name"] == "kms/ResolveTicket" and s["spanId"] == peer_span.get(
                "parentSpanId"))
    finally:
        for s in servers:
            if s.proc.poll() is None:
                assert s.terminate() == 0, s.stderr
            else:
                s.kill()
        collector.close()
    assert len(issuer_spans) == 1 and issuer_spans[0]["kind"] == 2
    assert attrs(issuer_spans[0])["kms.outcome"] == "ok"
    assert forwarder[0]["traceId"] == trace and "parentSpanId" not in forwarder[0]
    assert attrs(peer_span)["kms.peer"] == "kms:i.example"
    services = {r["attributes"][0]["value"]["stringValue"] for r in collector.resources}
    assert services == {"kms-i", "kms-f"}
