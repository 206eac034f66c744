"""Call admission: what one peer address, and calls whose request has not arrived, may hold.

The event-loop server (:mod:`kms.server.grpc_server`) admits ``maximum_concurrent_rpcs``
calls. A call whose client sends HEADERS and never the request message holds no thread
there, but it holds one of those admitted calls (and its memory) until the connection ends:
128 of them lock every other client out. So the KMS methods read their request themselves
(registered as stream-request methods, which unary clients call unchanged), and this guard,
which lives on the server's event loop (no thread, no lock):

* cancels a call whose request has not arrived within ``request_timeout_s`` (one timer on
  the loop for the oldest deadline, not one per call);
* keeps at most ``max_waiting`` calls waiting for their request: beyond that one waiting
  call is cancelled (shed), the oldest one of the peer address that has the most calls
  waiting, so that one address stalling calls sheds its own calls first and a new call,
  whose request usually arrives with its HEADERS, is served rather than refused;
* refuses a new call (RESOURCE_EXHAUSTED) when its peer address already holds
  ``max_calls_per_peer`` admitted calls.

"Waiting" includes calls whose request is on its way but whose read the loop has not
processed yet: under load that is every call for a moment. So no address has a waiting
bound of its own below ``max_waiting`` (a bound of 16 per address cancelled hundreds of
legitimate calls per second from 64 clients behind one address: a proxy, or the bench), and
shedding starts only when the worker as a whole has more than ``max_waiting`` waiting.

Health ``Watch`` streams (which never end by themselves and also hold an admitted call)
are bounded to ``MAX_WATCHES`` per worker and count toward their peer's calls
(:class:`GuardedHealth`).

Everything it does is counted (:attr:`CallGuard.counters`, an :class:`EventCounts` whose
listener the metrics set: ``kms_guard_refusals_total``) and logged, at most one line per
``LOG_EVERY_S`` for each kind of event (an attacker controls how often they happen).
"""

from __future__ import annotations

import asyncio
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
    def cancel(self) -> Any: ...


