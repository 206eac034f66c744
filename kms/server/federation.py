"""Federation transport (RFC 6043 9): the gRPC client a KMS uses to ask the KMS that issued a
ticket to resolve it.

RFC 6043 9: when a Responder's KMS did not issue the ticket, it "acts itself as a Responder"
toward the issuing KMS. The core (:mod:`kms.core.federation`) builds that RESOLVE_INIT_PSK and
verifies the answer; this module only carries the bytes, through the
:class:`kms.core.ports.PeerResolver` port:

* One cached channel per peer address (and trust settings), reused by every worker thread.
* Mutual TLS by default. The peer's server certificate must chain to the CA registered with
  ``kms peer add --ca`` (else to the system roots) and name the host of its address; this KMS
  presents ``[federation] client_cert`` (default: its ``[server] tls_cert``). Renewed client
  certificate files are taken without a restart (:mod:`kms.server.tls_files`): before a peer
  call, when the files changed and the new pair is valid, new channels are built with it;
  calls in flight finish on the old channels, which are closed a while later. The MIKEY MAC
  with the key shared with the peer is what authenticates the resolve; TLS keeps tickets and
  identities off the wire and stops a stranger from even reaching the peer's KMS core.
  Plaintext only to a loopback address of a peer registered without a CA, and only with
  ``[federation] allow_plaintext = true``.
* One deadline per call, the peer's ``deadline_ms``, covering every attempt: a slow or dead
  peer costs the Responder at most that long.
* Bounded retries: at most ``[federation] max_retries`` more attempts, only when the call
  failed with UNAVAILABLE (nothing answered), after a short backoff, and only if the deadline
  leaves room. A retry waits up to ``RETRY_WAIT_S`` for the connection (a peer that has just
  come back is reached after the channel's reconnect backoff, at most a second). A refusal is
  never retried (the peer decided), nor DEADLINE_EXCEEDED (the time is spent). Resending the
  same RESOLVE_INIT is safe: if the first copy did reach the peer, its replay cache refuses
  the second, so a resolve is never performed twice.
* Metadata: ``x-correlation-id`` (so both audit logs carry one linked event) and
  ``mikey-hops`` (how many KMSs the request crossed; the issuing side never forwards again).
* Errors become :class:`kms.core.ports.PeerError`: UNAVAILABLE, DEADLINE_EXCEEDED and
  connection failures are ``"unavailable"``; any other status is ``"refused"`` with the status
  name, the peer's one-line detail and its MIKEY error message (``mikey-error-bin``), which
  the core maps to the Responder's own error.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from kms import rpc
from kms.core.ports import PeerError, PeerKms
from kms.rpc import CORRELATION_KEY, ERROR_TRAILER, HOPS_KEY
from kms.server.config import KmsConfig, is_loopback, split_listen
from kms.server.tls_files import TlsFileError, TlsWatch
from kms.server.tracing import outgoing_metadata
from kms.store.registry import Registry, UnknownPeer, show_identity

log = logging.getLogger("kms.server.federation")

BACKOFF_S = 0.05  # first pause before a retry; doubles per attempt
MIN_ATTEMPT_S = 0.05  # no retry that would have less than this left of the deadline
RETRY_WAIT_S = 1.2  # a retry waits this long at most for a connection (> max reconnect backoff)
# A channel built with a client certificate that was since renewed takes no new call; it is
# closed this long after (far beyond any peer deadline: calls in flight on it are finished).
RETIRED_CLOSE_S = 120.0
MAX_DETAIL = 200
MAX_MESSAGE_BYTES = 64 * 1024  # a RESOLVE_RESP is a few hundred bytes

# A peer that was down must be reachable again soon after it is back: gRPC's default
# reconnect backoff grows to two minutes, during which every call would fail at once.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # A peer that is a cluster (a DNS name with several records, or several addresses):
    # spread the forwarded resolves over its replicas, and skip one that is down.
    ("grpc.lb_policy_name", "round_robin"),
)


def peer_target(address: str) -> tuple[str, list[str]]:
    """(gRPC target, hosts) of a peer's address: ``HOST:PORT`` (a DNS name may have several
    records, one per replica), or several ``IP:PORT`` separated by commas. ValueError if
    malformed."""
    parts = [a.strip() for a in address.split(",")]
    hosts = [split_listen(p)[0] for p in parts]
    if len(parts) == 1:
        return parts[0], hosts
    for family in (ipaddress.IPv4Address, ipaddress.IPv6Address):
        try:
            for h in hosts:
                family(h)
        except ValueError:
            continue
        scheme = "ipv4" if family is ipaddress.IPv4Address else "ipv6"
        return f"{scheme}:" + ",".join(parts), hosts
    raise ValueError(
        "several addresses must all be IP literals of one family; for host names give one "
        "DNS name with several records"
    )

_UNAVAILABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class FederationConfigError(Exception):
    """The ``[federation]`` client credentials cannot be read; one line."""


@dataclass(frozen=True)
class PeerRoute:
    """Where a peer KMS listens and which CA its server certificate must chain to."""

    address: str
    ca_pem: bytes | None = None


RouteLookup = Callable[[bytes], PeerRoute | None]


@dataclass(frozen=True)
class ClientIdentity:
    """This KMS's TLS client certificate chain and key (PEM) for mutual TLS to peers."""

    cert_pem: bytes
    key_pem: bytes


