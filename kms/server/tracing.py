"""Traces (off by default): one span per KMS call, per token operation and per forwarded
resolve, with the W3C trace context (``traceparent``, W3C Trace Context Level 1) taken from
the caller's gRPC metadata and carried to the peer KMS of a federated resolve (RFC 6043 9),
exported over OTLP/HTTP with the JSON encoding (``POST <endpoint>/v1/traces``).

Written without the OpenTelemetry SDK: its OTLP exporters need protobuf < 7, older than the
one the gRPC stubs here are generated for; the JSON encoding of OTLP needs no protobuf.

Span attributes are bounded and secret-free: method, outcome, gRPC status, MIKEY error
number, token operation, peer KMS id. Endpoint identities and ticket ids only with
``[tracing] record_identities = true``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kms.core.api import KmsHandler, KmsReply, Outcome
from kms.core.ports import PeerError, PeerKms, PeerResolver
from kms.keystore import KeyStore

log = logging.getLogger("kms.server.tracing")

TRACEPARENT = "traceparent"
_TP = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
MAX_QUEUE = 10_000
BATCH = 512
FLUSH_S = 1.0

_local = threading.local()


@dataclass(frozen=True)
class SpanContext:
    trace_id: str  # 32 lowercase hex
    span_id: str  # 16 lowercase hex
    sampled: bool = True

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


def parse_traceparent(value: object) -> SpanContext | None:
    """A W3C ``traceparent`` (version 00); None when absent or malformed (all-zero ids are
    invalid)."""
    if not isinstance(value, str):
        return None
    m = _TP.match(value.strip())
    if not m or set(m.group(1)) == {"0"} or set(m.group(2)) == {"0"}:
        return None
    return SpanContext(m.group(1), m.group(2), bool(int(m.group(3), 16) & 1))


def set_incoming(metadata: Sequence[Any] | None) -> None:
    """Remember the caller's ``traceparent`` for the call this thread is about to handle
    (set by the gRPC adapter; read by :class:`TracingHandler`)."""
    _local.incoming = None
    for item in metadata or ():
        if item[0] == TRACEPARENT:
            _local.incoming = parse_traceparent(item[1])
            break


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """``(("traceparent", ...),)`` for a call made inside the current span, else ``()``."""
    span = current()
    return () if span is None else ((TRACEPARENT, span.context.traceparent),)


def current() -> Span | None:
    stack: list[Span] = getattr(_local, "stack", [])
    return stack[-1] if stack else None


@dataclass
class Span:
    name: str
    context: SpanContext
    parent_span_id: str | None
    start_ns: int
    kind: int  # OTLP SpanKind: 1 internal, 2 server, 3 client
    attributes: dict[str, str | int] = field(default_factory=dict)
    end_ns: int = 0
    error: bool = False


class OtlpJsonExporter:
    """Batches finished spans and POSTs them as OTLP/HTTP JSON from a thread of its own;
    never blocks or fails a KMS call (a full queue drops spans, a failed POST is logged)."""

    def __init__(self, endpoint: str, service_name: str, *, timeout: float = 5.0) -> None:
        self.url = endpoint.rstrip("/") + "/v1/traces"
        self.service_name = service_name
        self.timeout = timeout
        self.dropped = 0
        self._q: queue.Queue[Span | None] = queue.Queue(MAX_QUEUE)
        self._thread = threading.Thread(target=self._run, name="kms-otlp", daemon=True)
        self._thread.start()

    def export(self, span: Span) -> None:
        try:
            self._q.put_nowait(span)
        except queue.Full:
            self.dropped += 1

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(self.timeout + 2)

    def _run(self) -> None:
        done = False
        while not done:
            batch: list[Span] = []
            deadline = time.monotonic() + FLUSH_S
            while len(batch) < BATCH:
                try:
                    item = self._q.get(timeout=max(deadline - time.monotonic(), 0.01))
                except queue.Empty:
                    break
                if item is None:
                    done = True
                    break
                batch.append(item)
            if batch:
                self._post(batch)

    def _post(self, spans: list[Span]) -> None:
        body = json.dumps(self.encode(spans)).encode()
        req = urllib.request.Request(  # noqa: S310 - the operator's configured collector
            self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:  # noqa: S310
                r.read()
        except OSError as exc:
            log.warning("trace export failed", extra={"fields": {"spans": len(spans),
                                                                 "error": str(exc)[:200]}})

    def encode(self, spans: list[Span]) -> dict[str, Any]:
        """OTLP ``ExportTraceServiceRequest`` in its JSON form (ids as hex strings)."""

        def attr(k: str, v: str | int) -> dict[str, Any]:
            value = {"intValue": str(v)} if isinstance(v, int) else {"stringValue": v}
            return {"key": k, "value": value}

        out = []
        for s in spans:
            item: dict[str, Any] = {
                "traceId": s.context.trace_id,
                "spanId": s.context.span_id,
                "name": s.name,
                "kind": s.kind,
                "startTimeUnixNano": str(s.start_ns),
                "endTimeUnixNano": str(s.end_ns),
                "attributes": [attr(k, v) for k, v in s.attributes.items()],
                "status": {"code": 2 if s.error else 1},
            }
            if s.parent_span_id:
                item["parentSpanId"] = s.parent_span_id
            out.append(item)
        return {"resourceSpans": [{
            "resource": {"attributes": [attr("service.name", self.service_name)]},
            "scopeSpans": [{"scope": {"name": "kms"}, "spans": out}],
        }]}


class Tracer:
    """Starts spans as children of this thread's current span (or of a given parent)."""

    def __init__(self, exporter: OtlpJsonExporter, *, record_identities: bool = False) -> None:
        self.exporter = exporter
        self.record_identities = record_identities

    @contextlib.contextmanager
    def span(
        self, name: str, *, kind: int = 1, parent: SpanContext | None = None,
        attributes: dict[str, str | int] | None = None,
    ) -> Iterator[Span]:
        up = current()
        parent_ctx = parent if parent is not None else (None if up is None else up.context)
        trace_id = parent_ctx.trace_id if parent_ctx is not None else os.urandom(16).hex()
        s = Span(name, SpanContext(trace_id, os.urandom(8).hex()),
                 None if parent_ctx is None else parent_ctx.span_id, time.time_ns(), kind,
                 dict(attributes or {}))
        stack: list[Span] = getattr(_local, "stack", None) or []
        _local.stack = stack
        stack.append(s)
        try:
            yield s
        except BaseException:
            s.error = True
            raise
        finally:
            stack.pop()
            s.end_ns = time.time_ns()
            self.exporter.export(s)


