"""In-process implementations of the KMS core's ports: bounded replay cache, resolve
ledger, token-bucket rate limiter, and an audit sink that keeps records in a list."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping

from kms.core.ports import ReplayCacheFull


class MemoryReplayCache:
    """Bounded: at most ``capacity`` live digests. Expired ones are dropped; when all
    ``capacity`` are still live, a new digest is refused (:class:`ReplayCacheFull`), never
    stored by forgetting a live one (that would re-admit its replay). ``evict_live`` keeps
    the older "drop the oldest" behaviour for stores where that is safe (the resolve ledger,
    whose keys are bounded by ticket validity). Size it as peak rate x digest lifetime.
    """

    def __init__(self, capacity: int = 100_000, *, evict_live: bool = False) -> None:
        self.capacity = capacity
        self.evict_live = evict_live
        self.refused_full = 0
        self._items: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def check_and_store(self, digest: bytes, expires_at: float, now: float) -> bool:
        with self._lock:
            exp = self._items.get(digest)
            if exp is not None and exp > now:
                return False
            # Expiry times grow with insertion (now + a fixed lifetime): expired digests
            # are at the front.
            while self._items:
                first, first_exp = next(iter(self._items.items()))
                if first_exp > now:
                    break
                del self._items[first]
            if digest not in self._items and len(self._items) >= self.capacity:
                if not self.evict_live:
                    self.refused_full += 1
                    raise ReplayCacheFull(f"{self.capacity} live entries")
                self._items.popitem(last=False)
            self._items[digest] = expires_at
            self._items.move_to_end(digest)
            return True


class MemoryResolveLedger:
    def __init__(self, capacity: int = 100_000) -> None:
        self._cache = MemoryReplayCache(capacity, evict_live=True)

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
