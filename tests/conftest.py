"""Session-wide fixtures shared by several test folders.

``ock_token``: openCryptoki's soft token, held under a machine-wide lock and reset for each
test module that uses it (it is machine-global state; see tests/token_modules.py).
``pg_server``: one private PostgreSQL cluster for the session.
``world``: a composed KMS on a SoftHSM2 token for in-process exchanges (tests/server/world.py);
tests/core overrides it with the core on the software key store and in-memory ports.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pgcluster import PgServer, running_pg
from tests.server.world import World, make_world
from tests.token_modules import OckToken, opencryptoki_token


@pytest.fixture(scope="module")
def ock_token() -> Iterator[OckToken]:
    """openCryptoki's soft token for the module that uses it: the machine-wide lock is held,
    and the token freshly reset, only from the module's first use to its end, so another
    test run on this machine waits for one module, not for this whole session."""
    with opencryptoki_token() as token:
        yield token


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


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """A KMS home on a SoftHSM2 token, composed as `kms serve` composes it (see
    tests/server/world.py); tests/core overrides it with the token-free core world."""
    yield from make_world(tmp_path / "home")
