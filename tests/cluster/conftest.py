"""Cluster mode, end to end: ONE KMS home made with the operator CLI, moved to PostgreSQL with
`kms store migrate`, two more homes made with `kms store replica`, and three `kms serve`
replicas on one SoftHSM2 token directory and one (private) PostgreSQL cluster. One cluster
per test module; tests use their own identities where rates or replays could interfere."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hsm.software import SoftwareKeyStore
from kms.endpoint.client import KmsClient
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import Initiator
from kms.endpoint.responder import Responder
from kms.mikey.constants import IdType
from tests.e2e.harness import (
    ALICE,
    BOB,
    CAROL,
    ERIN,
    FRANK,
    GRACE,
    KMS_ID,
    PSKS,
    TEAM,
    ServeProcess,
    free_port,
    make_home,
    run_kms,
    set_policy,
)
from tests.pgcluster import PgServer

ENDPOINTS = {k: PSKS[k] for k in (ALICE, BOB, CAROL, ERIN, FRANK, GRACE)}
RATE = 20  # [policy] rate_limit_per_s of the cluster (burst 40)


@dataclass
class Cluster:
    homes: list[Path]
    dsn: str
    pg: PgServer
    serves: list[ServeProcess | None] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    ks: SoftwareKeyStore = field(default_factory=SoftwareKeyStore)
    _clients: list[KmsClient] = field(default_factory=list)

    def target(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i]}"

    @property
    def targets(self) -> list[str]:
        return [self.target(i) for i in range(len(self.homes))]

    def client(self, i: int | None = None, timeout: float = 10.0) -> KmsClient:
        """A client of replica ``i``, or of all replicas (round robin, retries)."""
        c = KmsClient(self.targets if i is None else self.target(i), timeout=timeout)
        self._clients.append(c)
        return c

    def creds(self, who: bytes, psk: bytes | None = None) -> Credentials:
        return Credentials(who, ENDPOINTS.get(who, psk or b""), KMS_ID, IdType.URI)

    def initiator(self, who: bytes = ALICE) -> Initiator:
        return Initiator(self.creds(who), self.ks)

    def responder(self, who: bytes = BOB) -> Responder:
        return Responder(self.creds(who), self.ks)

    def start(self, i: int) -> ServeProcess:
        p = ServeProcess(self.homes[i], self.ports[i])
        self.serves[i] = p
        return p

    def kill(self, i: int) -> None:
        p = self.serves[i]
        if p is not None:
            p.kill()
            self.serves[i] = None

    def close(self) -> None:
        """Every replica stopped and every channel closed, even if one of them fails."""
        with contextlib.ExitStack() as stack:
            for p in self.serves:
                if p is not None:
                    stack.callback(p.kill)
                    if p.proc.poll() is None:
                        stack.callback(_terminate_quietly, p)
            for c in self._clients:
                stack.callback(c.close)
            self._clients.clear()


def _terminate_quietly(p: ServeProcess) -> None:
    with contextlib.suppress(Exception):  # the kill that follows makes sure
        p.terminate()


def eventually(check: object, timeout: float = 2.0, what: str = "") -> float:
    """Poll ``check()`` until it returns True; returns how long it took (s)."""
    assert callable(check)
    t0 = time.monotonic()
    while True:
        if check():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, pg_server: PgServer) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    home1 = make_home(tmp / "home1", ENDPOINTS, {TEAM: (BOB, CAROL)})
    set_policy(home1, rate_limit_per_s=RATE)
    dsn = pg_server.dsn(pg_server.create_database("cluster"))
    out = run_kms(home1, "store", "migrate", dsn).stdout
    assert "moved 6 endpoints, 1 groups (2 memberships)" in out, out
    homes = [home1]
    for n in (2, 3):
        run_kms(tmp / f"home{n}", "store", "replica", str(home1))
        homes.append(tmp / f"home{n}")
    c = Cluster(homes, dsn, pg_server, [None] * 3, [free_port() for _ in homes])
    try:
        procs = [c.start(i) for i in range(3)]
        for p in procs:
            p.wait_ready(60)
        yield c
    finally:
        c.close()
