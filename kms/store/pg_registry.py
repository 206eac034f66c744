"""The registry in PostgreSQL: the same :class:`~kms.store.registry.Registry` API and rules,
over the shared database of a cluster.

The queries are the SQLite registry's own (one source of truth for the registry's logic);
only the dialect differs: ``?`` placeholders become ``%s`` and ``INSERT OR IGNORE`` becomes
``ON CONFLICT DO NOTHING``. A write transaction takes a cluster-wide advisory lock first, the
equivalent of SQLite's ``BEGIN IMMEDIATE``: operators on different replicas serialise, and a
caller may create or destroy the matching token object inside it and roll back on failure.
Reads outside a transaction are single autocommit statements on a pooled connection.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import lru_cache
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool

from kms.store.pg import (
    MIGRATIONS,
    REGISTRY_LOCK,
    DatabaseError,
    DatabaseUnavailable,
    PgDatabase,
    SchemaTooNewError,
)
from kms.store.registry import Registry, RegistryError, RegistryUnavailable, SchemaTooNew


@lru_cache(maxsize=256)
def to_pg(sql: str) -> str:
    """SQLite dialect -> PostgreSQL for the registry's statements."""
    out = sql.replace("%", "%%").replace("?", "%s")
    m = re.match(r"\s*INSERT OR IGNORE INTO", out)
    if m:
        out = "INSERT INTO" + out[m.end():] + " ON CONFLICT DO NOTHING"
    return out


class PgRegistry(Registry):
    """One instance per thread (like the SQLite registry); instances share ``db``'s pool."""

    def __init__(self, db: PgDatabase, *, owns_db: bool = False) -> None:
        self._db = db
        self._owns_db = owns_db
        self._pg: psycopg.Connection[Any] | None = None  # inside a transaction only
        self._depth = 0
        self.path = Path(db.display)

    @property
    def db(self) -> PgDatabase:
        return self._db

    def migrate(self) -> int:
        try:
            return self._db.migrate()
        except SchemaTooNewError as exc:
            raise SchemaTooNew(str(exc)) from None
        except DatabaseUnavailable as exc:
            raise RegistryUnavailable(str(exc)) from None
        except DatabaseError as exc:
            raise RegistryError(str(exc)) from None

    def schema_version(self) -> int:
        try:
            return self._db.schema_version()
        except DatabaseUnavailable as exc:
            raise RegistryUnavailable(str(exc)) from None

    def data_version(self) -> int | None:
        return None  # replicas learn of changes from the registry generation instead

    def close(self) -> None:
        if self._owns_db:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        pool = self._db.pool
        try:
            conn = pool.getconn()
        except psycopg_pool.PoolTimeout as exc:
            raise RegistryUnavailable(str(self._db.unavailable(exc))) from None
        try:
            try:
                conn.execute("BEGIN")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (REGISTRY_LOCK,))
            except psycopg.Error as exc:
                raise RegistryUnavailable(str(self._db.unavailable(exc))) from None
            self._pg = conn
            self._depth = 1
            try:
                yield
            except BaseException:
                self._depth = 0
                self._pg = None
                if not conn.broken:
                    with suppress(psycopg.Error):
                        conn.execute("ROLLBACK")
                raise
            self._depth = 0
            self._pg = None
            try:
                conn.execute("COMMIT")
            except psycopg.Error as exc:
                if not conn.broken:
                    with suppress(psycopg.Error):
                        conn.execute("ROLLBACK")
                raise RegistryUnavailable(
                    f"registry {self._db.display}: commit failed: {' '.join(str(exc).split())}"
                ) from None
        finally:
            pool.putconn(conn)

    def _q(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        pg_sql = to_pg(sql)
        conn = self._pg
        try:
            if conn is None:
                read = pg_sql.lstrip().upper().startswith("SELECT")
                return self._db.execute(pg_sql, tuple(params), read_only=read)
            cur = conn.execute(pg_sql, tuple(params))
            return cur.fetchall() if cur.description else []
        except psycopg.errors.IntegrityError as exc:
            raise RegistryError(
                f"registry constraint violated: {' '.join(str(exc).split())}"
            ) from None
        except DatabaseUnavailable as exc:
            raise RegistryUnavailable(str(exc)) from None
        except psycopg.Error as exc:
            raise RegistryUnavailable(str(self._db.unavailable(exc))) from None


__all__ = ["MIGRATIONS", "PgRegistry", "to_pg"]
