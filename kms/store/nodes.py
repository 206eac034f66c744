"""Authorised intermediate nodes (RFC 6043 11.1: recorders, conference bridges, transcoders)
in the registry, on both backends.

A node has an identity (what its RESOLVE_INIT names in IDRpsk, or its certificate's
subjectAltName URI), a role, the token label of the PSK it shares with the KMS or its pinned
signing certificate, and its scope: identity patterns (the peer-trust globs of
``kms peer add --resolve-for``) for the initiators and responders whose calls it may obtain
keys for, and group identities (or patterns) whose calls it may join. Nothing is in scope by
default. Removing a node deletes its row (and the caller destroys its PSK in the same
transaction): it is refused from the next request on.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class NodeRole(StrEnum):
    RECORDER = "recorder"
    BRIDGE = "bridge"
    TRANSCODER = "transcoder"


class NodeError(Exception):
    """Bad node operation (one line, no secrets)."""


@dataclass(frozen=True)
class Node:
    identity: bytes
    role: NodeRole
    key_label: str | None  # its PSK in the token; None: a certificate node
    created_at: int
    initiators: tuple[str, ...] = ()
    responders: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    cert_pem: str | None = None  # pinned signing certificate(s) of a certificate node


def _patterns(what: str, patterns: Sequence[str]) -> str:
    if any(not p or "\n" in p or "\r" in p for p in patterns):
        raise NodeError(f"{what} patterns must be non-empty single lines")
    return "\n".join(patterns)


_COLUMNS = (
    "identity, role, key_label, created_at, initiators, responders, groups_in_scope, cert_pem"
)


class NodeTables:
    """Mixed into :class:`kms.store.registry.Registry` (and so the PostgreSQL registry)."""

    def _q(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        raise NotImplementedError

    def transaction(self) -> AbstractContextManager[None]:
        raise NotImplementedError

    def _identity_taken(self, identity: bytes) -> str | None:
        """What else already uses ``identity`` (endpoint, group, peer), if anything."""
        for table, column, kind in (
            ("endpoints", "identity", "an endpoint"),
            ("groups", "identity", "a group"),
            ("peers", "kms_id", "a peer KMS"),
        ):
            if self._q(f"SELECT 1 FROM {table} WHERE {column} = ?", (identity,)):  # noqa: S608
                return kind
        return None

    def add_node(
        self,
        identity: bytes,
        role: NodeRole,
        key_label: str | None,
        *,
        initiators: Sequence[str] = (),
        responders: Sequence[str] = (),
        groups: Sequence[str] = (),
        cert_pem: str | None = None,
    ) -> Node:
        """Register a node (call inside the transaction that creates its PSK): a PSK node
        (``key_label``) or a certificate node (``cert_pem``, pinned), exactly one of them."""
        if not identity or len(identity) > 0xFFFF:
            raise NodeError("a node identity is 1..65535 bytes")
        if (key_label is None) == (cert_pem is None):
            raise NodeError("a node has a PSK or a certificate (exactly one)")
        role = NodeRole(role)
        scope = (
            _patterns("initiator", initiators),
            _patterns("responder", responders),
            _patterns("group", groups),
        )
        with self.transaction():
            if self.find_node(identity) is not None:
                raise NodeError(f"node {identity.decode('utf-8', 'replace')} already exists")
            taken = self._identity_taken(identity)
            if taken is not None:
                raise NodeError(f"{identity.decode('utf-8', 'replace')} is already {taken}")
            now = int(time.time())
            self._q(
                f"INSERT INTO nodes ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (identity, role.value, key_label, now, *scope, cert_pem),
            )
        return Node(
            identity, role, key_label, now, tuple(initiators), tuple(responders), tuple(groups),
            cert_pem,
        )

    def find_node(self, identity: bytes) -> Node | None:
        rows = self._q(f"SELECT {_COLUMNS} FROM nodes WHERE identity = ?", (identity,))  # noqa: S608
        return _node(rows[0]) if rows else None

    def get_node(self, identity: bytes) -> Node:
        node = self.find_node(identity)
        if node is None:
            raise NodeError(f"unknown node {identity.decode('utf-8', 'replace')}")
        return node

    def list_nodes(self) -> list[Node]:
        return [_node(r) for r in self._q(f"SELECT {_COLUMNS} FROM nodes ORDER BY identity")]  # noqa: S608

    def remove_node(self, identity: bytes) -> Node:
        """Delete a node and its PSK versions (the caller destroys its PSKs in the same
        transaction: :meth:`psk_versions` lists the rotated ones before)."""
        with self.transaction():
            node = self.get_node(identity)
            self._q("DELETE FROM psk_versions WHERE identity = ?", (identity,))
            self._q("DELETE FROM nodes WHERE identity = ?", (identity,))
        return node


def _split(text: object) -> tuple[str, ...]:
    return tuple(x for x in str(text).split("\n") if x)


def _node(r: Any) -> Node:
    return Node(
        identity=bytes(r[0]),
        role=NodeRole(r[1]),
        key_label=None if r[2] is None else str(r[2]),
        created_at=int(r[3]),
        initiators=_split(r[4]),
        responders=_split(r[5]),
        groups=_split(r[6]),
        cert_pem=None if r[7] is None else str(r[7]),
    )


SQLITE_MIGRATION = """
    CREATE TABLE nodes (
        identity        BLOB    PRIMARY KEY,
        role            TEXT    NOT NULL CHECK (role IN ('recorder', 'bridge', 'transcoder')),
        key_label       TEXT    UNIQUE,
        created_at      INTEGER NOT NULL,
        initiators      TEXT    NOT NULL DEFAULT '',
        responders      TEXT    NOT NULL DEFAULT '',
        groups_in_scope TEXT    NOT NULL DEFAULT '',
        cert_pem        TEXT,
        CHECK ((key_label IS NULL) <> (cert_pem IS NULL))
    );
    """

PG_MIGRATION = """
    CREATE TABLE nodes (
        identity        BYTEA   PRIMARY KEY,
        role            TEXT    NOT NULL CHECK (role IN ('recorder', 'bridge', 'transcoder')),
        key_label       TEXT    UNIQUE,
        created_at      BIGINT  NOT NULL,
        initiators      TEXT    NOT NULL DEFAULT '',
        responders      TEXT    NOT NULL DEFAULT '',
        groups_in_scope TEXT    NOT NULL DEFAULT '',
        cert_pem        TEXT,
        CHECK ((key_label IS NULL) <> (cert_pem IS NULL))
    );
    CREATE TRIGGER nodes_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
        ON nodes FOR EACH STATEMENT EXECUTE FUNCTION kms_registry_changed();
    """
