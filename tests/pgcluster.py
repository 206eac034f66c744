"""A private PostgreSQL 15 cluster for the tests: initdb in a temporary folder, run as an
unprivileged user (PostgreSQL refuses to run as root), on a free loopback port, stopped at the
end. One cluster per test session; each test module gets a fresh database (CREATE DATABASE is
cheap)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "kms"  # the database superuser the cluster is initialised with


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    """A running private cluster: ``dsn(db)`` names a database on it."""

    folder: Path
    port: int
    os_user: str
    fsync: bool = False  # tests: off (nothing to protect); benchmarks: on, as in production
    extra: str = ""  # more server options, e.g. "-c shared_preload_libraries=pg_stat_statements"

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{db}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(a) for a in args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", self.os_user, "--", *cmd]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def start(self) -> None:
        opts = f"-k {self.folder} -c listen_addresses=127.0.0.1 -p {self.port}"
        if not self.fsync:
            opts += " -c fsync=off"
        if self.extra:
            opts += " " + self.extra
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts,
                  "-l", str(self.folder / "log"), "start", "-w", "-t", "60")

    def stop(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "stop", "-m", "fast", "-w",
                  check=False)

    def is_up(self) -> bool:
        try:
            with psycopg.connect(self.dsn(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def create_database(self, prefix: str = "t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name


def start_pg(folder: Path, fsync: bool = False, extra: str = "") -> PgServer:
    """initdb + pg_ctl start; the folder is made over to an unprivileged user first."""
    initdb = PG_BIN / "initdb"
    assert initdb.exists(), "PostgreSQL 15 is required (scripts/test-services.sh)"
    os_user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(folder, os_user, os_user)
    server = PgServer(folder, _free_port(), os_user, fsync, extra)
    server._run(str(initdb), "-D", str(server.data), "-A", "trust", "-U", PG_USER,
                "--no-sync")
    for attempt in range(3):
        try:
            server.start()
            break
        except AssertionError:
            if attempt == 2:
                raise
            server.port = _free_port()  # another suite took the port meanwhile
    deadline = time.monotonic() + 30
    while not server.is_up():
        assert time.monotonic() < deadline, (folder / "log").read_text()
        time.sleep(0.1)
    return server


@contextlib.contextmanager
def running_pg(fsync: bool = False, extra: str = "") -> Iterator[PgServer]:
    """A cluster in its own folder directly under the system temporary directory: the
    unprivileged cluster user must reach it, and pytest's own temporary tree is private to
    the user running the tests."""
    folder = Path(tempfile.mkdtemp(prefix="kms-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    try:
        server = start_pg(folder / "cluster", fsync, extra)
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
