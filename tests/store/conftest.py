"""Fixtures of the registry's contract tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kms.store.pg import PgDatabase, PgSettings
from kms.store.pg_registry import PgRegistry
from kms.store.registry import Registry


@pytest.fixture(params=["sqlite", "postgresql"])
def new_registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    """An empty registry at the current schema, once on SQLite and once on PostgreSQL: the
    same contract, both implementations."""
    if request.param == "sqlite":
        r = Registry.open(tmp_path / "registry.sqlite3", create=True)
    else:
        db = PgDatabase(PgSettings(dsn=request.getfixturevalue("pg_dsn")))
        r = PgRegistry(db, owns_db=True)
        r.migrate()
    yield r
    r.close()