class RegistryRoutes:
    """Peer addresses from the registry, read per call (an address changed with ``kms peer``
    applies at once). One connection per thread: sqlite3 connections belong to their thread."""

    def __init__(self, source: Path | Callable[[], Registry]) -> None:
        if isinstance(source, Path):
            path = source
            self._open: Callable[[], Registry] = lambda: Registry.open(path)
        else:
            self._open = source  # the home's store backend (SQLite or PostgreSQL)
        self._local = threading.local()

    def __call__(self, kms_id: bytes) -> PeerRoute | None:
        reg: Registry | None = getattr(self._local, "registry", None)
        if reg is None:
            reg = self._open()
            self._local.registry = reg
        try:
            p = reg.get_peer(kms_id)
        except UnknownPeer:
            return None
        return PeerRoute(p.address, None if p.ca_pem is None else p.ca_pem.encode("ascii"))


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


class GrpcPeerResolver:
    """:class:`kms.core.ports.PeerResolver` over gRPC (see the module docstring)."""

    def __init__(
        self,
        routes: RouteLookup,
        *,
        client: ClientIdentity | TlsWatch | None = None,
        allow_plaintext: bool = False,
        max_retries: int = 1,
        backoff_s: float = BACKOFF_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._routes = routes
        # A TlsWatch: the client certificate follows renewed files (checked before a call).
        self.client_watch = client if isinstance(client, TlsWatch) else None
        if isinstance(client, TlsWatch):
            client = ClientIdentity(client.current.cert_pem, client.current.key_pem)
        self._client = client
        self._allow_plaintext = allow_plaintext
        self._max_retries = max(0, max_retries)
        self._backoff_s = backoff_s
        self._clock = clock
        self._sleep = sleep
        self._channels: dict[tuple[str, bytes | None, bool], tuple[grpc.Channel, Any]] = {}
        self._retired: list[tuple[float, grpc.Channel]] = []  # (when, channel)
        self._lock = threading.Lock()

    @classmethod
    def from_config(
        cls, config: KmsConfig, registry_path: Path | Callable[[], Registry]
    ) -> GrpcPeerResolver:
        """The resolver of a KMS home: [federation] settings, peer addresses from the
        registry. The client certificate defaults to the server's own (``[server] tls_cert``);
        without either, TLS peers are refused at call time with a clear reason."""
        fed = config.federation
        cert, key = fed.client_cert, fed.client_key
        if cert is None:
            cert, key = config.server.tls_cert, config.server.tls_key
        client = None
        if cert is not None and key is not None:
            try:
                client = TlsWatch("federation_client", cert, key)
            except TlsFileError as exc:
                raise FederationConfigError(f"[federation] client certificate: {exc}") from None
        return cls(
            RegistryRoutes(registry_path),
            client=client,
            allow_plaintext=fed.allow_plaintext,
            max_retries=fed.max_retries,
        )

    # --- the port -------------------------------------------------------------------------
    def forward_resolve(
        self,
        peer: PeerKms,
        wire: bytes,
        *,
        correlation_id: str,
        hops: int,
        rebuild: Callable[[], bytes] | None = None,
    ) -> bytes:
        name = show_identity(peer.kms_id)
        route = self._routes(peer.kms_id)
        if route is None:  # removed between the core's lookup and ours
            raise PeerError("unavailable", f"peer {name} is no longer registered")
        stub = self._stub(route, name)
        metadata = (
            (CORRELATION_KEY, correlation_id), (HOPS_KEY, str(hops)), *outgoing_metadata()
        )
        request = rpc.MikeyMessage(data=wire)
        deadline = self._clock() + peer.deadline_s
        attempt = 0
        first: str | None = None  # why the first attempt failed, when it is retried
        while True:
            attempt += 1
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise self._fail(
                    "unavailable",
                    f"no answer from {name} within {peer.deadline_s:g} s",
                    correlation_id,
                    attempt - 1,
                )
            # A retry waits (briefly) for the channel to connect: after a failure the channel
            # sits in its reconnect backoff, and a fail-fast retry inside it would fail too,
            # even though the peer may be back already.
            retry = attempt > 1
            timeout = min(remaining, RETRY_WAIT_S) if retry else remaining
            try:
                response = stub.ResolveTicket(
                    request, timeout=timeout, metadata=metadata, wait_for_ready=retry
                )
            except grpc.RpcError as exc:
                err: Any = exc  # also a grpc.Call: code(), details(), trailing_metadata()
                code: grpc.StatusCode = err.code()
                if code is grpc.StatusCode.UNAVAILABLE and attempt <= self._max_retries:
                    pause = self._backoff_s * 2 ** (attempt - 1)
                    if deadline - self._clock() > pause + MIN_ATTEMPT_S:
                        first = first or _one_line(err.details() or "")
                        self._sleep(pause)
                        if rebuild is not None:  # a fresh message: never the same bytes
                            request = rpc.MikeyMessage(data=rebuild())
                        continue
                raise self._rpc_error(err, code, name, correlation_id, attempt, first) from None
            return bytes(response.data)

    def close(self) -> None:
        with self._lock:
            channels = [c for c, _stub in self._channels.values()]
            channels += [c for _when, c in self._retired]
            self._channels.clear()
            self._retired.clear()
        for channel in channels:
            channel.close()

    # --- helpers --------------------------------------------------------------------------
    def _stub(self, route: PeerRoute, name: str) -> Any:
        try:
            target, hosts = peer_target(route.address)
        except ValueError:
            raise PeerError("unavailable", f"peer {name} has a bad address") from None
        plaintext = (
            route.ca_pem is None and self._allow_plaintext and all(is_loopback(h) for h in hosts)
        )
        key = (route.address, route.ca_pem, plaintext)
        with self._lock:
            self._follow_renewal()
            cached = self._channels.get(key)
            if cached is not None:
                return cached[1]
            if plaintext:
                channel = grpc.insecure_channel(target, options=list(CHANNEL_OPTIONS))
            else:
                if self._client is None:
                    raise self._fail(
                        "unavailable",
                        f"no client certificate for mutual TLS to {name} (set [federation] "
                        "client_cert/client_key or [server] tls_cert/tls_key)",
                        "",
                        0,
                    )
                creds = grpc.ssl_channel_credentials(
                    root_certificates=route.ca_pem,  # None: the system roots
                    private_key=self._client.key_pem,
                    certificate_chain=self._client.cert_pem,
                )
                channel = grpc.secure_channel(target, creds, options=list(CHANNEL_OPTIONS))
            stub = rpc.client_stub(channel)
            self._channels[key] = (channel, stub)
            return stub

    def _follow_renewal(self) -> None:
        """With the lock held: a renewed client certificate (valid, see
        :class:`TlsWatch`) replaces the current one; the TLS channels built with the old one
        take no new call and are closed after :data:`RETIRED_CLOSE_S`."""
        now = self._clock()
        while self._retired and now - self._retired[0][0] >= RETIRED_CLOSE_S:
            self._retired.pop(0)[1].close()  # oldest first: retired in time order
        if self.client_watch is None:
            return
        new = self.client_watch.poll()  # a stat at most once per second
        if new is None:
            return
        self._client = ClientIdentity(new.cert_pem, new.key_pem)
        for k in [k for k in self._channels if not k[2]]:  # TLS channels (not plaintext)
            self._retired.append((now, self._channels.pop(k)[0]))

    def _rpc_error(
        self,
        err: Any,
        code: grpc.StatusCode,
        name: str,
        cid: str,
        attempts: int,
        first: str | None = None,
    ) -> PeerError:
        detail = _one_line(err.details() or code.name.lower())
        if code in _UNAVAILABLE:
            if first is not None:  # the retry only waited: the first failure says why
                detail = f"{detail}; first attempt: {first}"
            text = _one_line(f"{name}: {code.name} after {attempts} attempt(s): {detail}")
            return self._fail("unavailable", text, cid, attempts)
        raw = dict(err.trailing_metadata() or ()).get(ERROR_TRAILER)
        error_message = bytes(raw) if isinstance(raw, bytes) else None
        return self._fail("refused", detail, cid, attempts, code.name, error_message)

    @staticmethod
    def _fail(
        kind: str,
        detail: str,
        cid: str,
        attempts: int,
        status: str = "",
        error_message: bytes | None = None,
    ) -> PeerError:
        log.warning(
            "peer resolve failed",
            extra={
                "fields": {
                    "correlation_id": cid,
                    "kind": kind,
                    "status": status,
                    "attempts": attempts,
                    "detail": detail,
                }
            },
        )
        return PeerError(kind, detail, status, error_message)


__all__ = [
    "CHANNEL_OPTIONS",
    "HOPS_KEY",
    "ClientIdentity",
    "FederationConfigError",
    "GrpcPeerResolver",
    "PeerRoute",
    "RegistryRoutes",
]
