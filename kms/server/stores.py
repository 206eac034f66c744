"""Which store backend a KMS home uses (kms.toml ``[store]``), and the objects built on it.

``sqlite`` (the default): the registry in ``<home>/registry.sqlite3``, the replay cache and
resolve ledger in ``<home>/state/``, rate limits in process memory: one host.

``postgresql``: everything replicas must agree on in one database (``kms.store.pg``): the
registry, the replay cache, the resolve ledger (J = 0), the per-identity rate limit and the
peer quotas. Registry reads on the hot path are served from a per-process cache that the
database invalidates (LISTEN/NOTIFY on every registry write, plus a generation poll), so a
change made through any replica is seen by the others at once, and within the poll interval
even if a notification is lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from kms.core.ports import Admission, QuotaLimiter, RateLimiter, ReplayCache, ResolveLedger
from kms.core.revocation import ticket_revocation_horizon
from kms.server.config import KmsConfig
from kms.store.memory import PerKeyQuota, TokenBucketRateLimiter
from kms.store.registry import REGISTRY_FILE, Registry, RegistryError, RegistryUnavailable
from kms.store.state import SqliteReplayCache, SqliteResolveLedger

STATE_DIR = "state"

log = logging.getLogger("kms.server.stores")


class Stores(Protocol):
    """The store backend of one process."""

    backend: str

    def open_registry(self) -> Registry:
        """A registry handle for the calling thread."""
        ...

    def replay_cache(self, capacity: int) -> ReplayCache:
        """``capacity``: live digests a bounded (SQLite) cache holds; a shared database's
        cache is bounded by the acceptance window instead and ignores it."""
        ...

    def resolve_ledger(self) -> ResolveLedger: ...

    def rate_limiter(self) -> RateLimiter: ...

    def peer_quota(self) -> QuotaLimiter: ...

    def admission(self) -> Admission | None:
        """Rate limit + replay cache in one step, when the backend can do that."""
        ...

    def generation(self) -> int | None:
        """A number that changes whenever the registry may have changed anywhere in the
        cluster; None: no such number (SQLite, where the directory asks each thread's own
        connection instead: PRAGMA data_version)."""
        ...

    def start_background(self) -> None:
        """Start what a serving process needs besides requests (change watch, pruning)."""
        ...

    def set_wait_hook(self, hook: Callable[[], AbstractContextManager[None]]) -> None:
        """Run every wait for a remote store inside ``hook()`` (the server passes its core
        slot's ``released``: a call waiting for the database lets another one compute)."""
        ...

    def token_lock(self, name: str) -> AbstractContextManager[None]:
        """Held while creating a token object that every process sharing the token must
        find exactly once (e.g. the dummy PSK): a lock file in the home's state folder
        (SQLite: one host, one home), a PostgreSQL advisory lock in cluster mode (replicas
        have separate homes but share the token and the database)."""
        ...

    def ping(self) -> bool:
        """Whether the shared state answers (readiness): a local file store always does; a
        database must answer one query."""
        ...

    def close(self) -> None: ...


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_lock`` from a lock's name."""
    digest = hashlib.sha256(b"mikey-kms-token-lock:" + name.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def revocation_horizon(config: KmsConfig) -> int:
    """How long a ticket revocation is kept (see ticket_revocation_horizon)."""
    p = config.policy
    return ticket_revocation_horizon(p.max_lifetime_s, p.timestamp_window_s)


class SqliteStores:
    backend = "sqlite"

    def __init__(self, config: KmsConfig, *, create: bool = False) -> None:
        self.config = config
        self.path = config.home / REGISTRY_FILE
        self._create = create
        self._pruner: RevocationPruner | None = None

    def open_registry(self) -> Registry:
        reg = Registry.open(self.path, create=self._create)
        self._create = False
        return reg

    def _state(self) -> Path:
        state = self.config.home / STATE_DIR
        state.mkdir(mode=0o700, exist_ok=True)
        return state

    def replay_cache(self, capacity: int) -> ReplayCache:
        return SqliteReplayCache(self._state() / "replay.sqlite3", capacity)

    def resolve_ledger(self) -> ResolveLedger:
        return SqliteResolveLedger(self._state() / "resolved.sqlite3")

    def rate_limiter(self) -> RateLimiter:
        return TokenBucketRateLimiter(self.config.policy.rate_limit_per_s)

    def peer_quota(self) -> QuotaLimiter:
        return PerKeyQuota()

    def admission(self) -> Admission | None:
        return None  # in-memory rate limit, then the SQLite replay cache

    def generation(self) -> int | None:
        return None

    def start_background(self) -> None:
        if self._pruner is None:
            self._pruner = RevocationPruner(
                self.open_registry, revocation_horizon(self.config)
            )

    def set_wait_hook(self, hook: Callable[[], AbstractContextManager[None]]) -> None:
        return None  # local files: their waits are short and hold no slot worth giving up

    @contextlib.contextmanager
    def token_lock(self, name: str) -> Iterator[None]:
        with (self._state() / f"{name}.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file is closed
            yield

    def ping(self) -> bool:
        return True  # files in the home: their failures are the calls' own

    def close(self) -> None:
        if self._pruner is not None:
            self._pruner.close()
            self._pruner = None


class RevocationPruner:
    """Deletes expired ticket revocations from a SQLite registry every ``interval_s``
    seconds, in a background thread (what :class:`kms.store.pg_state.Pruner` does in
    cluster mode). A pass that finds nothing due writes nothing."""

    def __init__(
        self, open_registry: Callable[[], Registry], horizon_s: int, interval_s: float = 60.0
    ) -> None:
        self._open = open_registry
        self.horizon_s = horizon_s
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kms-prune", daemon=True)
        self._thread.start()

    def prune_once(self, now: float | None = None) -> int:
        reg = self._open()
        try:
            return reg.prune_ticket_revocations(
                time.time() if now is None else now, self.horizon_s
            )
        finally:
            reg.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.prune_once()
            except Exception as exc:  # a busy or missing registry: try again next time
                log.warning(
                    "pruning ticket revocations failed",
                    extra={"fields": {"error": type(exc).__name__}},
                )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class PgStores:
    backend = "postgresql"

    def __init__(self, config: KmsConfig) -> None:
        # Imported here: the embedded default never needs psycopg.
        from kms.store.pg import DatabaseError, DatabaseUnavailable, PgDatabase, PgSettings

        s = config.store
        assert s.dsn is not None  # parse_config requires it for this backend
        self.config = config
        try:
            self.db = PgDatabase(
                PgSettings(
                    dsn=s.dsn,
                    password_env=s.password_env,
                    password_file=s.password_file,
                    pool_size=s.pool_size,
                    connect_timeout_s=s.connect_timeout_s,
                )
            )
        except DatabaseError as exc:
            raise RegistryError(str(exc)) from None
        try:
            self.db.migrate()
        except DatabaseUnavailable as exc:
            self.db.close()
            raise RegistryUnavailable(str(exc)) from None
        except DatabaseError as exc:
            self.db.close()
            raise RegistryError(str(exc)) from None
        self._watcher: object | None = None
        self._pruner: object | None = None

    def open_registry(self) -> Registry:
        from kms.store.pg_registry import PgRegistry

        return PgRegistry(self.db)

    def replay_cache(self, capacity: int) -> ReplayCache:
        from kms.store.pg_state import PgReplayCache

        return PgReplayCache(self.db)

    def resolve_ledger(self) -> ResolveLedger:
        from kms.store.pg_state import PgResolveLedger

        return PgResolveLedger(self.db)

    def rate_limiter(self) -> RateLimiter:
        from kms.store.pg_state import PgRateLimiter

        return PgRateLimiter(self.db, self.config.policy.rate_limit_per_s)

    def peer_quota(self) -> QuotaLimiter:
        from kms.store.pg_state import PgQuota

        return PgQuota(self.db)

    def admission(self) -> Admission | None:
        from kms.store.pg_state import PgAdmission

        return PgAdmission(self.db, self.config.policy.rate_limit_per_s)

    def generation(self) -> int | None:
        from kms.store.pg import RegistryWatcher

        w = self._watcher
        if not isinstance(w, RegistryWatcher) or not w.synced:
            return None  # not watching (or lost the database): read through
        return w.generation

    def start_background(self) -> None:
        from kms.store.pg import RegistryWatcher
        from kms.store.pg_state import Pruner

        if self._watcher is None:
            watcher = RegistryWatcher(self.db)
            watcher.wait_synced(5.0)
            self._watcher = watcher
        if self._pruner is None:
            self._pruner = Pruner(
                self.db, revocation_horizon_s=revocation_horizon(self.config)
            )

    def set_wait_hook(self, hook: Callable[[], AbstractContextManager[None]]) -> None:
        self.db.wait_hook = hook

    @contextlib.contextmanager
    def token_lock(self, name: str) -> Iterator[None]:
        # A connection of its own: closing it releases the session-level lock even if the
        # unlock is never sent (a replica killed while holding it).
        conn = self.db.connect()
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (lock_key(name),))
            yield
        finally:
            with contextlib.suppress(Exception):
                conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key(name),))
            conn.close()

    def ping(self) -> bool:
        # A pool connection of its own (not the calls' hot ones, whose round trips are
        # counted): one query within the connect timeout.
        try:
            with self.db.pool.connection(timeout=self.config.store.connect_timeout_s) as conn:
                conn.execute("SELECT 1")
        except Exception:  # psycopg's errors, the pool's timeout: the database is not there
            return False
        return True

    def close(self) -> None:
        for part in (self._pruner, self._watcher):
            close = getattr(part, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):
                    close()
        self._pruner = self._watcher = None
        self.db.close()


def open_stores(config: KmsConfig, *, create: bool = False) -> Stores:
    """The backend kms.toml names (``create``: a missing SQLite registry may be created)."""
    if config.store.backend == "postgresql":
        return PgStores(config)
    return SqliteStores(config, create=create)
