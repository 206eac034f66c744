"""``kms store migrate DSN``: move a single-host home's shared state into PostgreSQL.

What moves: the whole registry (endpoints, groups and memberships, applications, peers and
their trust, TPK versions and states, creation times kept) and the live rows of the replay
cache and the resolve ledger (so that no accepted message can be replayed and no J = 0
ticket resolved twice across the switch). Keys stay where they are: in the token.

All-or-nothing: the rows go in one PostgreSQL transaction, under the registry's advisory lock;
``kms.toml`` is switched (written aside, then renamed over) only after it committed. Safe to
run twice: a home already switched to this DSN is reported and left alone, and a database
that already holds exactly this registry (an earlier run that stopped before the switch) is
accepted; a database holding anything else is refused. ``kms serve`` must be stopped: the
home's serve lock is taken for the duration.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kms.server.config import (
    CONFIG_FILE,
    ConfigError,
    load_config,
    parse_config,
    render_store_section,
)
from kms.server.stores import STATE_DIR
from kms.store.registry import REGISTRY_FILE, Registry, RegistryError

SERVE_LOCK = "serve.lock"


class MigrateError(Exception):
    """The migration cannot run or did not run; one line, nothing changed."""


@dataclass(frozen=True)
class Moved:
    endpoints: int = 0
    groups: int = 0
    memberships: int = 0
    applications: int = 0
    peers: int = 0
    tpk_versions: int = 0
    replay_entries: int = 0
    ledger_entries: int = 0
    already_there: bool = False  # the database held this registry already (earlier run)

    def describe(self) -> str:
        parts = [
            f"{self.endpoints} endpoints",
            f"{self.groups} groups ({self.memberships} memberships)",
            f"{self.applications} applications",
            f"{self.peers} peers",
            f"{self.tpk_versions} TPK versions",
            f"{self.replay_entries} replay-cache entries",
            f"{self.ledger_entries} resolve-ledger entries",
        ]
        return ", ".join(parts)


# The registry tables in dependency order, and their columns (the same in both schemas).
_TABLES: dict[str, tuple[str, ...]] = {
    "endpoints": ("id", "identity", "id_type", "key_label", "created_at", "enabled"),
    "groups": ("id", "identity", "created_at"),
    "group_members": ("group_id", "member_id"),
    "applications": ("id", "identity", "created_at"),
    "peers": ("id", "kms_id", "address", "auth", "key_label", "cert_pem", "ca_pem",
              "created_at", "resolve_for", "rate_limit", "deadline_ms", "send_version"),
    "tpk_versions": ("version", "key_label", "state", "created_at"),
    "revocations": ("kind", "subject", "not_before", "created_at", "reason"),
    "psk_versions": ("identity", "version", "name", "key_label", "retired", "created_at",
                     "retire_at"),
    "nodes": ("identity", "role", "key_label", "created_at", "initiators", "responders",
              "groups_in_scope", "cert_pem"),
}
_ORDER: dict[str, str] = {
    "endpoints": "id", "groups": "id", "group_members": "group_id, member_id",
    "applications": "id", "peers": "id", "tpk_versions": "version",
    "revocations": "kind, subject",
    "psk_versions": "identity, version",
    "nodes": "identity",
}
_BLOB = {"identity", "kms_id", "subject", "name"}


def _norm(table: str, row: tuple[Any, ...]) -> tuple[Any, ...]:
    cols = _TABLES[table]
    out: list[Any] = []
    for col, value in zip(cols, row, strict=True):
        if col in _BLOB:
            value = bytes(value)
        elif col == "rate_limit":
            value = float(value)
        elif isinstance(value, bool):
            value = int(value)
        out.append(value)
    return tuple(out)


def _sqlite_rows(reg_path: Path) -> dict[str, list[tuple[Any, ...]]]:
    Registry.open(reg_path).close()  # migrated to the current schema first
    conn = sqlite3.connect(f"file:{reg_path}?mode=ro", uri=True)
    try:
        return {
            t: [
                _norm(t, tuple(r))
                for r in conn.execute(
                    f"SELECT {', '.join(cols)} FROM {t} ORDER BY {_ORDER[t]}"  # noqa: S608
                )
            ]
            for t, cols in _TABLES.items()
        }
    finally:
        conn.close()


def _sqlite_state(path: Path, prefix: bytes, now: float) -> list[tuple[bytes, float]]:
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT digest, expires_at FROM seen WHERE expires_at > ?", (now,)
        ).fetchall()
    except sqlite3.OperationalError:
        return []  # never used: no table yet
    finally:
        conn.close()
    return [(bytes(d)[len(prefix):], float(e)) for d, e in rows if bytes(d).startswith(prefix)]


@contextlib.contextmanager
def _serve_lock(home: Path) -> Any:
    path = home / SERVE_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MigrateError(
                f"a `kms serve` is running on {home}: stop it first (the migration must not "
                "race live requests)"
            ) from None
        yield
    finally:
        os.close(fd)


def _switch_config(home: Path, dsn: str, password_env: str | None,
                   password_file: str | None) -> None:
    path = home / CONFIG_FILE
    text = path.read_text(encoding="utf-8")
    # Drop an existing [store] table (up to the next table header), then append ours.
    text = re.sub(r"(?ms)^\[store\][^\[]*", "", text).rstrip("\n") + "\n\n"
    text += render_store_section(dsn, password_env=password_env, password_file=password_file)
    try:
        parse_config(text, home)  # never write a kms.toml the KMS would refuse
    except ConfigError as exc:
        raise MigrateError(str(exc)) from None
    tmp = path.with_name(CONFIG_FILE + ".migrate.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, path.stat().st_mode & 0o777)
    os.replace(tmp, path)


def migrate_home(
    home: Path,
    dsn: str,
    *,
    password_env: str | None = None,
    password_file: Path | None = None,
    say: Callable[[str], None] = lambda _m: None,
) -> Moved:
    """Move ``home``'s registry and live state into the database ``dsn`` and switch its
    kms.toml to it. Raises MigrateError (nothing changed) when it cannot."""
    import psycopg

    from kms.store.pg import (
        REGISTRY_LOCK,
        DatabaseError,
        DatabaseUnavailable,
        PgDatabase,
        PgSettings,
        check_dsn,
        show_dsn,
    )

    home = home.absolute()
    problem = check_dsn(dsn)
    if problem:
        raise MigrateError(f"DSN: {problem}")
    try:
        config = load_config(home)
    except ConfigError as exc:
        raise MigrateError(str(exc)) from None
    where = show_dsn(dsn)
    if config.store.backend == "postgresql":
        if config.store.dsn == dsn:
            say(f"{home} already uses {where}; nothing to move")
            return Moved(already_there=True)
        raise MigrateError(
            f"{home} already uses PostgreSQL ({show_dsn(config.store.dsn or '')}), not {where}"
        )
    reg_path = home / REGISTRY_FILE
    if not reg_path.exists():
        raise MigrateError(f"{reg_path} does not exist: nothing to migrate")
    pw_file = None if password_file is None else password_file.absolute()
    with _serve_lock(home):
        try:
            rows = _sqlite_rows(reg_path)
        except RegistryError as exc:
            raise MigrateError(str(exc)) from None
        now = time.time()
        replay = _sqlite_state(home / STATE_DIR / "replay.sqlite3", b"r", now)
        ledger = _sqlite_state(home / STATE_DIR / "resolved.sqlite3", b"t", now)
        try:
            db = PgDatabase(PgSettings(dsn=dsn, password_env=password_env,
                                       password_file=pw_file))
        except DatabaseError as exc:
            raise MigrateError(str(exc)) from None
        try:
            db.migrate()
            already = _copy(db, rows, replay, ledger, REGISTRY_LOCK)
        except (DatabaseUnavailable, DatabaseError) as exc:
            raise MigrateError(str(exc)) from None
        except psycopg.Error as exc:
            raise MigrateError(f"database {where}: {' '.join(str(exc).split())}") from None
        finally:
            db.close()
        _switch_config(home, dsn, password_env, None if pw_file is None else str(pw_file))
    members = len(rows["group_members"])
    return Moved(
        endpoints=len(rows["endpoints"]),
        groups=len(rows["groups"]),
        memberships=members,
        applications=len(rows["applications"]),
        peers=len(rows["peers"]),
        tpk_versions=len(rows["tpk_versions"]),
        replay_entries=len(replay),
        ledger_entries=len(ledger),
        already_there=already,
    )


def _copy(
    db: Any,
    rows: dict[str, list[tuple[Any, ...]]],
    replay: list[tuple[bytes, float]],
    ledger: list[tuple[bytes, float]],
    lock: int,
) -> bool:
    """One transaction: an empty target gets the rows; a target holding exactly these rows
    is accepted as is (True); anything else is refused."""
    with db.connect() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
        existing = {
            t: [
                _norm(t, tuple(r))
                for r in conn.execute(
                    f"SELECT {', '.join(cols)} FROM {t} ORDER BY {_ORDER[t]}"  # noqa: S608
                )
            ]
            for t, cols in _TABLES.items()
        }
        if any(existing.values()):
            if existing == rows:
                _copy_state(conn, replay, ledger)
                return True
            raise MigrateError(
                "the database already holds a different registry; migrate into an empty "
                "database"
            )
        for table, cols in _TABLES.items():
            if not rows[table]:
                continue
            overriding = " OVERRIDING SYSTEM VALUE" if "id" in cols else ""
            sql = (
                f"INSERT INTO {table} ({', '.join(cols)}){overriding} "  # noqa: S608
                f"VALUES ({', '.join(['%s'] * len(cols))})"
            )
            with conn.cursor() as cur:
                cur.executemany(sql, rows[table])
            if "id" in cols:  # identity columns continue after the copied ids
                conn.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "  # noqa: S608
                    f"(SELECT max(id) FROM {table}))"
                )
        _copy_state(conn, replay, ledger)
    return False


def _copy_state(conn: Any, replay: list[tuple[bytes, float]],
                ledger: list[tuple[bytes, float]]) -> None:
    with conn.cursor() as cur:
        if replay:
            cur.executemany(
                "INSERT INTO replay (digest, expires_at) VALUES (%s, %s) "
                "ON CONFLICT (digest) DO UPDATE SET expires_at = "
                "GREATEST(replay.expires_at, EXCLUDED.expires_at)",
                replay,
            )
        if ledger:
            cur.executemany(
                "INSERT INTO resolved (ticket_responder, expires_at) VALUES (%s, %s) "
                "ON CONFLICT DO NOTHING",
                ledger,
            )
