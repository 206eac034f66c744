"""The gRPC adapter's per-call half: ``mikey.kms.v1.KeyManagement`` over a
:class:`KmsHandler`, as coroutines of the event-loop server (:mod:`kms.server.grpc_server`).

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

Where the handler runs (:class:`CoreRunner`): inline on the event loop when the worker has
one core slot (kms.server.slots; the SoftHSM default), so that no thread hand-off sits
between gRPC's events and the core; in a pool of threads, each taking a core slot, when
calls must compute or wait in parallel (several slots: a hardware HSM; or cluster mode,
whose database round trips must not stop the loop). Inline, two kinds of blocking work never
run on the loop: the core yields them as steps (:mod:`kms.server.federated`), runs its own
steps on the loop and gets each one's result back when the runner has awaited it in a
thread. A federated resolve's peer call (RFC 6043 9) runs in the peer pool; the RSA
private-key decryption of a PK message's PKE (RFC 3830 4.2.5; RFC 6043 5.1, 5.3), about a
millisecond of C in SoftHSM, runs in the token thread (one per worker). While it runs, the
loop serves the worker's other calls (PSK exchanges, health checks); if the token hangs in
that operation, the PK call waits and the rest of the worker goes on serving. In threads
mode each call drives its own steps in its core thread, holding its slot as before.

A call cancelled while its steps wait (client cancel, deadline, drain) is handed back to the
core at the step where it waits (:func:`kms.core.steps.cancel`), which writes its one audit
record with outcome CANCELLED; then the cancellation goes on to gRPC.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc

from kms import rpc
from kms.core.api import KmsHandler, KmsReply, Outcome, refuse_undecodable
from kms.core.steps import CallCancelled, TokenIo, cancel
from kms.rpc import CORRELATION_KEY, ERROR_TRAILER, HOPS_KEY
from kms.server import tracing
from kms.server.admission import EventCounts, RateLimitedLog, peer_address
from kms.server.federated import CallSteps
from kms.server.slots import CoreSlots

log = logging.getLogger("kms.server.grpc")

MAX_CORRELATION_ID = 64
# RFC 6043 9 federation: how many KMSs a ResolveTicket already crossed (set by the forwarding
# KMS). Bounded: a garbled or absurd value counts as "too many", so it is never forwarded.
MAX_HOPS = 8
MAX_DETAIL = 256
INTERNAL_DETAIL = "internal error"
UNDECODABLE_DETAIL = "request is not a mikey.kms.v1.MikeyMessage"
# Threads that wait on peer KMSs for federated resolves (RFC 6043 9), per worker: a peer
# call holds one for up to its deadline, and nothing of the core.
PEER_THREADS = 16
# Threads that run the core's yielded token operations (the PKE's RSA decryption) off the
# event loop, per worker: ONE. SoftHSM's RSA is CPU-bound C that releases the GIL; the loop
# is the worker's other runnable thread, and these machines have two cores (another worker
# or process gets the rest). A second token thread would only make two RSA operations
# share a core with the loop and each other, and slow the loop's own calls; a burst of PK
# calls queues here instead, while the loop keeps serving.
TOKEN_THREADS = 1

STATUS_BY_OUTCOME: dict[Outcome, grpc.StatusCode] = {
    Outcome.OK: grpc.StatusCode.OK,
    Outcome.MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    Outcome.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Outcome.DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Outcome.PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Outcome.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Outcome.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Outcome.INTERNAL: grpc.StatusCode.INTERNAL,
    Outcome.CANCELLED: grpc.StatusCode.CANCELLED,
}

_CID_DROP = re.compile(r"[^A-Za-z0-9._:\-]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")

Clock = Callable[[], float]


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


class CoreRunner:
    """Runs the handler's calls: inline on the loop (``threads`` 0), or in a pool of
    ``threads`` threads, each holding one of ``slots`` while the core computes (and giving
    it up while it waits on the network: kms.server.slots)."""

    def __init__(self, slots: CoreSlots, threads: int) -> None:
        self.slots = slots
        self.inline = threads == 0
        self._pool = (
            None if self.inline
            else futures.ThreadPoolExecutor(threads, thread_name_prefix="kms-core")
        )
        self._peers: futures.ThreadPoolExecutor | None = None
        self._token: futures.ThreadPoolExecutor | None = None

    async def run(self, fn: Callable[..., KmsReply], metadata: Any, *args: Any,
                  **kwargs: Any) -> KmsReply:
        if self._pool is None:
            tracing.set_incoming(metadata)  # W3C traceparent, if sent
            # The loop is the one slot; taking it costs a microsecond and keeps what the
            # slots record the same in both modes (kms_core_slot_wait_seconds, about 0 here:
            # calls wait for the loop before they get this far).
            with self.slots.held():
                return fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        call = functools.partial(self._held, fn, metadata, args, kwargs)
        return await loop.run_in_executor(self._pool, call)

    def _held(self, fn: Callable[..., KmsReply], metadata: Any, args: Any, kwargs: Any
              ) -> KmsReply:
        tracing.set_incoming(metadata)
        with self.slots.held():
            return fn(*args, **kwargs)

    async def steps(self, steps_fn: Callable[..., CallSteps], metadata: Any, *args: Any,
                    **kwargs: Any) -> KmsReply:
        """A call as steps. Inline: the core's steps on the loop, each yielded token
        operation awaited in the token thread, each peer call in the peer pool. In threads
        mode: the steps driven in the call's core thread (:meth:`_held_steps`). Neither kind
        of operation raises.

        A call cancelled while it waits for an operation (the client hung up, its deadline
        passed, drain cut it off) is not dropped: the core is told at the step where it
        waits (:func:`kms.core.steps.cancel`) and writes its record, outcome CANCELLED;
        then the CancelledError goes on, so that gRPC ends the call as cancelled. The
        operation may still finish in its thread; its result goes nowhere."""
        if self._pool is not None:
            return await self._threaded_steps(steps_fn, metadata, args, kwargs)
        tracing.set_incoming(metadata)
        steps = steps_fn(*args, **kwargs)
        answer: Any = None
        loop = asyncio.get_running_loop()
        try:
            while True:
                with self.slots.held():
                    io = steps.send(answer)
                answer = await loop.run_in_executor(self._pool_for(io), io)
        except StopIteration as done:
            reply: KmsReply = done.value
            return reply
        except asyncio.CancelledError:
            # Only an await raises it: the steps wait at a yield. The audit write is
            # synchronous and short; made before gRPC learns the call is over.
            with self.slots.held():
                _record_cancel(steps, kwargs.get("correlation_id", ""))
            raise

    async def _threaded_steps(self, steps_fn: Callable[..., CallSteps], metadata: Any,
                              args: Any, kwargs: Any) -> KmsReply:
        loop = asyncio.get_running_loop()
        gave_up = threading.Event()
        call = functools.partial(self._held_steps, steps_fn, metadata, args, kwargs, gave_up)
        try:
            return await loop.run_in_executor(self._pool, call)
        except asyncio.CancelledError:
            # Not yet started in the pool: it never will (the core never saw it). Started:
            # the core thread tells the steps when the operation they wait for returns,
            # and the core records the call then (it runs there, not here).
            gave_up.set()
            raise

    def _held_steps(self, steps_fn: Callable[..., CallSteps], metadata: Any, args: Any,
                    kwargs: Any, gave_up: threading.Event) -> KmsReply:
        """Threads mode: the steps on this core thread, holding its slot except while a
        peer call waits on the network (kms.server.slots); ``gave_up`` set (the call was
        cancelled) before or while an operation runs: the core is told, not sent its result."""
        tracing.set_incoming(metadata)
        with self.slots.held():
            steps = steps_fn(*args, **kwargs)
            answer: Any = None
            try:
                while True:
                    io = steps.send(answer)
                    if not gave_up.is_set():
                        if isinstance(io, TokenIo):
                            answer = io()
                        else:
                            with self.slots.released():
                                answer = io()
                    if gave_up.is_set():
                        return _record_cancel(steps, kwargs.get("correlation_id", ""))
            except StopIteration as done:
                reply: KmsReply = done.value
                return reply

    def _pool_for(self, io: Callable[[], Any]) -> futures.ThreadPoolExecutor:
        if isinstance(io, TokenIo):
            if self._token is None:
                self._token = futures.ThreadPoolExecutor(
                    TOKEN_THREADS, thread_name_prefix="kms-token"
                )
            return self._token
        if self._peers is None:
            self._peers = futures.ThreadPoolExecutor(PEER_THREADS, thread_name_prefix="kms-peer")
        return self._peers

    def close(self) -> None:
        for pool in (self._pool, self._peers, self._token):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)


def _record_cancel(steps: CallSteps, cid: str) -> KmsReply:
    """Tell ``steps`` their call was cancelled; the core records it (one audit record,
    outcome CANCELLED; the metrics and the span of an observed handler count it). Whatever
    goes wrong here is logged (type only) and becomes an INTERNAL reply, which nobody
    receives: the cancellation itself must go on."""
    try:
        reply = cancel(steps)
    except CallCancelled:
        # Steps that do not answer a cancellation (a handler's own, without the core's
        # record): nothing more to record.
        return KmsReply(Outcome.CANCELLED)
    except Exception as exc:
        log.error("recording a cancelled call raised %s", type(exc).__name__,
                  extra={"fields": {"correlation_id": cid}})
        return KmsReply(Outcome.INTERNAL)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("call cancelled", extra={"fields": {
            "correlation_id": cid, "outcome": reply.outcome.value, "code": "CANCELLED"}})
    return reply


class KmsServicer:
    """RequestTicket / ResolveTicket on the event loop; counts in-flight calls for
    draining."""

    def __init__(
        self, handler: KmsHandler, *, clock: Clock = time.time, slots: CoreSlots | None = None,
        threads: int = 0,
    ) -> None:
        self._handler = handler
        self._clock = clock
        # One slot and no threads: the core runs on the loop, one call at a time.
        self.slots = slots or CoreSlots(max(threads, 1))
        self.runner = CoreRunner(self.slots, threads)
        # Calls run as steps when the handler offers them (kms.server.federated): inline
        # on the loop, in threads mode in the core thread; either way a call cancelled
        # while a step waits is recorded by the core (CoreRunner.steps).
        steps = getattr(handler, "resolve_steps", None)
        self._steps: Callable[..., CallSteps] | None = steps if callable(steps) else None
        request = getattr(handler, "request_steps", None)
        self._request_steps: Callable[..., CallSteps] | None = (
            request if callable(request) else None
        )
        self._inflight = 0
        self._idle: asyncio.Event | None = None
        self._draining = False
        self.counters = EventCounts()
        self._log = RateLimitedLog(log)

    @property
    def inflight(self) -> int:
        return self._inflight

    def start_draining(self) -> None:
        self._draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is being handled; False on timeout (on the loop)."""
        if self._inflight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), max(timeout, 0.0))
        except TimeoutError:
            return self._inflight == 0
        return True

    def _release(self, _context: Any = None) -> None:
        self._inflight -= 1
        if self._inflight == 0 and self._idle is not None:
            self._idle.set()

    async def call(self, method: str, request: Any, context: Any) -> Any:
        if self._draining:
            # Between NOT_SERVING and the server refusing connections, calls that still
            # arrive are refused here, so that none starts after draining began.
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        # The call counts as in flight until gRPC has finished it (response and status sent,
        # or the call cancelled), not merely until the handler returns: otherwise drain()
        # could see "idle" and its final stop cut off a response the KMS already issued.
        self._inflight += 1
        context.add_done_callback(self._release)
        started = time.monotonic()
        metadata = context.invocation_metadata()
        cid = correlation_id(metadata)
        runner = self.runner
        try:
            if isinstance(request, Undecodable):
                wire = b""
                reply = await runner.run(
                    self._undecodable, metadata, method, request.size, context.peer(), wire,
                    self._clock(), correlation_id=cid,
                )
            else:
                wire = request.data
                if method == "RequestTicket":
                    if self._request_steps is not None:
                        reply = await runner.steps(self._request_steps, metadata, wire,
                                                   self._clock(), correlation_id=cid)
                    else:
                        reply = await runner.run(self._handler.request_ticket, metadata,
                                                 wire, self._clock(), correlation_id=cid)
                else:
                    hops = peer_hops(metadata)
                    kw: dict[str, Any] = {"correlation_id": cid}
                    if hops:  # only then: handlers without federation need not know it
                        kw["hops"] = hops
                    if self._steps is not None:
                        reply = await runner.steps(self._steps, metadata, wire,
                                                   self._clock(), **kw)
                    else:
                        reply = await runner.run(self._handler.resolve_ticket, metadata,
                                                 wire, self._clock(), **kw)
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
            await context.send_initial_metadata(((CORRELATION_KEY, cid),))
            context.set_trailing_metadata(((CORRELATION_KEY, cid),))
            context.set_code(grpc.StatusCode.INTERNAL)
            context.set_details(INTERNAL_DETAIL)
            return rpc.MikeyMessage()

        await context.send_initial_metadata(((CORRELATION_KEY, cid),))
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

    def _undecodable(
        self, method: str, size: int, peer: str, _wire: bytes, now: float, *,
        correlation_id: str,
    ) -> KmsReply:
        """Malformed input like any other: INVALID_ARGUMENT, counted, audited by the core
        when it can (``refuse_undecodable``), one rate-limited log line."""
        self.counters["undecodable_body"] += 1
        self._log.warning(
            "undecodable", "request body is not a MikeyMessage",
            method=method, size=size, peer=peer_address(peer), correlation_id=correlation_id,
        )  # fmt: skip
        return refuse_undecodable(
            self._handler, size, now, correlation_id=correlation_id, detail=UNDECODABLE_DETAIL
        )

    def close(self) -> None:
        self.runner.close()


__all__ = [
    "CORRELATION_KEY",
    "ERROR_TRAILER",
    "STATUS_BY_OUTCOME",
    "CoreRunner",
    "KmsServicer",
    "correlation_id",
    "parse_request",
    "peer_hops",
]
