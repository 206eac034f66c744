"""One observing layer around the handler, the key store and the peer resolver: metrics
(:class:`kms.server.metrics.ServerMetrics`) and traces (:class:`kms.server.tracing.Tracer`),
either or both, in one decorator each (one extra frame per call and per token operation,
where a metered and a traced decorator stacked cost two, and the traced key store built a
closure per operation).

What is recorded is unchanged: per call the method, outcome, status, MIKEY error number
(RFC 3830 6.12, RFC 6043 6.14) and latency, a server span child of the caller's
``traceparent``; per token operation its kind, latency, error kind and a span; per forwarded
resolve (RFC 6043 9) the peer KMS, outcome, latency and a client span. Key labels, values,
identities (unless ``record_identities``) and correlation ids never become label values.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from kms.core.api import KmsHandler, KmsReply, Outcome, refuse_undecodable
from kms.core.ports import PeerError, PeerKms, PeerResolver
from kms.core.steps import CallCancelled, TokenIo
from kms.keystore import (
    Digest,
    Key,
    KeyInfo,
    KeyRef,
    KeyStore,
    KeyStoreError,
    RsaPadding,
    SignScheme,
)
from kms.server.federated import CallIo, CallSteps
from kms.server.metrics import PEER_OUTCOMES, ServerMetrics
from kms.server.metrics_token import TokenMetrics, error_kind, probe_token
from kms.server.tracing import Span, SpanContext, Tracer, active, take_incoming

T = TypeVar("T")

TOKEN_OPS = ("hmac", "prf", "prf_many", "aes_cm", "random", "rsa_decrypt", "sign",
             "public_key_der", "manage")


class ObservedHandler:
    """A :class:`KmsHandler` whose calls are counted and timed (``metrics``) and traced as
    server spans (``tracer``)."""

    def __init__(
        self, inner: KmsHandler, metrics: ServerMetrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._inner = inner
        self._m = metrics
        self._t = tracer

    @property
    def inner(self) -> KmsHandler:
        return self._inner

    def request_ticket(self, wire: bytes, now: float, *, correlation_id: str = "") -> KmsReply:
        return self._call("request_ticket", self._inner.request_ticket, wire, now,
                          correlation_id=correlation_id)

    def resolve_ticket(
        self, wire: bytes, now: float, *, correlation_id: str = "", **kwargs: Any
    ) -> KmsReply:
        # ``hops`` (RFC 6043 9 federation) passes through when the adapter sets it.
        return self._call("resolve_ticket", self._inner.resolve_ticket, wire, now,
                          correlation_id=correlation_id, **kwargs)

    def _call(self, method: str, fn: Callable[..., KmsReply], *args: Any, **kw: Any) -> KmsReply:
        m = self._m
        t0 = time.perf_counter()
        started = (m.admitted_at() or t0) if m is not None else t0
        reply: KmsReply | None = None
        try:
            reply = fn(*args, **kw) if self._t is None else self._traced(method, fn, *args, **kw)
            return reply
        finally:
            if m is not None:
                m.observe_call(method, reply if isinstance(reply, KmsReply) else None,
                               time.perf_counter() - started)

    def _traced(self, method: str, fn: Callable[..., KmsReply], *args: Any,
                **kw: Any) -> KmsReply:
        assert self._t is not None
        name = "RequestTicket" if method == "request_ticket" else "ResolveTicket"
        parent: SpanContext | None = take_incoming()
        with self._t.span(f"kms/{name}", kind=2, parent=parent,
                          attributes={"rpc.method": name}) as s:
            reply = fn(*args, **kw)
            self._annotate(s, reply)
            return reply

    def _annotate(self, s: Span, reply: KmsReply) -> None:
        assert self._t is not None
        s.attributes["kms.outcome"] = reply.outcome.value
        if reply.outcome is not Outcome.OK:
            s.error = reply.outcome in (Outcome.INTERNAL, Outcome.UNAVAILABLE)
            if reply.error_message is not None and "error_no" in reply.audit:
                s.attributes["mikey.error"] = str(reply.audit["error_no"])
        if self._t.record_identities:
            for key in ("sender", "ticket_id"):
                if key in reply.audit:
                    s.attributes[f"kms.{key}"] = str(reply.audit[key])

    def request_steps(
        self, wire: bytes, now: float, *, correlation_id: str = ""
    ) -> CallSteps:
        """:meth:`request_ticket` as steps (:mod:`kms.server.federated`), recorded as
        :meth:`resolve_steps` records a resolve."""
        inner_steps = getattr(self._inner, "request_steps", None)
        if not callable(inner_steps):
            return self.request_ticket(wire, now, correlation_id=correlation_id)
        return (yield from self._steps("request_ticket", inner_steps, wire, now,
                                       correlation_id=correlation_id))

    def resolve_steps(
        self, wire: bytes, now: float, *, correlation_id: str = "", **kwargs: Any
    ) -> CallSteps:
        """:meth:`resolve_ticket` as steps (:mod:`kms.server.federated`), recorded the same
        way: one call from the first step to the last (the time of the yielded operations
        included), one server span that is current only while a step or a yielded
        operation runs (the event loop runs other calls in between), with the token
        operation's span and the peer's client span as its children."""
        inner_steps = getattr(self._inner, "resolve_steps", None)
        if not callable(inner_steps):
            return self.resolve_ticket(wire, now, correlation_id=correlation_id, **kwargs)
        return (yield from self._steps("resolve_ticket", inner_steps, wire, now,
                                       correlation_id=correlation_id, **kwargs))

    def _steps(self, method: str, inner_steps: Callable[..., CallSteps], *args: Any,
               **kw: Any) -> CallSteps:
        m = self._m
        t0 = time.perf_counter()
        started = (m.admitted_at() or t0) if m is not None else t0
        span: Span | None = None
        if self._t is not None:
            name = "RequestTicket" if method == "request_ticket" else "ResolveTicket"
            span = self._t.start(f"kms/{name}", kind=2, parent=take_incoming(),
                                 attributes={"rpc.method": name})
        reply: KmsReply | None = None
        try:
            steps: CallSteps = inner_steps(*args, **kw)
            answer: Any = None
            cancelled: CallCancelled | None = None
            while True:
                try:
                    with _current(span):
                        io = steps.send(answer) if cancelled is None else steps.throw(cancelled)
                except StopIteration as done:
                    reply = done.value
                    break
                try:
                    answer = yield io if span is None else _spanned(span, io)
                except CallCancelled as exc:  # passed on to the steps that waited
                    cancelled = exc
            if span is not None:
                self._annotate(span, reply)
            return reply
        except BaseException:
            if span is not None:
                span.error = True
            raise
        finally:
            if span is not None and self._t is not None:
                self._t.finish(span)
            if m is not None:
                m.observe_call(method, reply if isinstance(reply, KmsReply) else None,
                               time.perf_counter() - started)

    def refuse_undecodable(
        self, size: int, now: float, *, correlation_id: str = "", detail: str = ""
    ) -> KmsReply:
        """A body that is not a transport message: the core audits it (passed through, so
        that metrics or traces do not cost the audit record)."""
        return refuse_undecodable(
            self._inner, size, now, correlation_id=correlation_id, detail=detail
        )

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if callable(close):
            close()


def _current(span: Span | None) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext() if span is None else active(span)


def _in_span(span: Span, io: CallIo) -> Any:
    with active(span):  # on the thread that makes the peer call or the token operation
        return io()


def _spanned(span: Span, io: CallIo) -> CallIo:
    """``io`` run inside ``span`` on whatever thread runs it, keeping its kind (a token
    operation stays a :class:`TokenIo`: the server runs the two kinds in different pools)."""
    if isinstance(io, TokenIo):
        return TokenIo(_in_span, span, io)
    return functools.partial(_in_span, span, io)


class ObservedKeyStore:
    """A :class:`KeyStore` whose operations are timed by kind, failures counted by kind and
    the token's availability tracked (``metrics``: ``kms_token_up``, reconnects), and each
    operation a span (``tracer``; the key label never)."""

    def __init__(
        self, inner: KeyStore, metrics: TokenMetrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._inner = inner
        self._m = metrics
        self._t = tracer
        self._hist = (
            {} if metrics is None else {op: metrics.token_seconds.labels(op) for op in TOKEN_OPS}
        )
        # One code path per configuration, chosen once.
        self._op: Callable[..., Any]
        if tracer is None:
            self._op = self._metered if metrics is not None else self._plain
        else:
            self._op = self._traced

    @property
    def inner(self) -> KeyStore:
        return self._inner

    @staticmethod
    def _plain(_op: str, fn: Callable[..., T], *args: Any) -> T:
        return fn(*args)

    def _metered(self, op: str, fn: Callable[..., T], *args: Any) -> T:
        m = self._m
        assert m is not None
        t0 = time.perf_counter()
        try:
            result = fn(*args)
        except KeyStoreError as exc:
            self._hist[op].observe(time.perf_counter() - t0)
            kind = error_kind(exc)
            m.token_errors.labels(op, kind).inc()
            if kind == "unavailable":
                m.token_unavailable()
            else:
                m.token_ok()  # the token answered, with an error
            raise
        self._hist[op].observe(time.perf_counter() - t0)
        if m.token_down:
            m.token_ok()
        return result

    def _traced(self, op: str, fn: Callable[..., T], *args: Any) -> T:
        assert self._t is not None
        with self._t.span(f"token/{op}", attributes={"kms.token.operation": op}):
            if self._m is None:
                return fn(*args)
            return self._metered(op, fn, *args)

    def probe(self) -> bool:
        """One cheap token operation on a token object (:func:`probe_token`): is the token
        there? Metered, not traced (a probe is no call of anyone's)."""
        m = self._m
        if m is None:
            raise RuntimeError("probe needs metrics")
        up = probe_token(functools.partial(self._metered, "hmac", self._inner.hmac))
        if up:
            m.token_ok()
        return up

    # --- operations -----------------------------------------------------------------------
    def hmac(self, key: Key, data: bytes, func: Digest) -> bytes:
        return self._op("hmac", self._inner.hmac, key, data, func)  # type: ignore[no-any-return]

    def prf(self, key: Key, label: bytes, out_len: int, func: Digest) -> bytes:
        return self._op("prf", self._inner.prf, key, label, out_len, func)  # type: ignore[no-any-return]

    def prf_many(
        self, key: Key, requests: Sequence[tuple[bytes, int]], func: Digest
    ) -> list[bytes]:
        return self._op("prf_many", self._inner.prf_many, key, requests, func)  # type: ignore[no-any-return]

    def aes_cm(self, key: bytes, iv: bytes, data: bytes) -> bytes:
        return self._op("aes_cm", self._inner.aes_cm, key, iv, data)  # type: ignore[no-any-return]

    def random(self, length: int) -> bytes:
        return self._op("random", self._inner.random, length)  # type: ignore[no-any-return]

    def rsa_decrypt(self, key: KeyRef, data: bytes, padding: RsaPadding) -> bytes:
        return self._op("rsa_decrypt", self._inner.rsa_decrypt, key, data, padding)  # type: ignore[no-any-return]

    def sign(self, key: KeyRef, data: bytes, scheme: SignScheme) -> bytes:
        return self._op("sign", self._inner.sign, key, data, scheme)  # type: ignore[no-any-return]

    def public_key_der(self, key: KeyRef) -> bytes:
        return self._op("public_key_der", self._inner.public_key_der, key)  # type: ignore[no-any-return]

    # --- management (rare while serving: one label for all, never traced) -----------------
    def _manage(self, fn: Callable[..., T], *args: Any) -> T:
        return self._metered("manage", fn, *args) if self._m is not None else fn(*args)

    def generate_secret(self, label: str, length: int) -> KeyInfo:
        return self._manage(self._inner.generate_secret, label, length)

    def import_secret(self, label: str, value: bytes) -> KeyInfo:
        return self._manage(self._inner.import_secret, label, value)

    def generate_rsa(self, label: str, bits: int) -> KeyInfo:
        return self._manage(self._inner.generate_rsa, label, bits)

    def generate_ec(self, label: str, curve: str) -> KeyInfo:
        return self._manage(self._inner.generate_ec, label, curve)

    def delete(self, label: str) -> None:
        self._manage(self._inner.delete, label)

    def list_keys(self) -> list[KeyInfo]:
        return self._manage(self._inner.list_keys)

    def key_info(self, label: str) -> KeyInfo:
        return self._manage(self._inner.key_info, label)

    def close(self) -> None:
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        # Anything else an implementation offers (e.g. batch helpers) passes through.
        return getattr(self._inner, name)


class ObservedPeers:
    """A :class:`PeerResolver` whose forwarded resolves (RFC 6043 9) are counted and timed
    per peer KMS (``metrics``) and traced as client spans (``tracer``; the federation
    client sends the span's ``traceparent``)."""

    def __init__(
        self, inner: PeerResolver, metrics: ServerMetrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._inner = inner
        self._m = metrics
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
        name = peer.kms_id.decode("utf-8", "replace")
        if self._t is None:
            return self._metered(name, peer, wire, correlation_id, hops, rebuild)
        with self._t.span("peer/ResolveTicket", kind=3, attributes={"kms.peer": name}) as s:
            try:
                return self._metered(name, peer, wire, correlation_id, hops, rebuild)
            except PeerError as exc:
                s.attributes["kms.peer.outcome"] = exc.kind
                s.error = exc.kind != "refused"
                raise

    def _metered(
        self, name: str, peer: PeerKms, wire: bytes, correlation_id: str, hops: int,
        rebuild: Callable[[], bytes] | None,
    ) -> bytes:
        m = self._m
        if m is None:
            return self._inner.forward_resolve(
                peer, wire, correlation_id=correlation_id, hops=hops, rebuild=rebuild
            )
        t0 = time.perf_counter()
        outcome = "unavailable"
        try:
            answer = self._inner.forward_resolve(
                peer, wire, correlation_id=correlation_id, hops=hops, rebuild=rebuild
            )
            outcome = "ok"
            return answer
        except PeerError as exc:
            outcome = exc.kind if exc.kind in PEER_OUTCOMES else "unavailable"
            raise
        finally:
            m.peer_seconds.labels(name).observe(time.perf_counter() - t0)
            m.peer_calls.labels(name, outcome).inc()
            m.peer_up.labels(name).set(0 if outcome == "unavailable" else 1)


__all__ = ["TOKEN_OPS", "ObservedHandler", "ObservedKeyStore", "ObservedPeers"]
