"""The KMS core's state ports in PostgreSQL, shared by every replica of a cluster.

Each check is ONE autocommit statement, atomic on its own (no read-then-write race between
replicas):

* replay cache (RFC 3830 5.4): ``INSERT ... ON CONFLICT`` keyed by the message digest; an
  existing row is taken over only once it has expired. Live rows are never evicted: only
  rows whose expiry has passed are deleted, by the pruner, off the request path.
* resolve ledger (RFC 6043 5.1.1, flag J = 0): one row per (ticket, responder), kept until
  the ticket itself expires.
* token buckets (per-identity rate limit and per-peer quotas): an upsert that refills by
  elapsed time and takes a token only if one is there, so the limit holds cluster-wide.

When the database cannot be reached every check raises :class:`DatabaseUnavailable` (a
``StoreUnavailable``): the call is answered UNAVAILABLE, never accepted unchecked.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from kms.store.pg import DatabaseUnavailable, PgDatabase

log = logging.getLogger("kms.store.pg")

_REPLAY_SQL = (
    "INSERT INTO replay AS r (digest, expires_at) VALUES (%s, %s) "
    "ON CONFLICT (digest) DO UPDATE SET expires_at = EXCLUDED.expires_at "
    "WHERE r.expires_at <= %s RETURNING 1"
)
_LEDGER_SQL = (
    "INSERT INTO resolved (ticket_responder, expires_at) VALUES (%s, %s) "
    "ON CONFLICT DO NOTHING RETURNING 1"
)
_BUCKET_SQL = (
    "INSERT INTO rate_buckets AS b (key, tokens, last) "
    "VALUES (%(key)s, %(burst)s - 1, %(now)s) "
    "ON CONFLICT (key) DO UPDATE SET "
    "tokens = LEAST(%(burst)s, b.tokens + GREATEST(0, %(now)s - b.last) * %(rate)s) - 1, "
    "last = GREATEST(b.last, %(now)s) "
    "WHERE LEAST(%(burst)s, b.tokens + GREATEST(0, %(now)s - b.last) * %(rate)s) >= 1 "
    "RETURNING 1"
)

# Rate limit and replay cache in ONE statement: the replay row is written only when the
# bucket gave a token (data-modifying CTEs see each other's RETURNING rows).
_ADMIT_SQL = (
    "WITH bucket AS ("
    "INSERT INTO rate_buckets AS b (key, tokens, last) "
    "VALUES (%(key)s, %(burst)s - 1, %(now)s) "
    "ON CONFLICT (key) DO UPDATE SET "
    "tokens = LEAST(%(burst)s, b.tokens + GREATEST(0, %(now)s - b.last) * %(rate)s) - 1, "
    "last = GREATEST(b.last, %(now)s) "
    "WHERE LEAST(%(burst)s, b.tokens + GREATEST(0, %(now)s - b.last) * %(rate)s) >= 1 "
    "RETURNING 1), "
    "seen AS ("
    "INSERT INTO replay AS r (digest, expires_at) "
    "SELECT %(digest)s, %(expires)s WHERE EXISTS (SELECT 1 FROM bucket) "
    "ON CONFLICT (digest) DO UPDATE SET expires_at = EXCLUDED.expires_at "
    "WHERE r.expires_at <= %(now)s RETURNING 1) "
    "SELECT EXISTS (SELECT 1 FROM bucket), EXISTS (SELECT 1 FROM seen)"
)

# A bucket idle this long is full again whatever its rate (burst / rate <= this for every
# rate of at least 1/30 per second); deleting it changes nothing.
BUCKET_IDLE_S = 3600.0


class PgReplayCache:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    def check_and_store(self, digest: bytes, expires_at: float, now: float) -> bool:
        return bool(self._db.execute(_REPLAY_SQL, (digest, expires_at, now)))


class PgResolveLedger:
    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    def first_resolve(self, ticket_id: bytes, responder: bytes, expires_at: float) -> bool:
        key = ticket_id + b"\x00" + responder
        return bool(self._db.execute(_LEDGER_SQL, (key, expires_at)))


def _take(db: PgDatabase, key: bytes, rate: float, burst: float, now: float) -> bool:
    params = {"key": key, "rate": float(rate), "burst": float(burst), "now": float(now)}
    return bool(db.execute(_BUCKET_SQL, params))


class PgRateLimiter:
    """Per identity: ``rate`` requests per second with bursts up to ``burst``, cluster-wide
    (the same bucket arithmetic as :class:`kms.store.memory.TokenBucketRateLimiter`)."""

    def __init__(self, db: PgDatabase, rate: float, burst: float | None = None) -> None:
        self._db = db
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, 2 * rate)

    def allow(self, identity: bytes, now: float) -> bool:
        if self.rate <= 0:
            return True
        return _take(self._db, b"i" + identity, self.rate, self.burst, now)


class PgAdmission:
    """:class:`kms.core.ports.Admission`: the per-identity token bucket and the replay cache
    in one round trip (with the rate limit off, the replay insert alone)."""

    def __init__(self, db: PgDatabase, rate: float, burst: float | None = None) -> None:
        self._db = db
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, 2 * rate)

    def admit(
        self, identity: bytes, digest: bytes, expires_at: float, now: float
    ) -> tuple[bool, bool]:
        if self.rate <= 0:
            return True, bool(self._db.execute(_REPLAY_SQL, (digest, expires_at, now)))
        params = {
            "key": b"i" + identity, "rate": float(self.rate), "burst": float(self.burst),
            "now": float(now), "digest": digest, "expires": float(expires_at),
        }
        rows = self._db.execute(_ADMIT_SQL, params)
        allowed, fresh = rows[0]
        return bool(allowed), bool(fresh)


class PgQuota:
    """Per-peer quotas (rate given per call, from the registry), cluster-wide."""

    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    def allow(self, key: bytes, rate: float, now: float) -> bool:
        if rate <= 0:
            return True
        return _take(self._db, b"p" + key, rate, max(1.0, 2 * rate), now)


class Pruner:
    """Deletes expired replay and ledger rows and idle buckets every ``interval_s`` seconds,
    in a background thread (never on the request path), in bounded batches. Rows whose
    expiry lies in the future are never touched. With ``revocation_horizon_s`` it also
    deletes the ticket revocations older than that (see
    :func:`kms.core.revocation.ticket_revocation_horizon`)."""

    BATCH = 5000

    def __init__(
        self,
        db: PgDatabase,
        interval_s: float = 10.0,
        revocation_horizon_s: int | None = None,
    ) -> None:
        self._db = db
        self.interval_s = interval_s
        self.revocation_horizon_s = revocation_horizon_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kms-pg-prune", daemon=True)
        self._thread.start()

    def prune_once(self, now: float | None = None) -> int:
        """One pass; returns how many rows went."""
        t = time.time() if now is None else now
        total = 0
        for table, column, cutoff in (
            ("replay", "expires_at", t),
            ("resolved", "expires_at", t),
            ("rate_buckets", "last", t - BUCKET_IDLE_S),
        ):
            sql = (
                f"DELETE FROM {table} WHERE ctid = ANY (ARRAY(SELECT ctid FROM {table} "  # noqa: S608
                f"WHERE {column} <= %s LIMIT {self.BATCH}))"
            )
            while True:
                with self._db.pool.connection() as conn:
                    n = conn.execute(sql, (cutoff,)).rowcount
                total += max(0, n)
                if n < self.BATCH:
                    break
        if self.revocation_horizon_s is not None:
            from kms.store.pg_registry import PgRegistry  # the registry's own SQL, once

            total += PgRegistry(self._db).prune_ticket_revocations(t, self.revocation_horizon_s)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(DatabaseUnavailable, Exception):
                self.prune_once()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