class TracingHandler:
    """A server span per KMS call, child of the caller's ``traceparent`` if it sent one."""

    def __init__(self, inner: KmsHandler, tracer: Tracer) -> None:
        self._inner = inner
        self._t = tracer

    def request_ticket(self, wire: bytes, now: float, *, correlation_id: str = "") -> KmsReply:
        return self._call("RequestTicket", self._inner.request_ticket, wire, now,
                          correlation_id=correlation_id)

    def resolve_ticket(
        self, wire: bytes, now: float, *, correlation_id: str = "", **kwargs: Any
    ) -> KmsReply:
        return self._call("ResolveTicket", self._inner.resolve_ticket, wire, now,
                          correlation_id=correlation_id, **kwargs)

    def _call(self, method: str, fn: Callable[..., KmsReply], *args: Any, **kw: Any) -> KmsReply:
        parent: SpanContext | None = getattr(_local, "incoming", None)
        _local.incoming = None
        with self._t.span(f"kms/{method}", kind=2, parent=parent,
                          attributes={"rpc.method": method}) as s:
            reply = fn(*args, **kw)
            s.attributes["kms.outcome"] = reply.outcome.value
            if reply.outcome is not Outcome.OK:
                s.error = reply.outcome in (Outcome.INTERNAL, Outcome.UNAVAILABLE)
                if reply.error_message is not None and "error_no" in reply.audit:
                    s.attributes["mikey.error"] = str(reply.audit["error_no"])
            if self._t.record_identities:
                for key in ("sender", "ticket_id"):
                    if key in reply.audit:
                        s.attributes[f"kms.{key}"] = str(reply.audit[key])
            return reply

    def refuse_undecodable(
        self, size: int, now: float, *, correlation_id: str = "", detail: str = ""
    ) -> KmsReply:
        """A body that is not a transport message: the core audits it (passed through, so
        that metrics or traces do not cost the audit record)."""
        refuse = getattr(self._inner, "refuse_undecodable", None)
        if callable(refuse):
            reply = refuse(size, now, correlation_id=correlation_id, detail=detail)
            if isinstance(reply, KmsReply):
                return reply
        return KmsReply(Outcome.MALFORMED, detail=detail)

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if callable(close):
            close()


class TracingKeyStore:
    """A span per key-store (token) operation; the key label only with record_identities."""

    _OPS = frozenset({"hmac", "prf", "prf_many", "aes_cm", "random", "rsa_decrypt", "sign",
                      "public_key_der"})

    def __init__(self, inner: KeyStore, tracer: Tracer) -> None:
        self._inner = inner
        self._t = tracer

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._inner, name)
        if name not in self._OPS or not callable(target):
            return target

        def traced(*args: Any, **kwargs: Any) -> Any:
            with self._t.span(f"token/{name}", attributes={"kms.token.operation": name}):
                return target(*args, **kwargs)

        return traced


class TracingPeers:
    """A client span per forwarded resolve; the federation client sends its traceparent."""

    def __init__(self, inner: PeerResolver, tracer: Tracer) -> None:
        self._inner = inner
        self._t = tracer

    def forward_resolve(
        self,
        peer: PeerKms,
        wire: bytes,
        *,
        correlation_id: str,
        hops: int,
        rebuild: Callable[[], bytes] | None = None,
    ) -> bytes:
        attrs: dict[str, str | int] = {"kms.peer": peer.kms_id.decode("utf-8", "replace")}
        with self._t.span("peer/ResolveTicket", kind=3, attributes=attrs) as s:
            try:
                return self._inner.forward_resolve(
                    peer, wire, correlation_id=correlation_id, hops=hops, rebuild=rebuild
                )
            except PeerError as exc:
                s.attributes["kms.peer.outcome"] = exc.kind
                s.error = exc.kind != "refused"
                raise


__all__ = [
    "TRACEPARENT",
    "OtlpJsonExporter",
    "SpanContext",
    "Tracer",
    "TracingHandler",
    "TracingKeyStore",
    "TracingPeers",
    "current",
    "outgoing_metadata",
    "parse_traceparent",
    "set_incoming",
]
