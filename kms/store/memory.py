"""In-process implementations of the KMS core's ports: bounded replay cache, resolve
ledger, token-bucket rate limiter, and an audit sink that keeps records in a list."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping


class MemoryReplayCache:
    """Bounded: at most ``capacity`` digests; expired ones are dropped first, then the oldest.

    Dropping a live digest early can only let a replay through after ``capacity`` newer
    authenticated messages, never refuse a fresh one: size it above peak rate x window.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._items: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def check_and_store(self, digest: bytes, expires_at: float, now: float) -> bool:
        with self._lock:
            exp = self._items.get(digest)
            if exp is not None and exp > now:
                return False
            self._items[digest] = expires_at
            self._items.move_to_end(digest)
            while self._items:
                first, first_exp = next(iter(self._items.items()))
                if first_exp <= now or len(self._items) > self.capacity:
                    del self._items[first]
                else:
                    break
            return True


class MemoryResolveLedger:
    def __init__(self, capacity: int = 100_000) -> None:
        self._cache = MemoryReplayCache(capacity)

    def first_resolve(self, ticket_id: bytes, responder: bytes, expires_at: float) -> bool:
        key = ticket_id + b"\x00" + responder
        return self._cache.check_and_store(key, expires_at, 0.0)


class TokenBucketRateLimiter:
    """Per identity: ``rate`` requests per second with bursts up to ``burst``."""

    def __init__(self, rate: float, burst: float | None = None, max_identities: int = 100_000):
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, 2 * rate)
        self.max_identities = max_identities
        self._buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, identity: bytes, now: float) -> bool:
        if self.rate <= 0:
            return True
        with self._lock:
            tokens, last = self._buckets.get(identity, (self.burst, now))
            # A clock stepping back must not take tokens away (max 0).
            tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
            ok = tokens >= 1.0
            if ok:
                tokens -= 1.0
            self._buckets[identity] = (tokens, now)
            self._buckets.move_to_end(identity)
            if len(self._buckets) > self.max_identities:
                self._buckets.popitem(last=False)
            return ok


class PerKeyQuota:
    """Token buckets whose rate comes with each call (per-peer quotas from the registry)."""

    def __init__(self) -> None:
        self._limiters: dict[tuple[bytes, float], TokenBucketRateLimiter] = {}
        self._lock = threading.Lock()

    def allow(self, key: bytes, rate: float, now: float) -> bool:
        if rate <= 0:
            return True
        with self._lock:
            limiter = self._limiters.setdefault((key, rate), TokenBucketRateLimiter(rate))
        return limiter.allow(key, now)


class ListAuditSink:
    """Keeps audit records in memory (tests, and the in-process benchmark)."""

    def __init__(self) -> None:
        self.records: list[dict[str, object]] = []

    def emit(self, record: Mapping[str, object]) -> None:
        self.records.append(dict(record))
