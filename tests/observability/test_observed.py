"""The one observing layer (kms.server.observed): metrics and traces from the same decorator,
either or both, around a handler and a key store (the software key store: pure code)."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from hsm.software import SoftwareKeyStore
from kms.core.api import KmsReply, Outcome
from kms.home import DUMMY_PSK_LABEL
from kms.keystore import Digest, KeyNotFound, KeyRef, KeyStore
from kms.server.metrics import ServerMetrics
from kms.server.observed import ObservedHandler, ObservedKeyStore
from kms.server.tracing import Span, Tracer, set_incoming

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


class Recorder:
    """Stands in for the OTLP exporter: keeps the finished spans."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    def export(self, span: Span) -> None:
        self.spans.append(span)


class TokenHandler:
    """A handler that makes one token operation per call, like the core does."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store

    def request_ticket(self, wire: bytes, now: float, *, correlation_id: str = "") -> KmsReply:
        return KmsReply(Outcome.OK, self.store.hmac(KeyRef("psk/a"), wire, Digest.SHA256),
                        audit={"event": "ticket.issued", "keys": ["TGK"]})

    def resolve_ticket(self, wire: bytes, now: float, *, correlation_id: str = "",
                       hops: int = 0) -> KmsReply:
        self.store.hmac(KeyRef("psk/nobody"), wire, Digest.SHA256)  # KeyNotFound
        raise AssertionError("unreachable")


def world(metrics: bool, traces: bool) -> tuple[Any, CollectorRegistry, Recorder]:
    reg = CollectorRegistry()
    m = ServerMetrics(reg) if metrics else None
    rec = Recorder()
    tracer = Tracer(rec) if traces else None  # type: ignore[arg-type]
    soft = SoftwareKeyStore()
    soft.import_secret("psk/a", b"k" * 32)
    store = ObservedKeyStore(soft, m, tracer)
    return ObservedHandler(TokenHandler(store), m, tracer), reg, rec


def calls(reg: CollectorRegistry, method: str) -> float:
    return reg.get_sample_value("kms_call_duration_seconds_count", {"method": method}) or 0.0


def token_ops(reg: CollectorRegistry, op: str) -> float:
    return reg.get_sample_value("kms_token_operation_duration_seconds_count",
                                {"operation": op}) or 0.0


def test_one_layer_records_metrics_and_spans_of_a_call_and_its_token_operation() -> None:
    handler, reg, rec = world(metrics=True, traces=True)
    assert isinstance(handler.inner, TokenHandler)  # one layer, not two stacked
    set_incoming([("traceparent", f"00-{TRACE}-{PARENT}-01")])
    reply = handler.request_ticket(b"m", 1.0, correlation_id="c")
    assert reply.outcome is Outcome.OK
    assert calls(reg, "RequestTicket") == 1
    assert token_ops(reg, "hmac") == 1
    token, call = rec.spans  # the token span ends first
    assert call.name == "kms/RequestTicket" and call.attributes["kms.outcome"] == "ok"
    assert call.context.trace_id == TRACE and call.parent_span_id == PARENT
    assert token.name == "token/hmac" and token.parent_span_id == call.context.span_id
    assert not token.error and not call.error
    # The caller's trace context is taken once: the next call starts a trace of its own.
    handler.request_ticket(b"n", 2.0)
    assert rec.spans[-1].context.trace_id != TRACE


def test_a_failing_token_operation_is_counted_and_its_span_marked() -> None:
    handler, reg, rec = world(metrics=True, traces=True)
    with pytest.raises(KeyNotFound):
        handler.resolve_ticket(b"m", 1.0)
    assert reg.get_sample_value("kms_token_operation_errors_total",
                                {"operation": "hmac", "error": "not_found"}) == 1
    assert reg.get_sample_value("kms_calls_total", {
        "method": "ResolveTicket", "outcome": "internal", "code": "INTERNAL",
        "mikey_error": "none"}) == 1
    token, call = rec.spans
    assert token.error and call.error
    # Key labels never reach a span or a metric.
    assert all("psk/" not in str(v) for s in rec.spans for v in s.attributes.values())


@pytest.mark.parametrize(("metrics", "traces"), [(True, False), (False, True)])
def test_either_half_alone(metrics: bool, traces: bool) -> None:
    handler, reg, rec = world(metrics=metrics, traces=traces)
    handler.request_ticket(b"m", 1.0)
    assert calls(reg, "RequestTicket") == (1 if metrics else 0)
    assert token_ops(reg, "hmac") == (1 if metrics else 0)
    assert [s.name for s in rec.spans] == (
        ["token/hmac", "kms/RequestTicket"] if traces else [])


def test_the_probe_is_metered_not_traced_and_needs_metrics() -> None:
    reg = CollectorRegistry()
    rec = Recorder()
    keys = SoftwareKeyStore()
    store = ObservedKeyStore(keys, ServerMetrics(reg), Tracer(rec))  # type: ignore[arg-type]
    # The probe is an operation on a token object (the dummy PSK), not C_GenerateRandom.
    assert store.probe() is True  # "no such key" is an answer of the token: it is up
    keys.generate_secret(DUMMY_PSK_LABEL, 32)
    assert store.probe() is True
    assert token_ops(reg, "hmac") >= 1 and token_ops(reg, "random") == 0
    assert reg.get_sample_value("kms_token_up") == 1
    assert rec.spans == []
    with pytest.raises(RuntimeError, match="metrics"):
        ObservedKeyStore(SoftwareKeyStore(), None, Tracer(rec)).probe()  # type: ignore[arg-type]
