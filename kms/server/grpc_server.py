"""The gRPC server of one worker process: ``mikey.kms.v1.KeyManagement`` (the per-call
adapter, :mod:`kms.server.adapter`), health checking and reflection, on grpc.aio.

The server is an asyncio gRPC server whose event loop runs on a thread of its own
(:class:`KmsServer` is the blocking face ``kms serve`` and the tests use: start, drain,
stop). With one core slot (the SoftHSM default, kms.server.slots) the core runs inline on
that loop: the thread that handles gRPC's events also computes, with no hand-off between a
poller thread, a pool thread and the core slot. Against the thread-pool server it replaced
that gave 1.35-1.45 x the rate at 8 and 64 clients and about the same at 1 client, in the
quieter of two alternating runs (docs/performance.md, "Second pass, part S"). With more
core slots, or in cluster mode (PostgreSQL round trips, which must not stop the loop), the
core runs in a pool of threads instead (``[server] core_calls``).

Guarantees kept from the thread-pool server: ``maximum_concurrent_rpcs`` admitted calls
(more are refused with RESOURCE_EXHAUSTED at once), the call guard (kms.server.admission:
request-arrival timeout, shedding, per-address bound), request and metadata size limits,
connection ageing and SO_REUSEPORT only when several workers share the port, and draining
(NOT_SERVING, no call started after it began, in-flight calls finished within the grace).

TLS follows renewed certificate files without a restart (:func:`tls_credentials`, grpcio's
dynamic server credentials fed by :class:`kms.server.tls_files.TlsWatch`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kms import rpc
from kms.core.api import KmsHandler
from kms.rpc import CORRELATION_KEY, ERROR_TRAILER, SERVICE_NAME
from kms.server.adapter import (
    STATUS_BY_OUTCOME,
    UNDECODABLE_DETAIL,
    Clock,
    KmsServicer,
    correlation_id,
    parse_request,
    peer_hops,
)
from kms.server.admission import CallGuard, GuardedHealth, Limits, peer_address
from kms.server.slots import CoreSlots
from kms.server.tls_files import DEFAULT_RECHECK_S, TlsFileError, TlsMaterial, TlsWatch

T = TypeVar("T")

log = logging.getLogger("kms.server.grpc")

# A MIKEY message is a few hundred bytes (a PK request with two certificates a few KiB);
# anything near this limit is not a request we want to spend token time on.
MAX_REQUEST_BYTES = 64 * 1024
# Calls admitted per process (maximum_concurrent_rpcs): beyond it a call is refused with
# RESOURCE_EXHAUSTED at once (no hidden queue). Admitted calls wait for the loop or a core
# slot, which costs nothing while they wait; a refused call that the client retries costs
# the server a call each time. So admit many: 64 clients on one worker gave 135/s with 32
# admitted calls and 259/s with 128 (bench, Ticket Request PSK, docs/performance.md).
DEFAULT_THREADS = 128
HEALTH_SERVICES = ("", SERVICE_NAME)
# Request metadata a KMS client needs is small (x-correlation-id, mikey-hops and gRPC's
# own); more is refused with RESOURCE_EXHAUSTED by the transport before any handler runs.
MAX_METADATA_BYTES = 4096
STARTUP_TIMEOUT_S = 30.0
LAG_PROBE_S = 0.25  # how often the event loop's lag is sampled (kms_event_loop_lag_seconds)


class ServerError(Exception):
    """The server cannot start (bind failure, unreadable TLS files); one line."""


def tls_watch(
    cert: Path,
    key: Path,
    client_ca: Path | None = None,
    *,
    recheck_s: float = DEFAULT_RECHECK_S,
) -> TlsWatch:
    """The server's TLS files, read and validated now (ServerError, one line, if they cannot
    be served), watched for renewal afterwards (:mod:`kms.server.tls_files`)."""
    try:
        return TlsWatch("grpc", cert, key, client_ca, recheck_s=recheck_s)
    except TlsFileError as exc:
        raise ServerError(str(exc)) from None


def tls_credentials(watch: TlsWatch) -> grpc.ServerCredentials:
    """Server TLS credentials that follow renewed files without a restart; with a client CA,
    clients must present a certificate issued by it (mutual TLS).

    gRPC calls the fetcher before every new handshake, on one of its own threads; it
    returns a new configuration only when :meth:`TlsWatch.poll` took a renewed, valid set
    (at most one stat of the files per ``recheck_s``), else None: keep the current one.
    Connections already open keep the session they negotiated."""

    def configuration(m: TlsMaterial) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(m.key_pem, m.cert_pem)], root_certificates=m.ca_pem
        )

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            new = watch.poll()
        except Exception:  # a bug here must not stop handshakes: keep what is served
            log.exception("TLS reload check failed", extra={"fields": {"listener": "grpc"}})
            return None
        return None if new is None else configuration(new)

    return grpc.dynamic_ssl_server_credentials(
        configuration(watch.current),
        fetch,
        require_client_authentication=watch.client_ca is not None,
    )


class KmsServer:
    """One gRPC server (one process): KeyManagement, health checking and reflection.

    ``core_threads`` 0 runs the core inline on the event loop (one core slot); N > 0 runs
    it in N threads that share ``slots``. ``threads`` is the number of calls admitted at
    once (``maximum_concurrent_rpcs``; the name is the thread-pool server's)."""

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
        core_threads: int | None = None,
    ) -> None:
        self.listen = listen
        if core_threads is None:  # inline with one slot, else a thread per admitted call
            core_threads = 0 if slots is None or slots.size == 1 else threads
        self.servicer = KmsServicer(handler, clock=clock, slots=slots, threads=core_threads)
        self.limits = limits or Limits()
        self.guard = CallGuard(self.limits)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="kms-loop", daemon=True)
        self._thread.start()
        self.health: GuardedHealth
        self._server: grpc.aio.Server
        try:
            self.port = self._on_loop(
                self._create(listen, credentials, threads, max_request_bytes, reuse_port)
            )
        except BaseException:
            self._close_loop()
            raise

    @property
    def inline(self) -> bool:
        return self.servicer.runner.inline

    def watch_lag(self, observe: Callable[[float], None]) -> None:
        """Every ``LAG_PROBE_S``, how late the event loop ran a callback that was due then,
        in seconds, to ``observe``: the time the loop spent on other work first (a call's
        computation, a stall), which is what a call waiting for the loop waits."""

        def probe(due: float) -> None:
            now = self._loop.time()
            try:
                observe(max(0.0, now - due))
            finally:
                self._loop.call_at(now + LAG_PROBE_S, probe, now + LAG_PROBE_S)

        def first() -> None:
            due = self._loop.time() + LAG_PROBE_S
            self._loop.call_at(due, probe, due)

        self._loop.call_soon_threadsafe(first)

    # --- the loop thread ----------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _on_loop(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _close_loop(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()
        self.servicer.close()

    async def _create(
        self, listen: str, credentials: grpc.ServerCredentials | None, threads: int,
        max_request_bytes: int, reuse_port: bool,
    ) -> int:
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
        self._server = grpc.aio.server(options=options, maximum_concurrent_rpcs=threads)
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
        self.health = GuardedHealth(self.guard)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        try:
            if credentials is None:
                port = self._server.add_insecure_port(listen)
            else:
                port = self._server.add_secure_port(listen, credentials)
        except RuntimeError:
            raise ServerError(f"cannot listen on {listen} (address in use?)") from None
        if port == 0:  # older grpc versions report failure this way
            raise ServerError(f"cannot listen on {listen} (address in use?)")
        return int(port)

    def _guarded(self, method: str) -> Callable[[Any, Any], Awaitable[Any]]:
        servicer = self.servicer
        guard = self.guard

        async def call(_requests: Any, context: Any) -> Any:
            peer = peer_address(context.peer())
            if not guard.admit(peer):
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls from this address"
                )
            try:
                task = asyncio.current_task()
                assert task is not None
                ticket = guard.waiting(task, peer)
                try:
                    request = await context.read()
                except asyncio.CancelledError:
                    if guard.received(ticket):
                        raise  # cancelled by gRPC (client gone, server stopping)
                    # Cancelled by the guard: no request in time, or shed.
                    task.uncancel()
                    await context.abort(grpc.StatusCode.CANCELLED, "no request in time")
                if not guard.received(ticket):
                    await context.abort(grpc.StatusCode.CANCELLED, "request arrived too late")
                if request is grpc.aio.EOF:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no request message")
                return await servicer.call(method, request, context)
            finally:
                guard.leave(peer)

        return call

    # --- the blocking face ----------------------------------------------------------------

    def start(self) -> None:
        async def start() -> None:
            await self._server.start()
            for service in HEALTH_SERVICES:
                await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

        self._on_loop(start(), STARTUP_TIMEOUT_S)

    def set_ready(self, up: bool) -> None:
        """Readiness: ``mikey.kms.v1.KeyManagement`` is NOT_SERVING while the token (or, in
        cluster mode, the database) does not answer (its calls would be UNAVAILABLE), SERVING
        again when it does; the overall service ``""`` stays SERVING (the process lives:
        liveness). Called from the probe's thread; ignored once draining began
        (grpc.health.v1 keeps NOT_SERVING)."""
        status = (health_pb2.HealthCheckResponse.SERVING if up
                  else health_pb2.HealthCheckResponse.NOT_SERVING)  # fmt: skip
        if not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self.health.set(SERVICE_NAME, status), self._loop)

    def drain(self, grace: float) -> bool:
        """Stop: NOT_SERVING, refuse new calls, let in-flight KMS calls finish within
        ``grace`` seconds, then cancel whatever is left. True if nothing had to be cut off.

        Health ``Watch`` streams never end by themselves; waiting for the server's own grace
        would make every shutdown last the full grace period whenever a load balancer
        watches. So the wait is for the KMS calls only, and the rest is cancelled after.
        """

        async def drain() -> bool:
            self.servicer.start_draining()  # before NOT_SERVING: a client that saw it is refused
            await self.health.enter_graceful_shutdown()  # watchers see NOT_SERVING now
            clean = await self.servicer.wait_idle(grace)
            await self._server.stop(None)  # cancel what is left (watches, reflection streams)
            self.guard.stop()
            return clean

        try:
            return self._on_loop(drain(), grace + 10.0)
        except concurrent.futures.TimeoutError:
            return False
        finally:
            self._close_loop()

    def stop(self) -> None:
        """Stop at once (tests, error paths)."""

        async def stop() -> None:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(None)
            self.guard.stop()

        try:
            if not self._loop.is_closed():
                self._on_loop(stop(), 10.0)
        finally:
            self._close_loop()


__all__ = [
    "CORRELATION_KEY",
    "ERROR_TRAILER",
    "HEALTH_SERVICES",
    "MAX_REQUEST_BYTES",
    "SERVICE_NAME",
    "STATUS_BY_OUTCOME",
    "UNDECODABLE_DETAIL",
    "KmsServer",
    "KmsServicer",
    "ServerError",
    "correlation_id",
    "peer_hops",
    "tls_credentials",
    "tls_watch",
]
