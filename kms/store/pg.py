"""PostgreSQL for cluster mode: one database shared by every ``kms serve`` replica.

Everything replicas must agree on lives here: the registry (endpoints, groups, applications,
peers, TPK versions), the replay cache, the resolve ledger and the rate-limit buckets. This
module owns the connection pool, the password (never in kms.toml or argv: a file, an
environment variable, or libpq's own PGPASSFILE / PGPASSWORD), the versioned schema and the
watcher that tells replicas when the registry changed.

Connections are autocommit: each hot-path check is ONE statement, atomic on its own. A DSN
may list several hosts with ``target_session_attrs=read-write`` (libpq picks the primary);
after a failover the broken connections fail once (the call answers UNAVAILABLE) and the pool
reconnects, to the new primary, without a restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
from psycopg import conninfo as pg_conninfo

from kms.core.ports import StoreUnavailable
from kms.store.nodes import PG_MIGRATION as _NODES_MIGRATION
from kms.store.peer_versions import PG_MIGRATION as _PEER_VERSIONS_MIGRATION
from kms.store.psk_versions import PG_MIGRATION as _PSK_VERSIONS_MIGRATION
from kms.store.revocations import PG_MIGRATION as _REVOCATIONS_MIGRATION

log = logging.getLogger("kms.store.pg")

# pg_advisory_xact_lock keys: schema migrations, and registry writers (what SQLite's
# BEGIN IMMEDIATE gives the embedded registry: concurrent operators serialise).
MIGRATION_LOCK = 0x6B6D735F6D6967  # "kms_mig"
REGISTRY_LOCK = 0x6B6D735F726567  # "kms_reg"
NOTIFY_CHANNEL = "kms_registry"


class DatabaseError(Exception):
    """A configuration or schema problem with the PostgreSQL store (one line, no secrets)."""


class DatabaseUnavailable(StoreUnavailable):
    """PostgreSQL cannot be reached now (down, failing over, pool exhausted)."""


class SchemaTooNewError(DatabaseError):
    """The database was migrated by a newer version of the software."""


@dataclass(frozen=True)
class PgSettings:
    """How to reach the database (from kms.toml ``[store]``)."""

    dsn: str
    password_env: str | None = None
    password_file: Path | None = None
    pool_size: int = 4
    connect_timeout_s: int = 3
    acquire_timeout_s: float = 2.0


def dsn_has_password(dsn: str) -> bool:
    try:
        return "password" in pg_conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return False


def check_dsn(dsn: str) -> str:
    """An error message for an unusable DSN, "" if it is fine (no connection is made)."""
    try:
        params = pg_conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        return f"not a PostgreSQL connection string ({_one_line(exc)})"
    if "password" in params:
        return "must not contain a password (use password_file, password_env or PGPASSFILE)"
    if not params.get("dbname") and not params.get("host"):
        return "must name a host and a database, e.g. postgresql://kms@db:5432/kms"
    return ""


def show_dsn(dsn: str) -> str:
    """The DSN for messages: hosts, port, user and database; never a password."""
    try:
        p = pg_conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "postgresql://?"
    user = f"{p['user']}@" if p.get("user") else ""
    port = f":{p['port']}" if p.get("port") else ""
    return f"postgresql://{user}{p.get('host', '')}{port}/{p.get('dbname', '')}"


def read_password(settings: PgSettings) -> str | None:
    """The password from the file or environment variable named in kms.toml, else None
    (libpq then uses PGPASSFILE / ~/.pgpass / PGPASSWORD, or trust/peer/certificate auth)."""
    if settings.password_env is not None:
        value = os.environ.get(settings.password_env)
        if value is None:
            raise DatabaseError(
                f"[store] password_env: environment variable {settings.password_env} is not set"
            )
        return value
    if settings.password_file is not None:
        try:
            return settings.password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise DatabaseError(
                f"[store] password_file: cannot read {settings.password_file}: {exc.strerror}"
            ) from None
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# ------------------------------------------------------------------------------------------
# schema: ordered migrations; kms_schema.version records how many have run.

MIGRATIONS: Sequence[str] = (
    # 1: the registry (same shape as the SQLite one), its change generation, and the state
    # shared by replicas (replay cache, resolve ledger, token buckets).
    """
    CREATE TABLE endpoints (
        id          BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        identity    BYTEA   NOT NULL UNIQUE,
        id_type     INTEGER NOT NULL CHECK (id_type IN (0, 1, 2)),
        key_label   TEXT    NOT NULL UNIQUE,
        created_at  BIGINT  NOT NULL,
        enabled     INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1))
    );
    CREATE TABLE groups (
        id          BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        identity    BYTEA   NOT NULL UNIQUE,
        created_at  BIGINT  NOT NULL
    );
    CREATE TABLE group_members (
        group_id    BIGINT  NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
        member_id   BIGINT  NOT NULL REFERENCES endpoints(id) ON DELETE CASCADE,
        PRIMARY KEY (group_id, member_id)
    );
    CREATE INDEX group_members_by_member ON group_members(member_id);
    CREATE TABLE applications (
        id          BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        identity    BYTEA   NOT NULL UNIQUE,
        created_at  BIGINT  NOT NULL
    );
    CREATE TABLE peers (
        id          BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        kms_id      BYTEA   NOT NULL UNIQUE,
        address     TEXT    NOT NULL,
        auth        TEXT    NOT NULL CHECK (auth IN ('psk', 'cert')),
        key_label   TEXT,
        cert_pem    TEXT,
        ca_pem      TEXT,
        created_at  BIGINT  NOT NULL,
        resolve_for TEXT    NOT NULL DEFAULT '',
        rate_limit  DOUBLE PRECISION NOT NULL DEFAULT 0,
        deadline_ms INTEGER NOT NULL DEFAULT 2000
    );
    CREATE TABLE tpk_versions (
        version     INTEGER PRIMARY KEY CHECK (version > 0),
        key_label   TEXT    NOT NULL UNIQUE,
        state       TEXT    NOT NULL CHECK (state IN ('current', 'active', 'retired')),
        created_at  BIGINT  NOT NULL
    );
    CREATE UNIQUE INDEX tpk_one_current ON tpk_versions(state) WHERE state = 'current';

    CREATE TABLE registry_generation (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        n  BIGINT  NOT NULL
    );
    INSERT INTO registry_generation (id, n) VALUES (1, 0);
    CREATE FUNCTION kms_registry_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE registry_generation SET n = n + 1 WHERE id = 1;
        PERFORM pg_notify('kms_registry', '');
        RETURN NULL;
    END $$;
    CREATE TRIGGER endpoints_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON endpoints
        FOR EACH STATEMENT EXECUTE FUNCTION kms_registry_changed();
    CREATE TRIGGER groups_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON groups
        FOR EACH STATEMENT EXECUTE FUNCTION kms_registry_changed();
    CREATE TRIGGER members_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
        ON group_members FOR EACH STATEMENT EXECUTE FUNCTION kms_registry_changed();
    CREATE TRIGGER applications_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
        ON applications FOR EACH STATEMENT EXECUTE FUNCTION kms_registry_changed();
    CREATE TRIGGER peers_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON peers
        FOR EACH STATEMENT EXECUTE FUNCTION kms_registry_changed();
    CREATE TRIGGER tpks_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tpk_versions
        FOR EACH STATEMENT EXECUTE FUNCTION kms_registry_changed();

    CREATE TABLE replay (
        digest      BYTEA PRIMARY KEY,
        expires_at  DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX replay_expiry ON replay(expires_at);
    CREATE TABLE resolved (
        ticket_responder BYTEA PRIMARY KEY,
        expires_at       DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX resolved_expiry ON resolved(expires_at);
    CREATE TABLE rate_buckets (
        key     BYTEA PRIMARY KEY,
        tokens  DOUBLE PRECISION NOT NULL,
        last    DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX rate_buckets_last ON rate_buckets(last);
    """,
    # 2: revocation (suspended endpoints, revoked tickets, requested-before times); see
    # kms.store.revocations
    _REVOCATIONS_MIGRATION,
    # 3: PSK versions named by IDRpsk (rotation without downtime); see kms.store.psk_versions
    _PSK_VERSIONS_MIGRATION,
    # 4: authorised intermediate nodes (RFC 6043 11.1); see kms.store.nodes
    _NODES_MIGRATION,
    # 5: which version of a peer KMS's shared key this KMS sends with; see
    # kms.store.peer_versions
    _PEER_VERSIONS_MIGRATION,
)

REGISTRY_TABLES = (
    "endpoints", "groups", "group_members", "applications", "peers", "tpk_versions",
    "revocations", "psk_versions", "nodes",
)


class PgDatabase:
    """A connection pool to the KMS database, shared by the threads of one process."""

    def __init__(self, settings: PgSettings) -> None:
        problem = check_dsn(settings.dsn)
        if problem:
            raise DatabaseError(f"[store] dsn: {problem}")
        self.settings = settings
        self.display = show_dsn(settings.dsn)
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": settings.connect_timeout_s,
            "application_name": "kms",
        }
        password = read_password(settings)
        if password is not None:
            kwargs["password"] = password
        self._kwargs = kwargs
        self.pool = psycopg_pool.ConnectionPool(
            settings.dsn,
            kwargs=kwargs,
            min_size=1,
            # The hot path keeps up to pool_size connections checked out (see _take); two more
            # for registry write transactions (operator commands) and pruning.
            max_size=max(1, settings.pool_size) + 2,
            timeout=settings.acquire_timeout_s,
            # Keep trying to reconnect through a long outage (the default gives up after
            # five minutes); calls meanwhile answer UNAVAILABLE.
            reconnect_timeout=24 * 3600.0,
            open=False,
            name="kms",
        )
        self.pool.open(wait=False)
        self._checking = threading.Lock()
        # Hot-path connections kept checked out of the pool, each with its own cursor:
        # taking one from this list costs a few microseconds, a pool round trip (getconn /
        # putconn) and a new cursor about 60 (measured: 108 -> 44 us of CPU per statement).
        self._hot = threading.Condition()
        self._spare: list[tuple[psycopg.Connection[Any], psycopg.Cursor[Any]]] = []
        self._out = 0  # hot connections taken from the pool (spare or in use)
        self._hot_max = max(1, settings.pool_size)
        self.round_trips = 0  # statements sent (bench: database round trips per exchange)
        # Wraps every wait for the database: the server gives its core slot up meanwhile
        # (a commit waits for a WAL flush; another call can compute in the meantime).
        self.wait_hook: Callable[[], contextlib.AbstractContextManager[None]] = (
            contextlib.nullcontext
        )

    # --- plumbing -------------------------------------------------------------------------
    def connect(self) -> psycopg.Connection[Any]:
        """A connection outside the pool (LISTEN, migrations from the CLI)."""
        try:
            return psycopg.connect(self.settings.dsn, **self._kwargs)
        except psycopg.Error as exc:
            raise DatabaseUnavailable(f"database {self.display}: {_one_line(exc)}") from None

    def unavailable(self, exc: BaseException) -> DatabaseUnavailable:
        """Map a connection failure. The other kept connections are probably dead too (the
        server went away): hand them back to the pool, which checks and replaces them."""
        with self._hot:
            spare, self._spare = self._spare, []
            self._out -= len(spare)
            self._hot.notify_all()
        for conn, _cur in spare:
            with contextlib.suppress(Exception):
                self.pool.putconn(conn)
        if self._checking.acquire(blocking=False):

            def check() -> None:
                try:
                    with contextlib.suppress(Exception):
                        self.pool.check()
                finally:
                    self._checking.release()

            threading.Thread(target=check, name="kms-pg-check", daemon=True).start()
        return DatabaseUnavailable(f"database {self.display}: {_one_line(exc)}")

    def _take(self) -> tuple[psycopg.Connection[Any], psycopg.Cursor[Any]]:
        deadline = time.monotonic() + self.settings.acquire_timeout_s
        with self._hot:
            while not self._spare and self._out >= self._hot_max:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise psycopg_pool.PoolTimeout(
                        f"no connection free within {self.settings.acquire_timeout_s:g} s"
                    )
                self._hot.wait(remaining)
            if self._spare:
                return self._spare.pop()
            self._out += 1
        try:
            conn = self.pool.getconn(timeout=max(0.01, deadline - time.monotonic()))
            return conn, conn.cursor()
        except BaseException:
            with self._hot:
                self._out -= 1
                self._hot.notify()
            raise

    def _give(self, pair: tuple[psycopg.Connection[Any], psycopg.Cursor[Any]]) -> None:
        conn = pair[0]
        if not conn.broken and not conn.closed:
            with self._hot:
                self._spare.append(pair)
                self._hot.notify()
            return
        with self._hot:
            self._out -= 1
            self._hot.notify()
        with contextlib.suppress(Exception):
            self.pool.putconn(conn)  # the pool drops a broken connection and makes a new one

    def execute(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = (), *, read_only: bool = False
    ) -> list[Any]:
        """Run one autocommit statement; its rows ([] without a result). A read is retried
        once on a fresh connection when a broken one fails (after a failover); a write is
        not (it may have committed), the caller answers UNAVAILABLE instead."""
        attempts = 2 if read_only else 1
        for attempt in range(attempts):
            try:
                with self.wait_hook():
                    pair = self._take()
                    try:
                        self.round_trips += 1
                        cur = pair[1].execute(sql, params)
                        return cur.fetchall() if cur.description else []
                    finally:
                        self._give(pair)
            except psycopg.errors.IntegrityError:
                raise
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                if attempt + 1 < attempts:
                    continue
                raise self.unavailable(exc) from None
            except psycopg_pool.PoolTimeout as exc:
                raise self.unavailable(exc) from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._hot:
            spare, self._spare = self._spare, []
            self._out = 0
        for conn, _cur in spare:
            with contextlib.suppress(Exception):
                self.pool.putconn(conn)
        with contextlib.suppress(Exception):
            self.pool.close(timeout=2.0)

    # --- schema ---------------------------------------------------------------------------
    def migrate(self) -> int:
        """Apply pending migrations in one transaction under an advisory lock, so replicas
        starting at once apply each migration exactly once. Returns the schema version."""
        try:
            with self.connect() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                conn.execute("CREATE TABLE IF NOT EXISTS kms_schema (version INTEGER NOT NULL)")
                row = conn.execute("SELECT max(version) FROM kms_schema").fetchone()
                version = int(row[0]) if row and row[0] is not None else 0
                if version > len(MIGRATIONS):
                    raise SchemaTooNewError(
                        f"database {self.display} has schema version {version}, newer than "
                        f"this software ({len(MIGRATIONS)})"
                    )
                for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                    conn.execute(script)  # fixed text, no params
                    conn.execute("INSERT INTO kms_schema (version) VALUES (%s)", (number,))
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise DatabaseUnavailable(f"database {self.display}: {_one_line(exc)}") from None
        except psycopg.Error as exc:
            raise DatabaseError(f"database {self.display}: {_one_line(exc)}") from None
        return len(MIGRATIONS)

    def schema_version(self) -> int:
        rows = self.execute(
            "SELECT coalesce(max(version), 0) FROM kms_schema", read_only=True
        )
        return int(rows[0][0])


class RegistryWatcher:
    """Tells this process when the registry changed anywhere in the cluster.

    A dedicated connection LISTENs on ``kms_registry`` (every registry write fires it, from a
    trigger, at commit) and re-reads the change generation at least every ``poll_s`` seconds
    in case a notification was lost. While the connection is down ``synced`` is False and
    callers must not trust anything they cached.
    """

    def __init__(self, db: PgDatabase, poll_s: float = 0.5) -> None:
        self.db = db
        self.poll_s = poll_s
        self.generation = 0  # changes (never repeats) whenever the registry may have changed
        self.synced = False
        self._seen: int | None = None
        self._stop = threading.Event()
        self._listeners: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, name="kms-pg-watch", daemon=True)
        self._thread.start()

    def _changed(self) -> None:
        self.generation += 1
        for fn in self._listeners:
            fn()

    def _observe(self, n: int) -> None:
        if n != self._seen:
            self._seen = n
            self._changed()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self.db.connect() as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    while not self._stop.is_set():
                        row = conn.execute("SELECT n FROM registry_generation").fetchone()
                        self._observe(int(row[0]) if row else -1)
                        self.synced = True
                        for _note in conn.notifies(timeout=self.poll_s, stop_after=1):
                            pass
            except (psycopg.Error, DatabaseUnavailable) as exc:
                if self.synced:
                    log.warning("registry watcher lost the database: %s", _one_line(exc))
                self.synced = False
                self._seen = None
                self._changed()
                self._stop.wait(min(1.0, self.poll_s * 2))

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.synced and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.synced

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.poll_s * 4 + 1)
