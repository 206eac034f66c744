"""Call admission: what one peer address, and calls whose request has not arrived, may hold.

The sync gRPC server admits ``maximum_concurrent_rpcs`` calls and gives each a thread at
once. A call whose client sends HEADERS and never the request message would hold its slot
until the connection ends; 128 of them lock every other client out. So the KMS methods
read their request themselves (registered as stream-request methods, which unary clients
call unchanged), and this guard:

* cancels a call whose request has not arrived within ``request_timeout_s``;
* keeps at most ``max_waiting`` calls waiting for their request (and at most
  ``max_waiting_per_peer`` per peer address): beyond that the oldest waiting call is
  cancelled (shed), so that a new call, whose request usually arrives with its HEADERS,
  is served rather than refused;
* refuses a new call (RESOURCE_EXHAUSTED) when its peer address already holds
  ``max_calls_per_peer`` admitted calls.

Health ``Watch`` streams (which never end by themselves and also hold an admitted call)
are bounded to ``MAX_WATCHES`` per worker and count toward their peer's calls
(:class:`GuardedHealth`).

Everything it does is counted (:attr:`CallGuard.counters`, an :class:`EventCounts` whose
listener the metrics set: ``kms_guard_refusals_total``) and logged, at most one line per
``LOG_EVERY_S`` for each kind of event (an attacker controls how often they happen).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health

from kms.server.config import ServerSettings

log = logging.getLogger("kms.server.admission")

LOG_EVERY_S = 10.0


class EventCounts(Counter[str]):
    """Counts of events by kind; every increase is also passed to ``listener`` (set by the
    metrics wiring, kms.server.observe), so that the counts reach ``/metrics`` too."""

    def __init__(self) -> None:
        super().__init__()
        self.listener: Callable[[str, int], None] | None = None

    def __setitem__(self, key: str, value: int) -> None:
        delta = value - self.get(key, 0)
        super().__setitem__(key, value)
        listener = self.listener
        if delta > 0 and listener is not None:
            listener(key, delta)


class Cancellable(Protocol):
    def cancel(self) -> None: ...


@dataclass(frozen=True)
class Limits:
    """Per worker process. The defaults keep at least half of the 128 admitted calls for
    calls that sent their request (and for health checks)."""

    request_timeout_s: float = 2.0
    max_waiting: int = 64
    max_waiting_per_peer: int = 16
    max_calls_per_peer: int = 96
    max_streams_per_connection: int = 32

    def __post_init__(self) -> None:
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be positive")
        for name in ("max_waiting", "max_waiting_per_peer", "max_calls_per_peer",
                     "max_streams_per_connection"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


def limits_for(server: ServerSettings, threads: int) -> Limits:
    """Limits from kms.toml ``[server]`` for a worker admitting ``threads`` calls: at most
    half of them wait for their request, a quarter of that (at least 4) per peer address;
    one address holds at most three quarters of them (never more than
    ``max_calls_per_peer``)."""
    waiting = max(1, threads // 2)
    return Limits(
        request_timeout_s=server.request_timeout_ms / 1000,
        max_waiting=waiting,
        max_waiting_per_peer=max(min(waiting, 4), waiting // 4),
        max_calls_per_peer=max(1, min(server.max_calls_per_peer, threads * 3 // 4)),
        max_streams_per_connection=server.max_streams_per_connection,
    )


def peer_address(peer: str) -> str:
    """gRPC's peer string without the port: ``ipv4:127.0.0.1:5000`` -> ``ipv4:127.0.0.1``,
    ``ipv6:[::1]:5000`` -> ``ipv6:[::1]`` (a unix socket peer is kept whole)."""
    if peer.startswith(("ipv4:", "ipv6:")):
        host, sep, port = peer.rpartition(":")
        if sep and port.isdigit():
            return host
    return peer


class RateLimitedLog:
    """One log line per ``every`` seconds and key, with how many events it stands for."""

    def __init__(self, logger: logging.Logger, every: float = LOG_EVERY_S) -> None:
        self._log = logger
        self._every = every
        self._last: dict[str, float] = {}
        self._pending: Counter[str] = Counter()
        self._lock = threading.Lock()

    def warning(self, key: str, msg: str, **fields: object) -> None:
        now = time.monotonic()
        with self._lock:
            self._pending[key] += 1
            last = self._last.get(key)
            if last is not None and now - last < self._every:
                return
            self._last[key] = now
            count = self._pending.pop(key)
        self._log.warning(msg, extra={"fields": {**fields, "events": count}})


def request_arrived(call: object) -> bool:
    """Whether gRPC already holds the call's request message (received, not yet read by the
    handler thread, which may not have run yet on a busy machine). Reads the sync server's
    call state; False when that is not there (another gRPC version, or a test double)."""
    state = getattr(call, "_state", None)
    return getattr(state, "request", None) is not None


class _Waiting:
    __slots__ = ("call", "deadline", "peer")

    def __init__(self, call: Cancellable, peer: str, deadline: float) -> None:
        self.call = call
        self.peer = peer
        self.deadline = deadline

    @property
    def sheddable(self) -> bool:
        return not request_arrived(self.call)


class CallGuard:
    """Admission per peer address and the request-arrival watchdog (one per server)."""

    def __init__(self, limits: Limits | None = None, clock: Callable[[], float] = time.monotonic):
        self.limits = limits or Limits()
        self._clock = clock
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._waiting: OrderedDict[int, _Waiting] = OrderedDict()  # arrival order
        self._waiting_per_peer: Counter[str] = Counter()
        self._calls_per_peer: Counter[str] = Counter()
        self.counters = EventCounts()
        self._log = RateLimitedLog(log)
        self._stopped = False
        self._thread = threading.Thread(target=self._watch, name="kms-call-guard", daemon=True)
        self._thread.start()

    # --- admission ------------------------------------------------------------------------

    def admit(self, peer: str) -> bool:
        """Count a new call of ``peer``; False (nothing counted) if it holds too many."""
        with self._cond:
            if self._calls_per_peer[peer] >= self.limits.max_calls_per_peer:
                self.counters["refused_peer_limit"] += 1
                refused = True
            else:
                self._calls_per_peer[peer] += 1
                refused = False
        if refused:
            self._log.warning("peer-limit", "call refused: peer holds too many calls",
                              peer=peer, limit=self.limits.max_calls_per_peer)  # fmt: skip
        return not refused

    def leave(self, peer: str) -> None:
        with self._cond:
            self._calls_per_peer[peer] -= 1
            if self._calls_per_peer[peer] <= 0:
                del self._calls_per_peer[peer]

    def calls_of(self, peer: str) -> int:
        with self._cond:
            return self._calls_per_peer[peer]

    # --- waiting for the request ------------------------------------------------------------

    def waiting(self, call: Cancellable, peer: str) -> int:
        """A call starts waiting for its request message; returns its ticket."""
        shed: list[_Waiting] = []
        with self._cond:
            ticket = next(self._seq)
            entry = _Waiting(call, peer, self._clock() + self.limits.request_timeout_s)
            self._waiting[ticket] = entry
            self._waiting_per_peer[peer] += 1
            if self._waiting_per_peer[peer] > self.limits.max_waiting_per_peer:
                shed.append(self._pop(self._oldest(peer)))
            if len(self._waiting) > self.limits.max_waiting:
                shed.append(self._pop(self._oldest(None)))
            if shed:
                self.counters["shed_waiting"] += len(shed)
            # No notify: the watchdog never sleeps past the oldest deadline, nor longer than
            # one request timeout when nothing waits, and every new deadline is later than
            # both (monotonic clock, one timeout). Waking it here cost a thread switch per
            # call, taken from the GIL while the core computes.
        for victim in shed:
            victim.call.cancel()
            self._log.warning("shed", "call cancelled: too many calls waiting for their "
                              "request", peer=victim.peer)  # fmt: skip
        return ticket

    def received(self, ticket: int) -> bool:
        """The request arrived (or the call ended); False if the guard had cancelled it."""
        with self._cond:
            if ticket not in self._waiting:
                return False
            self._pop(ticket)
            return True

    @property
    def waiting_count(self) -> int:
        with self._cond:
            return len(self._waiting)

    def _oldest(self, peer: str | None) -> int:
        """The oldest waiting call (of ``peer``) whose request has not arrived; the oldest
        one at all if every one has (the bound holds either way)."""
        mine = [(t, w) for t, w in self._waiting.items() if peer is None or w.peer == peer]
        return next((t for t, w in mine if w.sheddable), mine[0][0])

    def _pop(self, ticket: int) -> _Waiting:
        entry = self._waiting.pop(ticket)
        self._waiting_per_peer[entry.peer] -= 1
        if self._waiting_per_peer[entry.peer] <= 0:
            del self._waiting_per_peer[entry.peer]
        return entry

    def _watch(self) -> None:
        while True:
            expired: list[_Waiting] = []
            with self._cond:
                if self._stopped:
                    return
                now = self._clock()
                while self._waiting:
                    ticket, first = next(iter(self._waiting.items()))
                    if first.deadline > now:
                        break
                    expired.append(self._pop(ticket))
                self.counters["request_timeouts"] += len(expired)
                if not expired:
                    wait = self.limits.request_timeout_s
                    if self._waiting:
                        wait = next(iter(self._waiting.values())).deadline - now
                    self._cond.wait(wait)
            for entry in expired:
                entry.call.cancel()
                self._log.warning(
                    "timeout", "call cancelled: no request in time",
                    peer=entry.peer, timeout_s=self.limits.request_timeout_s,
                )  # fmt: skip

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(5)


# Health Watch streams per worker (a load balancer or orchestrator needs one or two).
MAX_WATCHES = 16


class GuardedHealth(health.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1 whose ``Watch`` streams are bounded: they never end by themselves and
    each holds one of the admitted calls, so at most ``max_watches`` per worker, and they
    count toward their peer address's calls."""

    def __init__(self, guard: CallGuard, max_watches: int = MAX_WATCHES) -> None:
        super().__init__(experimental_non_blocking=True)
        self._guard = guard
        self._max_watches = max_watches
        self._watches = 0
        self._watch_lock = threading.Lock()

    @property
    def watches(self) -> int:
        with self._watch_lock:
            return self._watches

    def Watch(  # noqa: N802 - the proto's method name
        self, request: Any, context: Any, send_response_callback: Any = None
    ) -> Any:
        peer = peer_address(context.peer())
        with self._watch_lock:
            full = self._watches >= self._max_watches
            if not full:
                self._watches += 1
        if full:
            self._guard.counters["refused_watches"] += 1
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many health watches")
        if not self._guard.admit(peer):
            with self._watch_lock:
                self._watches -= 1
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls from this address")

        def release() -> None:
            with self._watch_lock:
                self._watches -= 1
            self._guard.leave(peer)

        if not context.add_callback(release):
            release()
        return super().Watch(request, context, send_response_callback)
