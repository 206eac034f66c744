"""Session-wide fixtures shared by several test folders."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pgcluster import PgServer, running_pg


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One private PostgreSQL 15 cluster for the whole session (about 1-2 s to start);
    tests take a fresh database on it with ``pg_server.create_database()``."""
    with running_pg() as server:
        yield server


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> str:
    """A DSN naming a fresh, empty database on the session's cluster."""
    return pg_server.dsn(pg_server.create_database())
