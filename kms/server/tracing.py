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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

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
    (set by the gRPC adapter; read by :class:`kms.server.observed.ObservedHandler`)."""
    _local.incoming = None
    for item in metadata or ():
        if item[0] == TRACEPARENT:
            _local.incoming = parse_traceparent(item[1])
            break


def take_incoming() -> SpanContext | None:
    """The caller's trace context remembered by :func:`set_incoming`, once."""
    parent: SpanContext | None = getattr(_local, "incoming", None)
    _local.incoming = None
    return parent


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
        s = self.start(name, kind=kind, parent=parent, attributes=attributes)
        try:
            with active(s):
                yield s
        except BaseException:
            s.error = True
            raise
        finally:
            self.finish(s)

    def start(
        self, name: str, *, kind: int = 1, parent: SpanContext | None = None,
        attributes: dict[str, str | int] | None = None,
    ) -> Span:
        """A span (child of ``parent``, else of this thread's current span) that is not
        made current: for a call that runs in pieces (:func:`active` around each piece),
        possibly on several threads, like a federated resolve on the event-loop server."""
        up = current()
        parent_ctx = parent if parent is not None else (None if up is None else up.context)
        trace_id = parent_ctx.trace_id if parent_ctx is not None else os.urandom(16).hex()
        return Span(name, SpanContext(trace_id, os.urandom(8).hex()),
                    None if parent_ctx is None else parent_ctx.span_id, time.time_ns(), kind,
                    dict(attributes or {}))

    def finish(self, s: Span) -> None:
        s.end_ns = time.time_ns()
        self.exporter.export(s)


@contextlib.contextmanager
def active(s: Span) -> Iterator[Span]:
    """``s`` is this thread's current span for the block (children and outgoing calls made
    in it name it as their parent)."""
    stack: list[Span] = getattr(_local, "stack", None) or []
    _local.stack = stack
    stack.append(s)
    try:
        yield s
    finally:
        stack.pop()


__all__ = [
    "TRACEPARENT",
    "OtlpJsonExporter",
    "SpanContext",
    "Tracer",
    "active",
    "current",
    "outgoing_metadata",
    "parse_traceparent",
    "set_incoming",
    "take_incoming",
]
