"""Prometheus metrics of one serving process: what the KMS did, how long it took, and whether
the token and the peer KMSs answer.

The KMS core stays sans-IO and knows nothing of metrics: everything here is measured at the
ports, by decorators built in the composition root around the real objects:

* :class:`kms.server.observed.ObservedHandler` around the :class:`kms.core.api.KmsHandler`
  (the one observing layer, which also traces): calls by method and
  outcome (gRPC status and MIKEY error number, RFC 3830 6.12 / RFC 6043 6.14), latency
  (queueing for a core slot included), tickets issued, resolves, replay and rate-limit
  refusals. It classifies each call from the reply's audit record, which the core already
  fills in for every decision.
* :class:`kms.server.observed.ObservedKeyStore` around the :class:`kms.keystore.KeyStore`:
  token operations by kind
  with latency, errors by kind, token availability and reconnects.
* :class:`kms.server.observed.ObservedPeers` around the :class:`kms.core.ports.PeerResolver`:
  federated resolves
  (RFC 6043 9) by peer KMS and outcome, with latency.
* :class:`TimedSlots`: how long calls wait for a core slot.
* :class:`MeteredReplayCache` around the :class:`kms.core.ports.ReplayCache`: new messages
  refused because the cache is full of live entries (RFC 3830 5.4 needs every digest kept
  for its whole acceptance window, so none is evicted early).
* The call guard's and the adapter's event counts (:meth:`ServerMetrics.guard_event`):
  calls cancelled or refused to protect the server, and request bodies that are not a
  ``MikeyMessage``.

Label values are bounded: method, outcome and status names, MIKEY error numbers 0..15, key
types, token operation names and the ids of the peer KMSs the operator registered. Never an
endpoint identity, a ticket id or a correlation id.

With several worker processes, prometheus-client's multiprocess mode adds their values up
(``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor before it spawns the workers); gauges
say how to combine processes (``multiprocess_mode``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kms.core.api import KmsReply, Outcome
from kms.core.ports import ReplayCache, ReplayCacheFull
from kms.mikey.constants import ErrorNo
from kms.server.metrics_token import TokenProbe, error_kind
from kms.server.slots import CoreSlots

# Seconds. A Ticket Request with SoftHSM takes ~2 ms of CPU; a federated resolve waits for a
# peer (deadline 2 s by default); queueing under overload can take longer.
CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TOKEN_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)
PEER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

# gRPC status names per outcome (kms.server.grpc_server.STATUS_BY_OUTCOME, without grpc).
STATUS_NAMES: dict[Outcome, str] = {
    Outcome.OK: "OK",
    Outcome.MALFORMED: "INVALID_ARGUMENT",
    Outcome.UNAUTHENTICATED: "UNAUTHENTICATED",
    Outcome.DENIED: "PERMISSION_DENIED",
    Outcome.PRECONDITION: "FAILED_PRECONDITION",
    Outcome.RATE_LIMITED: "RESOURCE_EXHAUSTED",
    Outcome.UNAVAILABLE: "UNAVAILABLE",
    Outcome.INTERNAL: "INTERNAL",
    Outcome.CANCELLED: "CANCELLED",
}
METHODS = {"request_ticket": "RequestTicket", "resolve_ticket": "ResolveTicket"}
_ERROR_NOS = frozenset(str(int(e)) for e in ErrorNo)
_KEY_TYPES = {"TGK": "tgk", "TEK": "tek", "GTGK": "gtgk"}
PEER_OUTCOMES = ("ok", "refused", "invalid", "unavailable")


def _result(outcome: Outcome, ok: str) -> str:
    """A resolve's or a node request's result label: a call its client cancelled is not a
    refusal (nothing was refused; kms.core.steps)."""
    if outcome is Outcome.OK:
        return ok
    return "cancelled" if outcome is Outcome.CANCELLED else "refused"
NODE_ROLES = frozenset({"recorder", "bridge", "transcoder"})
# The call guard's event counts (kms.server.admission) by their ``reason`` label value.
GUARD_REASONS = {
    "request_timeouts": "request_timeout",  # no request message in time: cancelled
    "shed_waiting": "shed",  # too many calls waiting for their request: oldest cancelled
    "refused_peer_limit": "peer_limit",  # the peer address holds too many calls
    "refused_watches": "health_watches",  # too many health Watch streams
}
UNDECODABLE_EVENT = "undecodable_body"

def key_type_label(keys: object) -> str:
    """The ticket's key types (RFC 3830 6.13 Type of KV data, salts folded into their key)
    as one bounded label value: ``tgk``, ``tek``, ``gtgk`` or e.g. ``tek+tgk``."""
    if not isinstance(keys, list | tuple):
        return "none"
    kinds = sorted({_KEY_TYPES.get(str(k).removesuffix("_SALT"), "other") for k in keys})
    return "+".join(kinds) if kinds else "none"


class ServerMetrics:
    """The metric families of a serving process, and the decorators that feed them.

    ``registry``: where the families are registered for exposition from this process; None
    in a multiprocess worker (the supervisor collects the worker's files).
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry
        self.calls = Counter(
            "kms_calls_total",
            "KMS calls (RequestTicket, ResolveTicket) by outcome: gRPC status and MIKEY "
            "error number (none when OK or when no ERR payload was sent)",
            ("method", "outcome", "code", "mikey_error"),
            registry=r,
        )
        self.call_seconds = Histogram(
            "kms_call_duration_seconds",
            "Time from admission to reply per KMS call, waiting for a core slot included",
            ("method",),
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self.loop_lag = Histogram(
            "kms_event_loop_lag_seconds",
            "How late a worker's event loop ran a callback due every 0.25 s: the time it "
            "spent on other work first, which calls waiting for the loop wait too",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.slot_wait = Histogram(
            "kms_core_slot_wait_seconds",
            "Time a KMS call waited for a core slot (saturation of this worker)",
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self.tickets = Counter(
            "kms_tickets_issued_total",
            "Tickets issued (REQUEST_RESP sent) by key types and whether forking was granted",
            ("key_type", "forking"),
            registry=r,
        )
        self.resolves = Counter(
            "kms_resolves_total",
            "Ticket resolves: path local (this KMS issued the ticket) or forwarded (asked "
            "the issuing peer KMS, RFC 6043 9); result ok, refused, or cancelled (the client "
            "went away while the KMS waited)",
            ("path", "result"),
            registry=r,
        )
        self.node_keys = Counter(
            "kms_node_key_requests_total",
            "Key requests of intermediate nodes (RFC 6043 11.1) by node role (recorder, "
            "bridge, transcoder; unknown before the node authenticated) and outcome: "
            "released (keys sent, audit event ticket.node_keys), refused, or cancelled",
            ("role", "outcome"),
            registry=r,
        )
        self.replays = Counter(
            "kms_replay_refusals_total",
            "Initial messages refused as replays of an accepted one (RFC 3830 5.4)",
            registry=r,
        )
        self.rate_limited = Counter(
            "kms_rate_limit_refusals_total",
            "Calls refused by a rate limit: scope identity (per sender) or peer (peer quota)",
            ("scope",),
            registry=r,
        )
        self.token_seconds = Histogram(
            "kms_token_operation_duration_seconds",
            "Key-store (PKCS#11 token) operations by kind; _count is the number of operations",
            ("operation",),
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.token_errors = Counter(
            "kms_token_operation_errors_total",
            "Key-store operations that failed, by kind of operation and error",
            ("operation", "error"),
            registry=r,
        )
        # Made at the first token answer or failure, so that a worker that is still starting
        # does not report a token down (a multiprocess gauge starts at 0 in its file).
        self._token_up: Gauge | None = None
        self._registry = r
        self.token_reconnects = Counter(
            "kms_token_reconnects_total",
            "Times the token answered again after being unavailable",
            registry=r,
        )
        self.peer_calls = Counter(
            "kms_federation_calls_total",
            "Resolves forwarded to a peer KMS (RFC 6043 9) by peer and outcome: ok, refused "
            "(the peer said no), invalid (its answer did not verify), unavailable",
            ("peer", "outcome"),
            registry=r,
        )
        self.peer_seconds = Histogram(
            "kms_federation_call_duration_seconds",
            "Time a forwarded resolve waited for the peer KMS, retries included",
            ("peer",),
            buckets=PEER_BUCKETS,
            registry=r,
        )
        self.peer_up = Gauge(
            "kms_federation_peer_up",
            "1 when the peer KMS answered the last forwarded resolve, 0 when it was "
            "unavailable",
            ("peer",),
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.guard_refusals = Counter(
            "kms_guard_refusals_total",
            "Calls the server cancelled or refused to protect itself, by reason: "
            "request_timeout (no request message in time), shed (too many calls waiting "
            "for their request), peer_limit (the peer address holds too many calls), "
            "health_watches (too many health Watch streams)",
            ("reason",),
            registry=r,
        )
        for reason in GUARD_REASONS.values():  # present at 0, so that rate() sees the 1st
            self.guard_refusals.labels(reason)
        self.undecodable = Counter(
            "kms_undecodable_requests_total",
            "Calls whose request body is not a mikey.kms.v1.MikeyMessage (INVALID_ARGUMENT)",
            registry=r,
        )
        self.replay_full = Counter(
            "kms_replay_cache_full_refusals_total",
            "New messages refused (FAILED_PRECONDITION) because the replay cache is full of "
            "live entries ([policy] replay_cache_size)",
            registry=r,
        )
        self._token_down = False
        self._token_lock = threading.Lock()
        # Label children by label values: labels() costs a lock and a tuple per call.
        self._children: dict[tuple[object, ...], Any] = {}
        # When this thread's current call was admitted (set by TimedSlots, read by
        # ObservedHandler), so that the call latency includes the wait for a slot.
        self._local = threading.local()

    # --- token state ------------------------------------------------------------------------
    @property
    def token_down(self) -> bool:
        return self._token_down

    @property
    def token_up(self) -> Gauge:
        """``kms_token_up`` (call with the token lock held)."""
        if self._token_up is None:
            self._token_up = Gauge(
                "kms_token_up",
                "1 when the token answered the last operation or probe, 0 when it was "
                "unavailable (lowest over live worker processes)",
                registry=self._registry,
                multiprocess_mode="livemin",
            )
        return self._token_up

    def token_ok(self) -> None:
        with self._token_lock:
            if self._token_down:
                self._token_down = False
                self.token_reconnects.inc()
            self.token_up.set(1)

    def token_unavailable(self) -> None:
        with self._token_lock:
            self._token_down = True
            self.token_up.set(0)

    # --- decorators ---------------------------------------------------------------------------
    def slots(self, n: int) -> TimedSlots:
        return TimedSlots(n, self)

    def replay_cache(self, inner: ReplayCache) -> MeteredReplayCache:
        return MeteredReplayCache(inner, self)

    def guard_event(self, event: str, n: int) -> None:
        """An increase of the call guard's or the adapter's event counts
        (``CallGuard.counters``, ``KmsServicer.counters``); unknown kinds are ignored."""
        if event == UNDECODABLE_EVENT:
            self.undecodable.inc(n)
            return
        reason = GUARD_REASONS.get(event)
        if reason is not None:
            self.child(self.guard_refusals, reason).inc(n)

    # --- per call -----------------------------------------------------------------------------
    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached (label values are bounded, so is the cache)."""
        key = (id(metric), *labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def admitted_at(self) -> float | None:
        return getattr(self._local, "admitted", None)

    def set_admitted(self, t: float | None) -> None:
        self._local.admitted = t

    def observe_call(self, method: str, reply: KmsReply | None, seconds: float) -> None:
        """Count one call (``reply`` None: the handler raised, answered INTERNAL)."""
        name = METHODS[method]
        self.child(self.call_seconds, name).observe(seconds)
        if reply is None:
            self.child(self.calls, name, Outcome.INTERNAL.value, "INTERNAL", "none").inc()
            return
        audit: Mapping[str, object] = reply.audit
        outcome = reply.outcome
        err = "none"
        if outcome is not Outcome.OK and reply.error_message is not None:
            err = str(audit.get("error_no", "none"))
            if err not in _ERROR_NOS:
                err = "other"
        self.child(self.calls, name, outcome.value, STATUS_NAMES[outcome], err).inc()
        event = audit.get("event")
        forwarded = event == "ticket.forwarded" or bool(audit.get("via_peer"))
        if method == "request_ticket":
            if outcome is Outcome.OK:
                forking = "true" if audit.get("forking") else "false"
                self.child(self.tickets, key_type_label(audit.get("keys")), forking).inc()
        elif "ticket_id" in audit:  # a resolve that got as far as reading the ticket
            self.child(
                self.resolves,
                "forwarded" if forwarded else "local",
                _result(outcome, "ok"),
            ).inc()
        if "node" in audit:  # an intermediate node's request (kms.core.nodes)
            role = str(audit.get("role", "unknown"))
            self.child(
                self.node_keys,
                role if role in NODE_ROLES else "unknown",
                _result(outcome, "released"),
            ).inc()
        if outcome is Outcome.RATE_LIMITED:
            reason = str(audit.get("reason", ""))
            self.rate_limited.labels("peer" if "peer" in reason else "identity").inc()
        elif outcome is Outcome.PRECONDITION and str(audit.get("reason", "")).startswith(
            "replay"
        ):
            self.replays.inc()


class TimedSlots(CoreSlots):
    """Core slots that record how long each call waited for one."""

    def __init__(self, n: int, metrics: ServerMetrics) -> None:
        super().__init__(n)
        self._metrics = metrics

    @contextmanager
    def held(self) -> Iterator[None]:
        t0 = time.perf_counter()
        with super().held():
            self._metrics.slot_wait.observe(time.perf_counter() - t0)
            self._metrics.set_admitted(t0)
            try:
                yield
            finally:
                self._metrics.set_admitted(None)


class MeteredReplayCache:
    """A :class:`ReplayCache` that counts the new messages refused because it is full."""

    def __init__(self, inner: ReplayCache, metrics: ServerMetrics) -> None:
        self._inner = inner
        self._m = metrics

    def check_and_store(self, digest: bytes, expires_at: float, now: float) -> bool:
        try:
            return self._inner.check_and_store(digest, expires_at, now)
        except ReplayCacheFull:
            self._m.replay_full.inc()
            raise

    def __getattr__(self, name: str) -> Any:  # close(), refused_full, ...
        return getattr(self._inner, name)


__all__ = [
    "MeteredReplayCache",
    "ServerMetrics",
    "TimedSlots",
    "TokenProbe",
    "error_kind",
    "key_type_label",
]
