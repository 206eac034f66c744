"""A small gRPC client for ``mikey.kms.v1.KeyManagement`` around the sans-IO endpoints.

:class:`KmsClient` moves one MIKEY message to the KMS and back: ``request_ticket`` and
``resolve_ticket`` take the initial message bytes and return the response bytes, or raise
:class:`KmsRefused` with the gRPC status, its one-line detail and the MIKEY error message the
KMS sent in the trailing metadata ``mikey-error-bin`` (RFC 6043 5.4).

The convenience flows tie that to :class:`~kms.endpoint.initiator.Initiator` and
:class:`~kms.endpoint.responder.Responder`: :func:`obtain_ticket` (Ticket Request),
:func:`resolve` (the Responder's Ticket Resolve for a TRANSFER_INIT) and :func:`run_call`
(request or reuse a ticket, transfer it, resolve it, finish both ends). They read the clock
only when ``now`` is not given; the cryptography stays in the sans-IO objects.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from kms import rpc
from kms.endpoint.initiator import DesiredPolicy, Initiator, TicketGrant
from kms.endpoint.responder import ResolvedCall, Responder
from kms.endpoint.session import AES_CM_128_HMAC_SHA1_80, CallState, CryptoSession, SrtpProfile
from kms.mikey.constants import DataType, ErrorNo
from kms.mikey.errors import DecodeError
from kms.mikey.message import Message
from kms.mikey.payloads import Error
from kms.rpc import CORRELATION_KEY, ERROR_TRAILER

DEFAULT_TIMEOUT_S = 10.0

Pem = bytes | str | Path


class KmsRefused(Exception):
    """The KMS (or the transport) did not answer with a MIKEY response.

    ``code``: the gRPC status; ``detail``: its one-line detail; ``error_message``: the MIKEY
    error message (HDR, T, ERR, [V]) from ``mikey-error-bin``, when the KMS sent one.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        detail: str,
        error_message: bytes | None = None,
        correlation_id: str | None = None,
    ) -> None:
        self.code = code
        self.detail = detail
        self.error_message = error_message
        self.correlation_id = correlation_id
        super().__init__(str(self))

    @property
    def error_no(self) -> int | None:
        """The ERR payload's error number of ``error_message``; None if absent/undecodable."""
        if self.error_message is None:
            return None
        try:
            msg = Message.decode(self.error_message)
        except DecodeError:
            return None
        if msg.data_type != DataType.ERROR:
            return None
        err = msg.first(Error)
        return None if err is None else err.error_no

    @property
    def error_name(self) -> str | None:
        n = self.error_no
        if n is None:
            return None
        try:
            return ErrorNo(n).name
        except ValueError:
            return f"ERR {n}"

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.detail}" if self.detail else self.code.name
        n = self.error_no
        if n is not None:
            text += f" (MIKEY error {n} {self.error_name})"
        return text


def _pem(value: Pem | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, Path):
        return value.read_bytes()
    return value.encode("ascii")


def split_targets(target: str | Sequence[str]) -> list[str]:
    """``"a:1,b:2"`` or ``["a:1", "b:2"]`` -> the KMS addresses, in order. A gRPC target with
    a scheme (``dns:///kms.example.org:50051``, ``ipv4:...``) stays one target: gRPC itself
    spreads calls over the addresses it resolves to."""
    items = [target] if isinstance(target, str) else list(target)
    out: list[str] = []
    for item in items:
        if re.match(r"^[a-z][a-z0-9+.-]*:(?!\d)", item) and not item.startswith("["):
            out.append(item.strip())  # scheme:... (dns:, ipv4:, ipv6:, unix:)
        else:
            out.extend(t.strip() for t in item.split(",") if t.strip())
    if not out:
        raise ValueError("no KMS address given")
    return out


