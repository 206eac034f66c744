"""PostgreSQL's high availability is the operator's; the KMS must work with it: a DSN listing
a standby and a primary with target_session_attrs=read-write finds the primary, and after a
failover (primary stopped, standby promoted) the same pool reconnects to the new primary
without a restart. Nothing the old primary committed (and streamed) is lost."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kms.core.ports import StoreUnavailable
from kms.store.pg import PgDatabase, PgSettings
from kms.store.pg_state import PgReplayCache
from tests.pgcluster import PG_BIN, PG_USER, PgServer, _free_port

T0 = 1_800_000_000.0


def digest(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "big")).digest()


@pytest.fixture
def standby(pg_server: PgServer) -> Iterator[PgServer]:
    """A streaming standby of the session's cluster (pg_basebackup -R)."""
    folder = Path(tempfile.mkdtemp(prefix="kms-pg-standby-"))
    shutil.chown(folder, pg_server.os_user, pg_server.os_user)
    s = PgServer(folder / "cluster", _free_port(), pg_server.os_user)
    s.folder.mkdir(mode=0o700)
    shutil.chown(s.folder, pg_server.os_user, pg_server.os_user)
    s._run(str(PG_BIN / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(pg_server.port),
           "-U", PG_USER, "-D", str(s.data), "-R", "-X", "stream", "--no-sync", "--checkpoint=fast")
    s.start()
    try:
        yield s
    finally:
        s.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_failover_to_a_promoted_standby(pg_server: PgServer, standby: PgServer) -> None:
    name = pg_server.create_database("failover")
    dsn = (f"postgresql://{PG_USER}@127.0.0.1:{standby.port},127.0.0.1:{pg_server.port}/"
           f"{name}?target_session_attrs=read-write")
    db = PgDatabase(PgSettings(dsn=dsn, acquire_timeout_s=1.0, connect_timeout_s=2))
    promoted = False
    try:
        db.migrate()  # on the primary (the standby is read-only)
        cache = PgReplayCache(db)
        assert all(cache.check_and_store(digest(i), T0 + 240, T0) for i in range(20))
        time.sleep(0.5)  # streamed to the standby
        pg_server.stop()
        standby._run(str(PG_BIN / "pg_ctl"), "-D", str(standby.data), "promote", "-w")
        promoted = True
        # The calls on the old primary's connections fail (UNAVAILABLE), then the pool
        # reconnects to the new primary: no restart.
        deadline = time.monotonic() + 30
        while True:
            try:
                ok = cache.check_and_store(digest(100), T0 + 240, T0)
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "no reconnection to the new primary"
                time.sleep(0.2)
        assert ok
        # What the old primary accepted is still there: replays stay refused.
        assert not any(cache.check_and_store(digest(i), T0 + 240, T0 + 1) for i in range(20))
    finally:
        db.close()
        if promoted or not pg_server.is_up():
            pg_server.start()
