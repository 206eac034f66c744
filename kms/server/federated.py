"""The adapter half of a federated Ticket Resolve (RFC 6043 9).

The core (:class:`kms.core.service.Kms`) never waits on the network: a resolve of a ticket
that another KMS issued comes back as a :class:`kms.core.federation.PeerCall`. This handler
makes that call through the :class:`kms.core.ports.PeerResolver` (gRPC, with the metrics and
tracing decorators around it) and hands the answer, or the failure, back to the core with
the time it arrived. While it waits for the peer it holds no core slot
(:mod:`kms.server.slots`), so a slow peer never holds up the calls this worker can compute.

Both calls are also offered as steps (:meth:`FederatingHandler.request_steps`,
:meth:`FederatingHandler.resolve_steps`): generators that yield each blocking operation and
are sent back its result. Two kinds are yielded: the core's token operation
(:class:`kms.core.steps.TokenIo`: the RSA decryption of a PK message's PKE, RFC 3830 4.2.5)
and the peer call (:data:`PeerIo`). The event-loop server (:mod:`kms.server.grpc_server`)
runs the core's steps inline on its loop and awaits each yielded operation in a thread
(token operations in a one-thread pool, peer calls in the peer pool:
:class:`kms.server.adapter.CoreRunner`), so that neither an RSA operation nor a network wait
blocks the loop. A caller without a loop drives the same steps on its own thread
(:func:`run_steps`).

The gRPC status a peer refused with is mapped to the core's own :class:`Outcome` here: the
core knows no gRPC names.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Generator
from typing import Any

from kms.core.api import KmsReply, Outcome
from kms.core.context import Deps
from kms.core.federation import PeerCall
from kms.core.ports import PeerError, PeerFailure, PeerResolver
from kms.core.service import Kms
from kms.core.steps import CallCancelled, TokenIo, run_with
from kms.server.slots import CoreSlots

# gRPC status names a peer may refuse with, and what our Responder then gets.
PEER_STATUS: dict[str, Outcome] = {
    "UNAUTHENTICATED": Outcome.DENIED,  # the peer did not accept *us*: a trust problem
    "PERMISSION_DENIED": Outcome.DENIED,
    "FAILED_PRECONDITION": Outcome.PRECONDITION,
    "INVALID_ARGUMENT": Outcome.MALFORMED,
    "RESOURCE_EXHAUSTED": Outcome.RATE_LIMITED,
}


# What a call's steps yield: the blocking peer call (a federated resolve) or the core's
# token operation (a PK message's PKE), each run off the event loop; what they are sent
# back (the peer's answer or failure; the token operation's result or exception) and what
# they return. Neither kind of operation raises.
PeerIo = Callable[[], "bytes | PeerError"]
CallIo = PeerIo | TokenIo[Any]
CallSteps = Generator[CallIo, Any, KmsReply]
ResolveSteps = CallSteps  # the name the resolve's steps had before requests had steps


def run_steps(steps: CallSteps, run_io: Callable[[PeerIo], bytes | PeerError]) -> KmsReply:
    """Drive ``steps`` on this thread: each token operation at once, ``run_io`` making
    each peer call."""
    return run_with(steps, lambda io: io() if isinstance(io, TokenIo) else run_io(io))


def peer_outcome(exc: PeerError) -> PeerError:
    """``exc`` with ``outcome`` set from its gRPC status (refusals only; others stay None,
    which the core answers as UNAVAILABLE)."""
    if exc.kind is PeerFailure.REFUSED and exc.outcome is None:
        exc.outcome = PEER_STATUS.get(exc.status)
    return exc


class FederatingHandler:
    """:class:`kms.core.api.KmsHandler` over the core and a peer resolver: runs the core's
    steps and does the peer IO between them."""

    def __init__(
        self,
        core: Kms,
        peers: PeerResolver,
        slots: CoreSlots | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.core = core
        self._peers = peers
        self._slots = slots
        self._monotonic = monotonic

    @property
    def deps(self) -> Deps:
        return self.core.deps

    def request_ticket(self, wire: bytes, now: float, *, correlation_id: str = "") -> KmsReply:
        return self.core.request_ticket(wire, now, correlation_id=correlation_id)

    def request_steps(self, wire: bytes, now: float, *, correlation_id: str = "") -> CallSteps:
        """The Ticket Request as steps: the core's, which yield a PK message's token
        operation (a Ticket Request never asks a peer)."""
        return self.core.request_steps(wire, now, correlation_id=correlation_id)

    def resolve_ticket(
        self, wire: bytes, now: float, *, correlation_id: str = "", hops: int = 0
    ) -> KmsReply:
        steps = self.resolve_steps(wire, now, correlation_id=correlation_id, hops=hops)
        return run_steps(steps, self._ask)

    def resolve_steps(
        self, wire: bytes, now: float, *, correlation_id: str = "", hops: int = 0
    ) -> CallSteps:
        """The resolve as steps: the core's first steps (a RESOLVE_INIT_PK yields its
        token operation), then (a ticket of a peer KMS, RFC 6043 9) ``yield`` of the peer
        call for the caller to make off the event loop, then the core's last step with its
        answer. A call cancelled while it waits (:func:`kms.core.steps.cancel`) is recorded by
        the core as CANCELLED, at either kind of step."""
        started = self._monotonic()
        step = yield from self.core.resolve_first_steps(
            wire, now, correlation_id=correlation_id, hops=hops
        )
        if not isinstance(step, PeerCall):
            return step
        try:
            answer = yield functools.partial(self._forward, step)
        except CallCancelled:
            # The client gave up while the peer had not answered: the core records it;
            # the peer's answer, if it still comes, goes nowhere.
            return self.core.cancel_resolve(step)
        # The time the answer arrived, on the caller's clock (a test may pass a fixed one).
        return self.core.finish_resolve(step, answer, now + (self._monotonic() - started))

    def refuse_undecodable(
        self, size: int, now: float, *, correlation_id: str = "", detail: str = ""
    ) -> KmsReply:
        return self.core.refuse_undecodable(
            size, now, correlation_id=correlation_id, detail=detail
        )

    def close(self) -> None:
        self.core.close()

    def _ask(self, io: PeerIo) -> bytes | PeerError:
        if self._slots is None:
            return io()
        with self._slots.released():  # waiting on the network needs no core slot
            return io()

    def _forward(self, call: PeerCall) -> bytes | PeerError:
        try:
            return self._peers.forward_resolve(
                call.peer,
                call.wire,
                correlation_id=call.correlation_id,
                hops=call.hops,
                rebuild=call.rebuild,
            )
        except PeerError as exc:
            return peer_outcome(exc)


__all__ = [
    "PEER_STATUS", "CallIo", "CallSteps", "FederatingHandler", "PeerIo", "ResolveSteps",
    "peer_outcome", "run_steps",
]