@dataclass(frozen=True)
class Limits:
    """Per worker process. The defaults keep at least half of the 128 admitted calls for
    calls that sent their request (and for health checks)."""

    request_timeout_s: float = 2.0
    max_waiting: int = 64
    max_calls_per_peer: int = 96
    max_streams_per_connection: int = 32

    def __post_init__(self) -> None:
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be positive")
        for name in ("max_waiting", "max_calls_per_peer", "max_streams_per_connection"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


def limits_for(server: ServerSettings, calls: int) -> Limits:
    """Limits from kms.toml ``[server]`` for a worker admitting ``calls`` calls: at most
    half of them wait for their request; one address holds at most three quarters of them
    (never more than ``max_calls_per_peer``)."""
    return Limits(
        request_timeout_s=server.request_timeout_ms / 1000,
        max_waiting=max(1, calls // 2),
        max_calls_per_peer=max(1, min(server.max_calls_per_peer, calls * 3 // 4)),
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


class _Waiting:
    __slots__ = ("call", "deadline", "peer")

    def __init__(self, call: Cancellable, peer: str, deadline: float) -> None:
        self.call = call
        self.peer = peer
        self.deadline = deadline


class CallGuard:
    """Admission per peer address and the request-arrival watchdog (one per server).

    Used from the server's event loop only (the methods are called by the call handlers,
    the timer runs on the loop); ``calls_of`` and ``waiting_count`` may be read from
    anywhere."""

    def __init__(self, limits: Limits | None = None, clock: Callable[[], float] = time.monotonic):
        self.limits = limits or Limits()
        self._clock = clock
        self._seq = itertools.count()
        self._waiting: OrderedDict[int, _Waiting] = OrderedDict()  # arrival order
        self._waiting_per_peer: Counter[str] = Counter()
        self._calls_per_peer: Counter[str] = Counter()
        self.peak_waiting_per_peer = 0  # the most calls one address had waiting at once
        self.counters = EventCounts()
        self._log = RateLimitedLog(log)
        self._timer: asyncio.TimerHandle | None = None

    # --- admission ------------------------------------------------------------------------

    def admit(self, peer: str) -> bool:
        """Count a new call of ``peer``; False (nothing counted) if it holds too many."""
        if self._calls_per_peer[peer] >= self.limits.max_calls_per_peer:
            self.counters["refused_peer_limit"] += 1
            self._log.warning("peer-limit", "call refused: peer holds too many calls",
                              peer=peer, limit=self.limits.max_calls_per_peer)  # fmt: skip
            return False
        self._calls_per_peer[peer] += 1
        return True

    def leave(self, peer: str) -> None:
        self._calls_per_peer[peer] -= 1
        if self._calls_per_peer[peer] <= 0:
            del self._calls_per_peer[peer]

    def calls_of(self, peer: str) -> int:
        return self._calls_per_peer.get(peer, 0)

    # --- waiting for the request ------------------------------------------------------------

    def waiting(self, call: Cancellable, peer: str) -> int:
        """A call starts waiting for its request message; returns its ticket."""
        ticket = next(self._seq)
        self._waiting[ticket] = _Waiting(call, peer, self._clock() + self.limits.request_timeout_s)
        n = self._waiting_per_peer[peer] = self._waiting_per_peer[peer] + 1
        if n > self.peak_waiting_per_peer:
            self.peak_waiting_per_peer = n
        if len(self._waiting) > self.limits.max_waiting:
            victim = self._pop(self._victim())
            self.counters["shed_waiting"] += 1
            victim.call.cancel()
            self._log.warning("shed", "call cancelled: too many calls waiting for their "
                              "request", peer=victim.peer)  # fmt: skip
        if self._timer is None and self._waiting:
            self._arm()
        return ticket

    def received(self, ticket: int) -> bool:
        """The request arrived (or the call ended); False if the guard had cancelled it."""
        if ticket not in self._waiting:
            return False
        self._pop(ticket)
        return True

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    def _victim(self) -> int:
        """The oldest waiting call of the address with the most calls waiting (the oldest
        of those addresses' calls on a tie)."""
        most = max(self._waiting_per_peer.values())
        return next(t for t, w in self._waiting.items() if self._waiting_per_peer[w.peer] == most)

    def _pop(self, ticket: int) -> _Waiting:
        entry = self._waiting.pop(ticket)
        self._waiting_per_peer[entry.peer] -= 1
        if self._waiting_per_peer[entry.peer] <= 0:
            del self._waiting_per_peer[entry.peer]
        return entry

    def _arm(self) -> None:
        """One timer, at the oldest waiting call's deadline (every later call's deadline is
        later: one timeout on a monotonic clock)."""
        first = next(iter(self._waiting.values()))
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(first.deadline - self._clock(), 0.0), self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self._clock()
        expired: list[_Waiting] = []
        while self._waiting:
            ticket, first = next(iter(self._waiting.items()))
            if first.deadline > now:
                break
            expired.append(self._pop(ticket))
        if expired:
            self.counters["request_timeouts"] += len(expired)
        for entry in expired:
            entry.call.cancel()
            self._log.warning(
                "timeout", "call cancelled: no request in time",
                peer=entry.peer, timeout_s=self.limits.request_timeout_s,
            )  # fmt: skip
        if self._waiting:
            self._arm()

    def stop(self) -> None:
        """Drop the timer (on the loop, before it closes)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


# Health Watch streams per worker (a load balancer or orchestrator needs one or two).
MAX_WATCHES = 16


class GuardedHealth(health.aio.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1 (the asyncio servicer) whose ``Watch`` streams are bounded: they never
    end by themselves and each holds one of the admitted calls, so at most ``max_watches``
    per worker, and they count toward their peer address's calls."""

    def __init__(self, guard: CallGuard, max_watches: int = MAX_WATCHES) -> None:
        super().__init__()
        self._guard = guard
        self._max_watches = max_watches
        self._watches = 0

    @property
    def watches(self) -> int:
        return self._watches

    async def Watch(self, request: Any, context: Any) -> None:  # noqa: N802 - the proto's name
        peer = peer_address(context.peer())
        if self._watches >= self._max_watches:
            self._guard.counters["refused_watches"] += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many health watches")
        if not self._guard.admit(peer):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                "too many calls from this address")
        self._watches += 1
        try:
            await super().Watch(request, context)
        finally:
            self._watches -= 1
            self._guard.leave(peer)
