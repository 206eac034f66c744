"""The KMS registry: who may use the KMS and which token key belongs to whom.

An embedded SQLite database (``<home>/registry.sqlite3``) in WAL mode, so that several
processes (``kms serve`` workers, operator commands) can read while one writes. It holds
identities and key *labels* only: secrets live in the token and never in this file.

Identities (endpoints, groups, applications, peer KMSs) are stored and compared as exact
bytes, as MIKEY compares ID Data (docs/rfc-readings.md R8): no case folding, no URI normalisation.
``sip:Alice@example.org`` and ``sip:alice@example.org`` are two identities.

Schema changes are ordered migrations (:data:`MIGRATIONS`); ``PRAGMA user_version`` records
how many have been applied. They run inside one ``BEGIN IMMEDIATE`` transaction that
re-reads the version, so two processes opening a fresh file at once apply them only once.

Every method runs in its own transaction, or joins the one opened by
:meth:`Registry.transaction`; the latter lets a caller hold the write lock while it creates
or destroys the matching token object and roll the row back if the token step fails.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from kms.core.ports import StoreUnavailable
from kms.mikey.constants import IdType
from kms.store.nodes import SQLITE_MIGRATION as _NODES_MIGRATION
from kms.store.nodes import NodeTables
from kms.store.peer_versions import SQLITE_MIGRATION as _PEER_VERSIONS_MIGRATION
from kms.store.peer_versions import PeerVersionTables
from kms.store.psk_versions import SQLITE_MIGRATION as _PSK_VERSIONS_MIGRATION
from kms.store.psk_versions import PskVersionTables
from kms.store.revocations import SQLITE_MIGRATION as _REVOCATIONS_MIGRATION
from kms.store.revocations import RevocationTables
from kms.store.wal import enable_wal

REGISTRY_FILE = "registry.sqlite3"
BUSY_TIMEOUT_MS = 10_000
MAX_IDENTITY_LEN = 0xFFFF  # IDR ID len is a 16-bit field


class TpkState(StrEnum):
    """Lifecycle of a Ticket Protection Key version.

    current: protects new tickets (exactly one at a time once initialised);
    active: still resolves tickets issued under it;
    retired: its token object is destroyed; tickets under it can no longer be resolved.
    """

    CURRENT = "current"
    ACTIVE = "active"
    RETIRED = "retired"


class PeerAuth(StrEnum):
    PSK = "psk"
    CERT = "cert"


# ------------------------------------------------------------------------------------------
# errors


class RegistryError(Exception):
    """Base of registry failures; messages are one line and never contain secrets."""


class RegistryUnavailable(RegistryError, StoreUnavailable):
    """The database cannot be opened or used (missing file, locked too long, I/O error, a
    PostgreSQL server that cannot be reached)."""


class SchemaTooNew(RegistryError):
    """The file was migrated by a newer version of the software."""


class UnknownIdentity(RegistryError):
    """No endpoint with this identity."""


class UnknownMember(UnknownIdentity):
    """A group member that is not a registered endpoint."""


class DuplicateEndpoint(RegistryError):
    """An endpoint with this identity (or key label) already exists."""


class IdentityConflict(RegistryError):
    """The identity is already used by an object of another kind (group vs endpoint)."""


class UnknownGroup(RegistryError):
    """No group with this identity."""


class NotAMember(RegistryError):
    """Removing a member that is not in the group."""


class UnknownTpkVersion(RegistryError):
    """No TPK with this version."""


class DuplicateTpkVersion(RegistryError):
    """A TPK with this version (or label) already exists."""


class InvalidTpkState(RegistryError):
    """A TPK state change that is not allowed (retire the current TPK, revive a retired one)."""


class UnknownPeer(RegistryError):
    """No peer KMS with this id."""


class DuplicatePeer(RegistryError):
    """A peer KMS with this id already exists."""


class UnknownApplication(RegistryError):
    """No application with this identity."""


class DuplicateApplication(RegistryError):
    """The application identity is already authorised."""


# ------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class Endpoint:
    identity: bytes
    id_type: IdType
    key_label: str
    created_at: int
    enabled: bool = True


@dataclass(frozen=True)
class Group:
    identity: bytes
    members: tuple[bytes, ...]
    created_at: int


@dataclass(frozen=True)
class TpkVersion:
    version: int
    key_label: str
    state: TpkState
    created_at: int


@dataclass(frozen=True)
class Peer:
    kms_id: bytes
    address: str
    auth: PeerAuth
    key_label: str | None
    cert_pem: str | None
    ca_pem: str | None
    created_at: int
    resolve_for: tuple[str, ...] = ()
    rate_limit: float = 0.0
    deadline_ms: int = 2000
    send_version: int = 1  # the version of the shared key this KMS sends with (use-psk)


@dataclass(frozen=True)
class Application:
    identity: bytes
    created_at: int


def show_identity(identity: bytes) -> str:
    """Printable form of an identity for messages: UTF-8 if it is, else hex."""
    try:
        text = identity.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + identity.hex()
    if text.isprintable():
        return text if len(text) <= 200 else text[:197] + "..."
    return "0x" + identity.hex()


# ------------------------------------------------------------------------------------------
# schema

MIGRATIONS: Sequence[str] = (
    # 1: initial schema
    """
    CREATE TABLE endpoints (
        id          INTEGER PRIMARY KEY,
        identity    BLOB    NOT NULL UNIQUE,
        id_type     INTEGER NOT NULL CHECK (id_type IN (0, 1, 2)),
        key_label   TEXT    NOT NULL UNIQUE,
        created_at  INTEGER NOT NULL,
        enabled     INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1))
    );
    CREATE TABLE groups (
        id          INTEGER PRIMARY KEY,
        identity    BLOB    NOT NULL UNIQUE,
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE group_members (
        group_id    INTEGER NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
        member_id   INTEGER NOT NULL REFERENCES endpoints(id) ON DELETE CASCADE,
        PRIMARY KEY (group_id, member_id)
    );
    CREATE INDEX group_members_by_member ON group_members(member_id);
    CREATE TABLE applications (
        id          INTEGER PRIMARY KEY,
        identity    BLOB    NOT NULL UNIQUE,
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE peers (
        id          INTEGER PRIMARY KEY,
        kms_id      BLOB    NOT NULL UNIQUE,
        address     TEXT    NOT NULL,
        auth        TEXT    NOT NULL CHECK (auth IN ('psk', 'cert')),
        key_label   TEXT,
        cert_pem    TEXT,
        ca_pem      TEXT,
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE tpk_versions (
        version     INTEGER PRIMARY KEY CHECK (version > 0),
        key_label   TEXT    NOT NULL UNIQUE,
        state       TEXT    NOT NULL CHECK (state IN ('current', 'active', 'retired')),
        created_at  INTEGER NOT NULL
    );
    -- at most one current TPK, enforced by the database rather than by every caller
    CREATE UNIQUE INDEX tpk_one_current ON tpk_versions(state) WHERE state = 'current';
    """,
    # 2: federation trust (RFC 6043 9): which identities a peer KMS may resolve tickets for
    # (glob patterns, one per line, e.g. "sip:*@b.example.org"; empty: none), its quota in
    # resolves per second (0: unlimited) and the deadline for calls to it.
    """
    ALTER TABLE peers ADD COLUMN resolve_for TEXT NOT NULL DEFAULT '';
    ALTER TABLE peers ADD COLUMN rate_limit REAL NOT NULL DEFAULT 0;
    ALTER TABLE peers ADD COLUMN deadline_ms INTEGER NOT NULL DEFAULT 2000;
    """,
    # 3: revocation (suspended endpoints, revoked tickets, requested-before times); see
    # kms.store.revocations
    _REVOCATIONS_MIGRATION,
    # 4: PSK versions named by IDRpsk (rotation without downtime); see kms.store.psk_versions
    _PSK_VERSIONS_MIGRATION,
    # 5: authorised intermediate nodes (RFC 6043 11.1); see kms.store.nodes
    _NODES_MIGRATION,
    # 6: which version of a peer KMS's shared key this KMS sends with; see
    # kms.store.peer_versions
    _PEER_VERSIONS_MIGRATION,
)


def _now() -> int:
    return int(time.time())


class Registry(RevocationTables, PskVersionTables, NodeTables, PeerVersionTables):
    """Typed access to the registry database. One instance per process/thread."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._depth = 0

    # --- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, *, create: bool = False) -> Registry:
        """Open (and migrate) the registry; with ``create`` a missing file is created.

        Without ``create`` a missing file is an error: for a home that has kms.toml, a
        vanished registry means lost data, which must not be papered over with a new one.
        """
        if not create and not path.exists():
            raise RegistryUnavailable(f"registry {path} does not exist")
        try:
            # isolation_level=None: no implicit transactions; we issue BEGIN IMMEDIATE
            # ourselves so that writers take the lock up front instead of failing to upgrade.
            conn = sqlite3.connect(
                str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise RegistryUnavailable(f"registry {path}: {exc}") from None
        reg = cls(conn, path)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys = ON")
            if enable_wal(conn, BUSY_TIMEOUT_MS / 1000) != "wal":
                raise RegistryUnavailable(f"registry {path}: cannot enable WAL mode")
            # NORMAL is durable across application crashes in WAL mode; it only risks the
            # last commits on power loss, and a token object without its row is recoverable.
            conn.execute("PRAGMA synchronous = NORMAL")
            reg.migrate()
        except sqlite3.Error as exc:
            conn.close()
            raise RegistryUnavailable(f"registry {path}: {exc}") from None
        except BaseException:
            conn.close()
            raise
        return reg

    def migrate(self) -> int:
        """Apply pending migrations; returns the schema version. Idempotent."""
        with self.transaction():
            version = self.schema_version()
            if version > len(MIGRATIONS):
                raise SchemaTooNew(
                    f"registry {self.path} has schema version {version}, newer than this "
                    f"software ({len(MIGRATIONS)})"
                )
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in _statements(script):
                    self._conn.execute(statement)
                # PRAGMA user_version is transactional: it rolls back with the migration.
                self._conn.execute(f"PRAGMA user_version = {number}")
        return len(MIGRATIONS)

    def schema_version(self) -> int:
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def data_version(self) -> int | None:
        """A number that changes when another connection commits to this database (SQLite
        ``PRAGMA data_version``); None where that is not known (PostgreSQL)."""
        return int(self._q("PRAGMA data_version")[0][0])

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transactions -------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction (BEGIN IMMEDIATE); nested uses join the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise RegistryUnavailable(f"registry {self.path}: {exc}") from None
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            self._conn.execute("ROLLBACK")
            raise
        self._depth = 0
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise RegistryUnavailable(f"registry {self.path}: commit failed: {exc}") from None

    def _q(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.IntegrityError as exc:
            # Callers check constraints first inside the write transaction, so this means a
            # schema constraint caught something the checks missed.
            raise RegistryError(f"registry constraint violated: {exc}") from None
        except sqlite3.Error as exc:
            raise RegistryUnavailable(f"registry {self.path}: {exc}") from None

    # --- endpoints ----------------------------------------------------------------------
    def add_endpoint(
        self, identity: bytes, id_type: IdType, key_label: str, *, enabled: bool = True
    ) -> Endpoint:
        _check_identity(identity)
        with self.transaction():
            if self.find_endpoint(identity) is not None:
                raise DuplicateEndpoint(f"endpoint {show_identity(identity)} already exists")
            if self._group_id(identity) is not None:
                raise IdentityConflict(f"{show_identity(identity)} is already a group")
            if self.find_node(identity) is not None:
                raise IdentityConflict(f"{show_identity(identity)} is already a node")
            if self._q("SELECT 1 FROM endpoints WHERE key_label = ?", (key_label,)):
                raise DuplicateEndpoint(f"key label {key_label} is already used by an endpoint")
            now = _now()
            self._q(
                "INSERT INTO endpoints (identity, id_type, key_label, created_at, enabled) "
                "VALUES (?, ?, ?, ?, ?)",
                (identity, int(id_type), key_label, now, int(enabled)),
            )
        return Endpoint(identity, IdType(id_type), key_label, now, enabled)

    def remove_endpoint(self, identity: bytes) -> Endpoint:
        """Remove an endpoint and its group memberships; returns what was removed."""
        with self.transaction():
            ep = self.get_endpoint(identity)
            # group_members rows go with it (ON DELETE CASCADE); PSK versions explicitly
            self._q("DELETE FROM psk_versions WHERE identity = ?", (identity,))
            self._q("DELETE FROM endpoints WHERE identity = ?", (identity,))
        return ep

    def find_endpoint(self, identity: bytes) -> Endpoint | None:
        rows = self._q(
            "SELECT identity, id_type, key_label, created_at, enabled FROM endpoints "
            "WHERE identity = ?",
            (identity,),
        )
        return _endpoint(rows[0]) if rows else None

    def get_endpoint(self, identity: bytes) -> Endpoint:
        ep = self.find_endpoint(identity)
        if ep is None:
            raise UnknownIdentity(f"unknown endpoint {show_identity(identity)}")
        return ep

    def list_endpoints(self) -> list[Endpoint]:
        rows = self._q(
            "SELECT identity, id_type, key_label, created_at, enabled FROM endpoints "
            "ORDER BY identity"
        )
        return [_endpoint(r) for r in rows]

    def set_endpoint_enabled(self, identity: bytes, enabled: bool) -> Endpoint:
        with self.transaction():
            self.get_endpoint(identity)
            self._q(
                "UPDATE endpoints SET enabled = ? WHERE identity = ?", (int(enabled), identity)
            )
            return self.get_endpoint(identity)

    # --- groups -------------------------------------------------------------------------
    def _group_id(self, group: bytes) -> int | None:
        rows = self._q("SELECT id FROM groups WHERE identity = ?", (group,))
        return int(rows[0][0]) if rows else None

    def _endpoint_id(self, identity: bytes) -> int:
        rows = self._q("SELECT id FROM endpoints WHERE identity = ?", (identity,))
        if not rows:
            raise UnknownMember(f"unknown group member {show_identity(identity)}")
        return int(rows[0][0])

    def add_group(self, group: bytes, members: Iterable[bytes]) -> Group:
        """Create the group, or add members to an existing one. Members must be endpoints."""
        _check_identity(group)
        members = list(members)
        with self.transaction():
            if self.find_endpoint(group) is not None:
                raise IdentityConflict(f"{show_identity(group)} is already an endpoint")
            member_ids = [self._endpoint_id(m) for m in members]  # all validated first
            gid = self._group_id(group)
            if gid is None:
                self._q(
                    "INSERT INTO groups (identity, created_at) VALUES (?, ?)", (group, _now())
                )
                gid = self._group_id(group)
            for mid in member_ids:
                self._q(
                    "INSERT OR IGNORE INTO group_members (group_id, member_id) VALUES (?, ?)",
                    (gid, mid),
                )
            return self.get_group(group)

    def remove_group(self, group: bytes) -> Group:
        with self.transaction():
            g = self.get_group(group)
            self._q("DELETE FROM groups WHERE identity = ?", (group,))
        return g

    def remove_group_members(self, group: bytes, members: Iterable[bytes]) -> Group:
        """Remove some members; the group stays (possibly empty). All or nothing."""
        members = list(members)
        with self.transaction():
            gid = self._group_id(group)
            if gid is None:
                raise UnknownGroup(f"unknown group {show_identity(group)}")
            current = set(self.group_members(group))
            for m in members:
                if m not in current:
                    if self.find_endpoint(m) is None:
                        raise UnknownMember(f"unknown group member {show_identity(m)}")
                    raise NotAMember(
                        f"{show_identity(m)} is not a member of {show_identity(group)}"
                    )
            for m in members:
                self._q(
                    "DELETE FROM group_members WHERE group_id = ? AND member_id = "
                    "(SELECT id FROM endpoints WHERE identity = ?)",
                    (gid, m),
                )
            return self.get_group(group)

    def find_group(self, group: bytes) -> Group | None:
        rows = self._q("SELECT created_at FROM groups WHERE identity = ?", (group,))
        if not rows:
            return None
        return Group(group, tuple(self.group_members(group)), int(rows[0][0]))

    def get_group(self, group: bytes) -> Group:
        g = self.find_group(group)
        if g is None:
            raise UnknownGroup(f"unknown group {show_identity(group)}")
        return g

    def group_members(self, group: bytes) -> list[bytes]:
        """Member identities, sorted; [] for an empty group; UnknownGroup if absent."""
        if self._group_id(group) is None:
            raise UnknownGroup(f"unknown group {show_identity(group)}")
        rows = self._q(
            "SELECT e.identity FROM group_members gm "
            "JOIN groups g ON g.id = gm.group_id JOIN endpoints e ON e.id = gm.member_id "
            "WHERE g.identity = ? ORDER BY e.identity",
            (group,),
        )
        return [bytes(r[0]) for r in rows]

    def groups_of(self, member: bytes) -> list[bytes]:
        """Groups an endpoint belongs to, sorted ([] for a non-member or unknown identity)."""
        rows = self._q(
            "SELECT g.identity FROM group_members gm "
            "JOIN groups g ON g.id = gm.group_id JOIN endpoints e ON e.id = gm.member_id "
            "WHERE e.identity = ? ORDER BY g.identity",
            (member,),
        )
        return [bytes(r[0]) for r in rows]

    def is_member(self, group: bytes, member: bytes) -> bool:
        """Whether ``member`` is in ``group`` now (one indexed query; False if either is
        unknown). Not cached: a removed member is refused at once."""
        rows = self._q(
            "SELECT 1 FROM group_members gm "
            "JOIN groups g ON g.id = gm.group_id JOIN endpoints e ON e.id = gm.member_id "
            "WHERE g.identity = ? AND e.identity = ?",
            (group, member),
        )
        return bool(rows)

    def list_groups(self) -> list[Group]:
        rows = self._q("SELECT identity FROM groups ORDER BY identity")
        return [self.get_group(bytes(r[0])) for r in rows]

    # --- applications (IDRapp) ------------------------------------------------------------
    def add_application(self, identity: bytes) -> Application:
        _check_identity(identity)
        with self.transaction():
            if self._q("SELECT 1 FROM applications WHERE identity = ?", (identity,)):
                raise DuplicateApplication(
                    f"application {show_identity(identity)} is already authorised"
                )
            now = _now()
            self._q(
                "INSERT INTO applications (identity, created_at) VALUES (?, ?)", (identity, now)
            )
        return Application(identity, now)

    def remove_application(self, identity: bytes) -> None:
        with self.transaction():
            if not self._q("SELECT 1 FROM applications WHERE identity = ?", (identity,)):
                raise UnknownApplication(f"unknown application {show_identity(identity)}")
            self._q("DELETE FROM applications WHERE identity = ?", (identity,))

    def is_application(self, identity: bytes) -> bool:
        return bool(self._q("SELECT 1 FROM applications WHERE identity = ?", (identity,)))

    def list_applications(self) -> list[Application]:
        rows = self._q("SELECT identity, created_at FROM applications ORDER BY identity")
        return [Application(bytes(r[0]), int(r[1])) for r in rows]

    # --- TPK versions -------------------------------------------------------------------
    def tpk_current(self) -> TpkVersion | None:
        """The TPK protecting new tickets, or None before ``kms init`` created one."""
        rows = self._q(
            "SELECT version, key_label, state, created_at FROM tpk_versions "
            "WHERE state = 'current'"
        )
        return _tpk(rows[0]) if rows else None

    def tpk_versions(self) -> list[TpkVersion]:
        rows = self._q(
            "SELECT version, key_label, state, created_at FROM tpk_versions ORDER BY version"
        )
        return [_tpk(r) for r in rows]

    def get_tpk(self, version: int) -> TpkVersion:
        rows = self._q(
            "SELECT version, key_label, state, created_at FROM tpk_versions WHERE version = ?",
            (version,),
        )
        if not rows:
            raise UnknownTpkVersion(f"unknown TPK version {version}")
        return _tpk(rows[0])

    def next_tpk_version(self) -> int:
        """One more than any version ever recorded (retired ones included: never reused)."""
        rows = self._q("SELECT COALESCE(MAX(version), 0) FROM tpk_versions")
        return int(rows[0][0]) + 1

    def add_tpk_version(
        self, version: int, key_label: str, state: TpkState = TpkState.CURRENT
    ) -> TpkVersion:
        """Record a TPK; a new current one demotes the previous current one to active."""
        state = TpkState(state)
        if version <= 0:
            raise UnknownTpkVersion(f"TPK version must be positive, got {version}")
        with self.transaction():
            if self._q("SELECT 1 FROM tpk_versions WHERE version = ?", (version,)):
                raise DuplicateTpkVersion(f"TPK version {version} already exists")
            if self._q("SELECT 1 FROM tpk_versions WHERE key_label = ?", (key_label,)):
                raise DuplicateTpkVersion(f"key label {key_label} is already used by a TPK")
            if state is TpkState.CURRENT:
                self._q("UPDATE tpk_versions SET state = 'active' WHERE state = 'current'")
            now = _now()
            self._q(
                "INSERT INTO tpk_versions (version, key_label, state, created_at) "
                "VALUES (?, ?, ?, ?)",
                (version, key_label, state.value, now),
            )
        return TpkVersion(version, key_label, state, now)

    def set_tpk_state(self, version: int, state: TpkState) -> TpkVersion:
        """Change a TPK's state.

        Making one current demotes the previous current to active. The current TPK cannot
        be retired directly (rotate first), and a retired TPK cannot come back: its token
        object is gone.
        """
        state = TpkState(state)
        with self.transaction():
            tpk = self.get_tpk(version)
            if tpk.state is state:
                return tpk
            if tpk.state is TpkState.RETIRED:
                raise InvalidTpkState(f"TPK version {version} is retired (its key is destroyed)")
            if tpk.state is TpkState.CURRENT:
                raise InvalidTpkState(
                    f"TPK version {version} is the current TPK; rotate to a new one first"
                )
            if state is TpkState.CURRENT:
                self._q("UPDATE tpk_versions SET state = 'active' WHERE state = 'current'")
            self._q(
                "UPDATE tpk_versions SET state = ? WHERE version = ?", (state.value, version)
            )
            return self.get_tpk(version)

    # --- peers (federation) ---------------------------------------------------------------
    def add_peer(
        self,
        kms_id: bytes,
        address: str,
        auth: PeerAuth,
        *,
        key_label: str | None = None,
        cert_pem: str | None = None,
        ca_pem: str | None = None,
        resolve_for: Sequence[str] = (),
        rate_limit: float = 0.0,
        deadline_ms: int = 2000,
    ) -> Peer:
        _check_identity(kms_id)
        if any("\n" in p or not p for p in resolve_for):
            raise RegistryError("resolve-for patterns must be non-empty single lines")
        if rate_limit < 0 or deadline_ms <= 0:
            raise RegistryError("peer rate limit must be >= 0 and deadline > 0")
        auth = PeerAuth(auth)
        if auth is PeerAuth.PSK and key_label is None:
            raise RegistryError("a psk peer needs a key label")
        if auth is PeerAuth.CERT and cert_pem is None and ca_pem is None:
            raise RegistryError("a cert peer needs cert_pem or ca_pem")
        with self.transaction():
            if self._q("SELECT 1 FROM peers WHERE kms_id = ?", (kms_id,)):
                raise DuplicatePeer(f"peer KMS {show_identity(kms_id)} already exists")
            now = _now()
            self._q(
                "INSERT INTO peers (kms_id, address, auth, key_label, cert_pem, ca_pem, "
                "created_at, resolve_for, rate_limit, deadline_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    kms_id,
                    address,
                    auth.value,
                    key_label,
                    cert_pem,
                    ca_pem,
                    now,
                    "\n".join(resolve_for),
                    float(rate_limit),
                    int(deadline_ms),
                ),
            )
        return Peer(
            kms_id,
            address,
            auth,
            key_label,
            cert_pem,
            ca_pem,
            now,
            tuple(resolve_for),
            float(rate_limit),
            int(deadline_ms),
        )

    def get_peer(self, kms_id: bytes) -> Peer:
        rows = self._q(
            "SELECT kms_id, address, auth, key_label, cert_pem, ca_pem, created_at, resolve_for, "
            "rate_limit, deadline_ms, send_version FROM peers "
            "WHERE kms_id = ?",
            (kms_id,),
        )
        if not rows:
            raise UnknownPeer(f"unknown peer KMS {show_identity(kms_id)}")
        return _peer(rows[0])

    def list_peers(self) -> list[Peer]:
        rows = self._q(
            "SELECT kms_id, address, auth, key_label, cert_pem, ca_pem, created_at, resolve_for, "
            "rate_limit, deadline_ms, send_version FROM peers "
            "ORDER BY kms_id"
        )
        return [_peer(r) for r in rows]

    def remove_peer(self, kms_id: bytes) -> Peer:
        with self.transaction():
            peer = self.get_peer(kms_id)
            self._q("DELETE FROM psk_versions WHERE identity = ?", (kms_id,))
            self._q("DELETE FROM peers WHERE kms_id = ?", (kms_id,))
        return peer

    # --- everything that names a token object ------------------------------------------------
    def key_owners(self) -> dict[str, str]:
        """label -> human description of what uses it (for ``kms keys list``)."""
        owners: dict[str, str] = {}
        for ep in self.list_endpoints():
            owners[ep.key_label] = f"endpoint {show_identity(ep.identity)}"
        for tpk in self.tpk_versions():
            owners[tpk.key_label] = f"TPK v{tpk.version} ({tpk.state.value})"
        kinds: dict[bytes, str] = {}
        for peer in self.list_peers():
            if peer.key_label:
                owners[peer.key_label] = f"peer {show_identity(peer.kms_id)}"
                kinds[peer.kms_id] = "peer"
        for node in self.list_nodes():
            kinds[node.identity] = f"{node.role.value} node"
            if node.key_label is not None:
                who = show_identity(node.identity)
                owners[node.key_label] = f"{node.role.value} node {who}"
        for row in self._q("SELECT identity, version, key_label, retired FROM psk_versions"):
            if row[3]:  # a retired PSK version: its token object is destroyed
                owners.pop(str(row[2]), None)
            else:
                owner = bytes(row[0])
                kind = kinds.get(owner, "endpoint")
                owners[str(row[2])] = f"{kind} {show_identity(owner)} PSK v{int(row[1])}"
        return owners


def _statements(script: str) -> list[str]:
    # Executed one by one (not executescript, which COMMITs first and would break the
    # all-or-nothing migration transaction).
    out = []
    buf = ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--"):
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out


def _check_identity(identity: bytes) -> None:
    if not isinstance(identity, bytes):
        raise TypeError("identities are bytes")
    if not identity:
        raise RegistryError("identity must not be empty")
    if len(identity) > MAX_IDENTITY_LEN:
        raise RegistryError(f"identity longer than {MAX_IDENTITY_LEN} bytes")


def _endpoint(r: Any) -> Endpoint:
    return Endpoint(
        identity=bytes(r[0]),
        id_type=IdType(r[1]),
        key_label=str(r[2]),
        created_at=int(r[3]),
        enabled=bool(r[4]),
    )


def _tpk(r: Any) -> TpkVersion:
    return TpkVersion(int(r[0]), str(r[1]), TpkState(r[2]), int(r[3]))


def _peer(r: Any) -> Peer:
    return Peer(
        kms_id=bytes(r[0]),
        address=str(r[1]),
        auth=PeerAuth(r[2]),
        key_label=None if r[3] is None else str(r[3]),
        cert_pem=None if r[4] is None else str(r[4]),
        ca_pem=None if r[5] is None else str(r[5]),
        created_at=int(r[6]),
        resolve_for=tuple(x for x in str(r[7]).split("\n") if x),
        rate_limit=float(r[8]),
        deadline_ms=int(r[9]),
        send_version=int(r[10]),
    )
