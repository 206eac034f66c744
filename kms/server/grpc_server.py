"""The gRPC adapter: ``mikey.kms.v1.KeyManagement`` over a :class:`KmsHandler`.

This is the one place where KMS outcomes become gRPC statuses. The adapter is deliberately
thin: it passes the request bytes, ``time.time()`` and a correlation id to the handler and
turns the :class:`KmsReply` into a response or a status; it never parses MIKEY.

* OK: status OK, ``data`` = the reply bytes.
* Refusal: the status code of :data:`STATUS_BY_OUTCOME`, ``details`` = the reply's one-line
  detail (INTERNAL never carries one), and the MIKEY error message, when the core made one,
  as trailing metadata ``mikey-error-bin``.
* An exception escaping the handler: INTERNAL with a fixed detail; the log gets the
  correlation id and where it happened, never the message bytes or the exception text
  (which could quote them).

Every response carries ``x-correlation-id`` in its initial and trailing metadata: the
client's own (sanitised) if it sent one, else a fresh one.

The sync server (thread pool) is used on purpose: measured faster than grpc.aio here, and
the handler is blocking code (PKCS#11 calls release the GIL).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kms import rpc
from kms.core.api import KmsHandler, KmsReply, Outcome
from kms.rpc import CORRELATION_KEY, ERROR_TRAILER, HOPS_KEY, SERVICE_NAME
from kms.server import tracing
from kms.server.admission import (
    CallGuard,
    EventCounts,
    GuardedHealth,
    Limits,
    RateLimitedLog,
    peer_address,
)
from kms.server.slots import CoreSlots

log = logging.getLogger("kms.server.grpc")

# A MIKEY message is a few hundred bytes (a PK request with two certificates a few KiB);
# anything near this limit is not a request we want to spend token time on.
MAX_REQUEST_BYTES = 64 * 1024
MAX_CORRELATION_ID = 64
# RFC 6043 9 federation: how many KMSs a ResolveTicket already crossed (set by the forwarding
# KMS). Bounded: a garbled or absurd value counts as "too many", so it is never forwarded.
MAX_HOPS = 8
MAX_DETAIL = 256
INTERNAL_DETAIL = "internal error"
# Threads per process. maximum_concurrent_rpcs is set to the same number so that a call the
# server accepts always has a thread at once (no hidden executor queue: overload becomes
# RESOURCE_EXHAUSTED immediately, and draining can count in-flight calls exactly). Accepted
# calls wait for a core slot (kms.server.slots), which costs nothing while they wait; a
# refused call that the client retries costs the server a call each time. So admit many:
# 64 clients on one worker gave 135/s with 32 threads and 259/s with 128 (bench, Ticket
# Request PSK, docs/performance.md).
DEFAULT_THREADS = 128
HEALTH_SERVICES = ("", SERVICE_NAME)
# Request metadata a KMS client needs is small (x-correlation-id, mikey-hops and gRPC's
# own); more is refused with RESOURCE_EXHAUSTED by the transport before any handler runs.
MAX_METADATA_BYTES = 4096
UNDECODABLE_DETAIL = "request is not a mikey.kms.v1.MikeyMessage"

STATUS_BY_OUTCOME: dict[Outcome, grpc.StatusCode] = {
    Outcome.OK: grpc.StatusCode.OK,
    Outcome.MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    Outcome.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Outcome.DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Outcome.PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Outcome.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Outcome.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Outcome.INTERNAL: grpc.StatusCode.INTERNAL,
}

_CID_DROP = re.compile(r"[^A-Za-z0-9._:\-]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")

Clock = Callable[[], float]


class ServerError(Exception):
    """The server cannot start (bind failure, unreadable TLS files); one line."""


def correlation_id(metadata: Sequence[Any] | None) -> str:
    """The client's ``x-correlation-id`` reduced to ``[A-Za-z0-9._:-]``, at most 64
    characters; a fresh uuid4 hex when absent or empty after that (it ends up in logs and
    in the audit record, so it must not carry arbitrary text)."""
    for item in metadata or ():
        key, value = item[0], item[1]
        if key == CORRELATION_KEY and isinstance(value, str):
            cid = _CID_DROP.sub("", value)[:MAX_CORRELATION_ID]
            if cid:
                return cid
            break
    return fresh_correlation_id()


def fresh_correlation_id() -> str:
    """A random (version 4) UUID as 32 hex digits: ``uuid.uuid4().hex`` without building a
    UUID object (this runs on every call that brings no id of its own)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4 (RFC 9562 5.4)
    b[8] = (b[8] & 0x3F) | 0x80  # variant 10
    return b.hex()


