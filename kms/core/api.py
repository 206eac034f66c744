"""The KMS core's outward contract: wire bytes and time in, a reply out (sans-IO).

The gRPC adapter, the federation router and the tests all call :class:`KmsHandler`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class Outcome(StrEnum):
    """How a request ended, in the core's own words; the adapter maps each to a transport
    status (``kms.server.grpc_server.STATUS_BY_OUTCOME``)."""

    OK = "ok"
    MALFORMED = "malformed"  # undecodable or wrong-type message
    UNAUTHENTICATED = "unauthenticated"  # MAC / signature failure
    DENIED = "denied"  # policy refusal (unauthorised responder, ...)
    PRECONDITION = "precondition"  # expired, not yet valid, reused
    RATE_LIMITED = "rate_limited"  # rate limit, quota, replay cache full
    UNAVAILABLE = "unavailable"  # token, a store or a peer KMS unavailable (transient)
    INTERNAL = "internal"  # a bug; never carries detail
    # The client cancelled the call (or its deadline passed, or the server cut it off while
    # draining) while the core waited for a yielded step (kms.core.steps): the token's RSA
    # decryption of a PKE or a peer KMS's answer. Nothing was issued; nothing is sent.
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class KmsReply:
    """The result of handling one initial message.

    ``data``: the REQUEST_RESP / RESOLVE_RESP bytes when ``outcome`` is OK.
    ``error_message``: the MIKEY error message (HDR, T, ERR, [V]) where RFC 6043 calls for
    one; the adapter sends it in trailing metadata ``mikey-error-bin``.
    ``detail``: one human-readable line without secrets.
    """

    outcome: Outcome
    data: bytes = b""
    error_message: bytes | None = None
    detail: str = ""
    audit: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


class KmsHandler(Protocol):
    """What the server adapter needs from the KMS core."""

    def request_ticket(self, wire: bytes, now: float, *, correlation_id: str = "") -> KmsReply:
        """Handle a REQUEST_INIT_PSK / REQUEST_INIT_PK; ``now`` is Unix time."""
        ...

    def resolve_ticket(self, wire: bytes, now: float, *, correlation_id: str = "") -> KmsReply:
        """Handle a RESOLVE_INIT_PSK / RESOLVE_INIT_PK; ``now`` is Unix time."""
        ...


def refuse_undecodable(
    handler: object, size: int, now: float, *, correlation_id: str, detail: str
) -> KmsReply:
    """A call whose transport body is not a message at all: the handler's own
    ``refuse_undecodable`` (the core audits it), else a plain MALFORMED reply (a handler
    without one, e.g. the bench's echo)."""
    refuse = getattr(handler, "refuse_undecodable", None)
    if callable(refuse):
        reply = refuse(size, now, correlation_id=correlation_id, detail=detail)
        if isinstance(reply, KmsReply):
            return reply
    return KmsReply(Outcome.MALFORMED, detail=detail)