class KmsClient:
    """Channels to a KMS. Plaintext without TLS settings; TLS with ``root_certificates``
    (PEM of the CA that issued the server certificate, else the system roots when
    ``tls=True``); mutual TLS with ``certificate_chain`` and ``private_key`` as well.
    PEM values may be bytes, text or a path.

    Several KMS replicas (cluster mode): ``target`` may list addresses (``"a:1,b:2"`` or a
    sequence): calls go round-robin over one channel per address; or a DNS name with several
    records (``dns:///kms.example.org:50051``): gRPC's round_robin policy spreads the calls.
    A call that fails with UNAVAILABLE is NOT resent with the same bytes (another replica
    would rightly refuse them as a replay); the flows below (:func:`obtain_ticket`,
    :func:`resolve`) build a fresh message and try the next replica, up to ``retries``
    times (default: one per other address; one for a DNS name)."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        root_certificates: Pem | None = None,
        certificate_chain: Pem | None = None,
        private_key: Pem | None = None,
        tls: bool | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        options: Sequence[tuple[str, Any]] = (),
        retries: int | None = None,
    ) -> None:
        targets = split_targets(target)
        self.targets = targets
        self.target = ",".join(targets)
        self.timeout = timeout
        if (certificate_chain is None) != (private_key is None):
            raise ValueError("a client certificate needs both certificate_chain and private_key")
        use_tls = (
            tls
            if tls is not None
            else (root_certificates is not None or certificate_chain is not None)
        )
        self._channels: list[grpc.Channel] = []
        for t in targets:
            opts = list(options)
            if t.startswith("dns:") and not any(k == "grpc.lb_policy_name" for k, _ in opts):
                opts.append(("grpc.lb_policy_name", "round_robin"))
            if use_tls:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=_pem(root_certificates),
                    private_key=_pem(private_key),
                    certificate_chain=_pem(certificate_chain),
                )
                self._channels.append(grpc.secure_channel(t, creds, options=opts))
            else:
                self._channels.append(grpc.insecure_channel(t, options=opts))
        self._stubs = [rpc.client_stub(c) for c in self._channels]
        self._channel = self._channels[0]
        self._stub = self._stubs[0]
        self._next = itertools.count()
        if retries is None:
            retries = len(targets) - 1 if len(targets) > 1 else int(targets[0].startswith("dns:"))
        self.retries = max(0, retries)
        #: The correlation id of the last call (from the server's metadata), for logs.
        self.last_correlation_id: str | None = None
        #: The address the last call went to.
        self.last_target: str = targets[0]

    def request_ticket(self, data: bytes, *, correlation_id: str | None = None) -> bytes:
        """RequestTicket: REQUEST_INIT in, REQUEST_RESP out (or :class:`KmsRefused`)."""
        return self._call("RequestTicket", data, correlation_id)

    def resolve_ticket(self, data: bytes, *, correlation_id: str | None = None) -> bytes:
        """ResolveTicket: RESOLVE_INIT in, RESOLVE_RESP out (or :class:`KmsRefused`)."""
        return self._call("ResolveTicket", data, correlation_id)

    def _call(self, name: str, data: bytes, correlation_id: str | None) -> bytes:
        metadata = () if correlation_id is None else ((CORRELATION_KEY, correlation_id),)
        i = next(self._next) % len(self._stubs)
        self.last_target = self.targets[i]
        method = getattr(self._stubs[i], name)
        try:
            response, call = method.with_call(
                rpc.MikeyMessage(data=data), timeout=self.timeout, metadata=metadata
            )
        except grpc.RpcError as exc:
            err: Any = exc  # a grpc.Call as well
            trailing = dict(err.trailing_metadata() or ())
            cid = trailing.get(CORRELATION_KEY)
            self.last_correlation_id = cid if isinstance(cid, str) else None
            raw = trailing.get(ERROR_TRAILER)
            raise KmsRefused(
                err.code(),
                err.details() or "",
                bytes(raw) if isinstance(raw, bytes) else None,
                self.last_correlation_id,
            ) from None
        cid = dict(call.trailing_metadata() or ()).get(CORRELATION_KEY)
        self.last_correlation_id = cid if isinstance(cid, str) else None
        return bytes(response.data)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> KmsClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------
# convenience flows


def _now(now: float | None) -> float:
    return time.time() if now is None else now


def obtain_ticket(
    client: KmsClient, initiator: Initiator, desired: DesiredPolicy, now: float | None = None
) -> TicketGrant:
    """Ticket Request (RFC 6043 4.2.1): REQUEST_INIT to the KMS, verified REQUEST_RESP back.

    Raises :class:`KmsRefused` when the KMS refuses, ``EndpointError`` when its answer does
    not verify."""
    for attempt in range(client.retries + 1):
        t = _now(now)
        wire, pending = initiator.request_ticket(desired, t)  # fresh RAND and timestamp
        try:
            reply = client.request_ticket(wire)
        except KmsRefused as exc:
            if not _retry(exc, attempt, client):
                raise
            continue
        return initiator.accept_ticket(pending, reply, t)
    raise AssertionError("unreachable")


def _retry(exc: KmsRefused, attempt: int, client: KmsClient) -> bool:
    """Whether a refused call is tried again, with a freshly built message, on the next
    replica: only when that replica was unreachable (UNAVAILABLE), within ``retries``."""
    if exc.code is not grpc.StatusCode.UNAVAILABLE or attempt >= client.retries:
        return False
    time.sleep(min(0.5, 0.02 * 2**attempt))
    return True


def resolve(
    client: KmsClient, responder: Responder, transfer_init: bytes, now: float | None = None
) -> ResolvedCall:
    """The Responder's side of a Ticket Transfer (RFC 6043 4.2.2, 4.2.3): resolve the ticket
    of ``transfer_init`` at the KMS, verify TRANSFER_INIT, derive the keys and build the
    TRANSFER_RESP (``ResolvedCall.transfer_resp``; None when the ticket says F = 0)."""
    for attempt in range(client.retries + 1):
        t = _now(now)
        wire, pending = responder.receive_transfer_init(transfer_init, t)  # fresh message
        try:
            reply = client.resolve_ticket(wire)
        except KmsRefused as exc:
            if not _retry(exc, attempt, client):
                raise
            continue
        return responder.accept_resolve(pending, reply, t)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Call:
    """Both ends of a call set up by :func:`run_call`."""

    grant: TicketGrant = field(repr=False)
    initiator: CallState = field(repr=False)
    responder: ResolvedCall = field(repr=False)


def run_call(
    initiator_client: KmsClient,
    initiator: Initiator,
    responder_client: KmsClient,
    responder: Responder,
    *,
    grant: TicketGrant | None = None,
    desired: DesiredPolicy | None = None,
    to: bytes | None = None,
    sessions: Sequence[CryptoSession] = (CryptoSession(1, 0x00C0FFEE),),
    profile: SrtpProfile = AES_CM_128_HMAC_SHA1_80,
    now: float | None = None,
) -> Call:
    """A whole call in one process (operator tests, examples): obtain a ticket unless
    ``grant`` is given, transfer it to ``to`` (default: the Responder's identity; a group
    identity with forking), let the Responder resolve it at its KMS, and finish both ends."""
    t = _now(now)
    if grant is None:
        if desired is None:
            desired = DesiredPolicy(responders=(responder.creds.identity,))
        grant = obtain_ticket(initiator_client, initiator, desired, t)
    ti, pending = initiator.transfer_init(
        grant, t, to or responder.creds.identity, sessions, profile
    )
    resolved = resolve(responder_client, responder, ti, t)
    state = initiator.establish(pending, resolved.transfer_resp, t)
    return Call(grant, state, resolved)


__all__ = [
    "CORRELATION_KEY",
    "DEFAULT_TIMEOUT_S",
    "ERROR_TRAILER",
    "Call",
    "KmsClient",
    "KmsRefused",
    "obtain_ticket",
    "resolve",
    "run_call",
    "split_targets",
]