def peer_hops(metadata: Sequence[Any] | None) -> int:
    """``mikey-hops`` as an int in 0..MAX_HOPS; 0 when absent, MAX_HOPS when unparsable."""
    for item in metadata or ():
        if item[0] == HOPS_KEY:
            value = item[1]
            if isinstance(value, str) and re.fullmatch(r"[0-9]{1,3}", value):
                return min(int(value), MAX_HOPS)
            return MAX_HOPS
    return 0


def one_line(text: str) -> str:
    """``details`` as promised: one line, bounded."""
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


class Undecodable:
    """A request body that is not a protobuf ``MikeyMessage`` (the deserializer's answer
    instead of an exception, which gRPC would turn into INTERNAL and a traceback)."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


def parse_request(body: bytes) -> Any:
    """``MikeyMessage.FromString`` that never raises: garbage becomes :class:`Undecodable`."""
    try:
        return rpc.MikeyMessage.FromString(body)
    except Exception:  # protobuf's DecodeError (and whatever a C parser raises instead)
        return Undecodable(len(body))


class KmsServicer:
    """RequestTicket / ResolveTicket; counts in-flight calls for draining."""

    def __init__(
        self, handler: KmsHandler, *, clock: Clock = time.time, slots: CoreSlots | None = None
    ) -> None:
        self._handler = handler
        self._clock = clock
        # How many core calls run at once in this worker (kms.server.slots: threads in the
        # core convoy on the GIL with an in-process token).
        self.slots = slots or CoreSlots(DEFAULT_THREADS)
        self._inflight = 0
        self._idle = threading.Condition()
        self._draining = False
        self.counters = EventCounts()
        self._log = RateLimitedLog(log)

    # The method names are the proto's (the generated registration looks them up).
    def RequestTicket(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._call("RequestTicket", self._handler.request_ticket, request, context)

    def ResolveTicket(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        fn: Callable[..., KmsReply] = self._handler.resolve_ticket
        hops = peer_hops(context.invocation_metadata())
        if hops:  # only then: handlers without federation need not know the keyword
            fn = functools.partial(fn, hops=hops)
        return self._call("ResolveTicket", fn, request, context)

    @property
    def inflight(self) -> int:
        with self._idle:
            return self._inflight

    def start_draining(self) -> None:
        with self._idle:
            self._draining = True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is being handled; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout=max(timeout, 0.0))

    def _call(
        self,
        method: str,
        fn: Callable[..., KmsReply],
        request: Any,
        context: grpc.ServicerContext,
    ) -> Any:
        with self._idle:
            if self._draining:
                # Between NOT_SERVING and the server refusing connections, calls that still
                # arrive are refused here, so that none starts after draining began.
                context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
            self._inflight += 1
        # The call counts as in flight until gRPC has finished it (response and status sent,
        # or the call cancelled), not merely until the handler returns: otherwise drain()
        # could see "idle" and its final stop cut off a response the KMS already issued.
        registered = bool(context.add_callback(self._release))
        started = time.monotonic()
        metadata = context.invocation_metadata()
        cid = correlation_id(metadata)
        tracing.set_incoming(metadata)  # W3C traceparent, if sent
        try:
            context.send_initial_metadata(((CORRELATION_KEY, cid),))
            if isinstance(request, Undecodable):
                fn = functools.partial(self._undecodable, method, request.size, context)
                wire = b""
            else:
                wire = request.data
            try:
                with self.slots.held():
                    reply = fn(wire, self._clock(), correlation_id=cid)
                if not isinstance(reply, KmsReply):
                    raise TypeError(f"handler returned {type(reply).__name__}, not KmsReply")
                code = STATUS_BY_OUTCOME[reply.outcome]
            except Exception as exc:
                # Type and location only: the exception text may quote the request.
                frames = traceback.extract_tb(exc.__traceback__)[-3:]
                where = " <- ".join(f"{f.filename}:{f.lineno}" for f in reversed(frames))
                log.error(
                    "handler raised %s",
                    type(exc).__name__,
                    extra={"fields": {"correlation_id": cid, "method": method, "at": where}},
                )
                context.set_trailing_metadata(((CORRELATION_KEY, cid),))
                context.set_code(grpc.StatusCode.INTERNAL)
                context.set_details(INTERNAL_DETAIL)
                return rpc.MikeyMessage()

            trailing: list[tuple[str, str | bytes]] = [(CORRELATION_KEY, cid)]
            if code is grpc.StatusCode.OK:
                response = rpc.MikeyMessage(data=reply.data)
            else:
                response = rpc.MikeyMessage()
                if reply.error_message is not None:
                    trailing.append((ERROR_TRAILER, bytes(reply.error_message)))
                context.set_code(code)
                detail = INTERNAL_DETAIL if code is grpc.StatusCode.INTERNAL else reply.detail
                context.set_details(one_line(detail) or code.name.lower())
            context.set_trailing_metadata(tuple(trailing))
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "call",
                    extra={
                        "fields": {
                            "correlation_id": cid,
                            "method": method,
                            "outcome": reply.outcome.value,
                            "code": code.name,
                            "in_bytes": len(wire),
                            "out_bytes": len(reply.data),
                            "ms": round((time.monotonic() - started) * 1000, 3),
                        }
                    },
                )
            return response
        finally:
            if not registered:  # the call had already ended: nothing will call back
                self._release()

    def _undecodable(
        self, method: str, size: int, context: grpc.ServicerContext, _wire: bytes, now: float,
        *, correlation_id: str,
    ) -> KmsReply:
        """Malformed input like any other: INVALID_ARGUMENT, counted, audited by the core
        when it can (``refuse_undecodable``), one rate-limited log line."""
        self.counters["undecodable_body"] += 1
        self._log.warning(
            "undecodable", "request body is not a MikeyMessage",
            method=method, size=size, peer=peer_address(context.peer()),
            correlation_id=correlation_id,
        )  # fmt: skip
        refuse = getattr(self._handler, "refuse_undecodable", None)
        if callable(refuse):
            reply = refuse(size, now, correlation_id=correlation_id, detail=UNDECODABLE_DETAIL)
            if isinstance(reply, KmsReply):
                return reply
        return KmsReply(Outcome.MALFORMED, detail=UNDECODABLE_DETAIL)

    def _release(self) -> None:
        with self._idle:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.notify_all()


def tls_credentials(
    cert: Path, key: Path, client_ca: Path | None = None
) -> grpc.ServerCredentials:
    """Server TLS credentials; with ``client_ca`` clients must present a certificate issued
    by it (mutual TLS)."""

    def read(path: Path, what: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ServerError(f"cannot read {what} {path}: {exc.strerror}") from None

    cert_pem = read(cert, "TLS certificate")
    key_pem = read(key, "TLS key")
    ca_pem = None if client_ca is None else read(client_ca, "client CA")
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)],
        root_certificates=ca_pem,
        require_client_auth=ca_pem is not None,
    )


class KmsServer:
    """One gRPC server (one process): KeyManagement, health checking and reflection."""

    def __init__(
        self,
        handler: KmsHandler,
        listen: str,
        *,
        credentials: grpc.ServerCredentials | None = None,
        threads: int = DEFAULT_THREADS,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        reuse_port: bool = False,
        clock: Clock = time.time,
        slots: CoreSlots | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.listen = listen
        self.servicer = KmsServicer(handler, clock=clock, slots=slots)
        self.limits = limits or Limits()
        self.guard = CallGuard(self.limits)
        self.health = GuardedHealth(self.guard)
        self._executor = futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="kms-grpc"
        )
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_request_bytes),
            # Several worker processes share the port only when asked to. Otherwise keep the
            # port exclusive (gRPC turns SO_REUSEPORT on by default), so that a second server
            # on the same port fails to start instead of silently taking half the traffic.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            # SO_REUSEPORT spreads connections, not calls: a client keeps its connection to
            # one worker. Ageing connections out makes long-lived clients rebalance.
            ("grpc.max_connection_age_ms", 5 * 60 * 1000),
            ("grpc.max_connection_age_grace_ms", 30 * 1000),
            # What one connection can hold: HTTP/2 streams beyond this wait in the client
            # (SETTINGS_MAX_CONCURRENT_STREAMS), not in the server.
            ("grpc.max_concurrent_streams", self.limits.max_streams_per_connection),
            ("grpc.max_metadata_size", MAX_METADATA_BYTES),
            ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
        ]
        self._server = grpc.server(
            self._executor,
            options=options,
            maximum_concurrent_rpcs=threads,
        )
        # The KMS methods read their one request message themselves (stream-request
        # handlers; unary clients call them unchanged), under the call guard: a call whose
        # request does not arrive is cancelled instead of holding an admitted call forever.
        methods = {
            name: grpc.stream_unary_rpc_method_handler(
                self._guarded(name),
                request_deserializer=parse_request,
                response_serializer=rpc.MikeyMessage.SerializeToString,
            )
            for name in ("RequestTicket", "ResolveTicket")
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, methods),)
        )
        # Also as registered methods (what generated add_*_to_server code does): gRPC core
        # matches their paths itself, so a call skips the Python walk over generic handlers.
        self._server.add_registered_method_handlers(SERVICE_NAME, methods)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(listen)
            else:
                self.port = self._server.add_secure_port(listen, credentials)
        except RuntimeError:
            raise ServerError(f"cannot listen on {listen} (address in use?)") from None
        if self.port == 0:  # older grpc versions report failure this way
            raise ServerError(f"cannot listen on {listen} (address in use?)")

    def _guarded(self, method: str) -> Callable[[Iterator[Any], grpc.ServicerContext], Any]:
        target = getattr(self.servicer, method)
        guard = self.guard

        def call(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            peer = peer_address(context.peer())
            if not guard.admit(peer):
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls from this address"
                )
            try:
                ticket = guard.waiting(context, peer)
                try:
                    # Cancelled by the guard (no request in time): raises grpc.RpcError,
                    # which gRPC ends silently.
                    request = next(requests, None)
                finally:
                    in_time = guard.received(ticket)
                if not in_time:
                    # The guard cancelled the call just as its request arrived: the client
                    # sees CANCELLED, so nothing may be issued for it.
                    context.abort(grpc.StatusCode.CANCELLED, "request arrived too late")
                if request is None:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no request message")
                return target(request, context)
            finally:
                guard.leave(peer)

        return call

    def start(self) -> None:
        self._server.start()
        for service in HEALTH_SERVICES:
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def drain(self, grace: float) -> bool:
        """Stop: NOT_SERVING, refuse new calls, let in-flight KMS calls finish within
        ``grace`` seconds, then cancel whatever is left. True if nothing had to be cut off.

        Health ``Watch`` streams never end by themselves; waiting for the server's own grace
        would make every shutdown last the full grace period whenever a load balancer
        watches. So the wait is for the KMS calls only, and the rest is cancelled after.
        """
        deadline = time.monotonic() + grace
        self.servicer.start_draining()  # before NOT_SERVING: a client that saw it is refused
        self.health.enter_graceful_shutdown()  # watchers see NOT_SERVING now
        stopped = self._server.stop(grace)
        clean = self.servicer.wait_idle(deadline - time.monotonic())
        self._server.stop(None)  # cancel what is left (health watches, reflection streams)
        stopped.wait(max(deadline - time.monotonic(), 0.0) + 1.0)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.guard.stop()
        return clean

    def stop(self) -> None:
        """Stop at once (tests, error paths)."""
        self.health.enter_graceful_shutdown()
        self._server.stop(None).wait(5)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.guard.stop()


__all__ = [
    "CORRELATION_KEY",
    "ERROR_TRAILER",
    "HEALTH_SERVICES",
    "MAX_REQUEST_BYTES",
    "SERVICE_NAME",
    "STATUS_BY_OUTCOME",
    "KmsServer",
    "KmsServicer",
    "ServerError",
    "correlation_id",
    "peer_hops",
    "tls_credentials",
]
