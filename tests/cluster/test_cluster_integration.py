"""Cluster mode with the observability and hardening parts: replicas on one PostgreSQL
database and one SoftHSM2 token, started AT ONCE on a token that has no dummy PSK yet.

* Exactly one dummy PSK object is created in the shared token (the replicas serialise its
  creation with a PostgreSQL advisory lock), and every replica answers a registered and an
  unknown identity identically.
* ``/metrics`` of a replica (one process, and a supervisor with two workers) shows the TPK
  versions and registry sizes from PostgreSQL, and changes made through another replica's
  CLI.
* ``kms status`` against a replica on PostgreSQL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from kms.endpoint.client import KmsClient, KmsRefused
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DesiredPolicy, Initiator
from kms.home.layout import DUMMY_PSK_LABEL
from kms.mikey.constants import DataType, IdType
from kms.mikey.message import Message
from kms.mikey.payloads import Error, Verification
from tests.e2e.harness import (
    ALICE,
    BOB,
    CAROL,
    KMS_ID,
    PSKS,
    ServeProcess,
    free_port,
    make_home,
    run_kms,
)
from tests.observability.helpers import samples, scrape, value
from tests.pgcluster import PgServer

ENDPOINTS = {k: PSKS[k] for k in (ALICE, BOB, CAROL)}
UNKNOWN = b"sip:nobody@example.org"
REPLICAS = 3
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Replicas:
    homes: list[Path]
    serves: list[ServeProcess]
    metrics_ports: list[int]
    token_home: Path


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, pg_server: PgServer) -> Iterator[Replicas]:
    assert shutil.which("pkcs11-tool"), "pkcs11-tool is required (Debian package opensc)"
    tmp = tmp_path_factory.mktemp("cluster-int")
    home1 = make_home(tmp / "home1", ENDPOINTS, {})
    dsn = pg_server.dsn(pg_server.create_database("clint"))
    run_kms(home1, "store", "migrate", dsn)
    homes = [home1]
    for n in range(2, REPLICAS + 1):
        run_kms(tmp / f"home{n}", "store", "replica", str(home1))
        homes.append(tmp / f"home{n}")
    assert dummy_objects(home1) == 0  # nothing has served yet: no dummy PSK
    ports = [free_port() for _ in homes]
    # Replica 0 alone; replica 1 with two workers (its supervisor serves /metrics); all
    # started at once, before any waits for another.
    extra: list[list[str]] = [[], ["--workers", "2"]] + [[] for _ in homes[2:]]
    serves: list[ServeProcess] = []
    try:
        for h, p, x in zip(homes, ports, extra, strict=True):
            serves.append(ServeProcess(h, free_port(), "--metrics-listen", f"127.0.0.1:{p}", *x))
        for s in serves:
            s.wait_ready(90)
        yield Replicas(homes, serves, ports, home1)
    finally:
        for s in serves:
            try:
                if s.proc.poll() is None:
                    s.terminate()
            finally:
                s.kill()


def pkcs11_tool(home: Path, *args: str) -> str:
    conf = (home / "token" / "softhsm2.conf").resolve()
    pin = (home / "token" / "pin").read_text().strip()
    out = subprocess.run(
        ["pkcs11-tool", "--module", "/usr/lib/softhsm/libsofthsm2.so", "--token-label", "kms",
         "--login", "--pin", pin, *args],
        capture_output=True, text=True, timeout=60, check=True,
        env={"SOFTHSM2_CONF": str(conf), "PATH": "/usr/bin:/bin"},
    )
    return out.stdout


def dummy_objects(home: Path) -> int:
    """Objects labelled with the dummy PSK's label in the token (pkcs11-tool, not the KMS)."""
    listing = pkcs11_tool(home, "--list-objects")
    return len(re.findall(rf"label:\s+{re.escape(DUMMY_PSK_LABEL)}\s*$", listing, re.MULTILINE))


def forged(who: bytes, sent: float) -> bytes:
    """A REQUEST_INIT_PSK whose MAC cannot verify (a PSK the sender does not have)."""
    from hsm.software import SoftwareKeyStore

    ini = Initiator(Credentials(who, bytes(range(16)), KMS_ID, IdType.URI), SoftwareKeyStore())
    wire, _ = ini.request_ticket(DesiredPolicy(responders=(BOB,)), sent)
    return wire


def answer(target: str, wire: bytes) -> tuple[grpc.StatusCode, str, int, bool]:
    client = KmsClient(target, timeout=10, options=OWN_CONNECTION)
    try:
        with pytest.raises(KmsRefused) as info:
            client.request_ticket(wire)
    finally:
        client.close()
    r = info.value
    assert r.error_message is not None
    err = Message.decode(r.error_message)
    assert err.data_type == DataType.ERROR
    return r.code, r.detail, err.one(Error).error_no, err.first(Verification) is not None


def test_replicas_started_at_once_create_one_dummy_psk(replicas: Replicas) -> None:
    assert dummy_objects(replicas.token_home) == 1
    now = time.time()
    for serve in replicas.serves:
        registered = answer(serve.target, forged(CAROL, now))
        unknown = answer(serve.target, forged(UNKNOWN, now))
        assert registered == unknown, (serve.target, registered, unknown)
        assert registered == (grpc.StatusCode.UNAUTHENTICATED, "authentication failed", 0, False)
    for home in replicas.homes:  # the real reasons are audited apart
        lines = (home / "audit.log").read_text().splitlines()
        reasons = {json.loads(x).get("reason") for x in lines}
        assert {"unknown identity", "MAC verification failed"} <= reasons, home


def registry_view(port: int) -> tuple[float, float, float]:
    s = samples(scrape(port))
    assert value(s, "kms_registry_up") == 1
    return (
        value(s, "kms_registry_entries", kind="endpoints"),
        value(s, "kms_tpk_versions", state="current")
        + value(s, "kms_tpk_versions", state="active"),
        value(s, "kms_tpk_current_version"),
    )


def test_metrics_read_the_registry_from_postgresql(replicas: Replicas) -> None:
    # The homes of replicas 1 and 2 have no registry file: what /metrics shows comes from
    # the database.
    for home in replicas.homes[1:]:
        assert not (home / "registry.sqlite3").exists()
    before = [registry_view(p) for p in replicas.metrics_ports]
    assert all(v == before[0] for v in before), before
    endpoints, tpks, version = before[0]
    assert endpoints == len(ENDPOINTS) and tpks >= 1 and version >= 1
    # Changes through ANOTHER replica's CLI (replica 2's home).
    run_kms(replicas.homes[2], "endpoint", "add", "sip:zoe@example.org",
            "--psk-hex", "11" * 16)
    run_kms(replicas.homes[2], "tpk", "rotate")
    for port in replicas.metrics_ports:
        assert registry_view(port) == (endpoints + 1, tpks + 1, version + 1), port


def test_kms_status_against_a_replica_on_postgresql(replicas: Replicas) -> None:
    for i in (0, 1):
        serve, port = replicas.serves[i], replicas.metrics_ports[i]
        r = run_kms(replicas.homes[i], "status", "--target", serve.target,
                    "--metrics", f"127.0.0.1:{port}", "--json", check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        report = json.loads(r.stdout)
        assert report["health"] == "SERVING"
        assert report["token"]["up"] is True
        assert report["registry"]["endpoints"] >= len(ENDPOINTS)
        assert report["tpk"]["current_version"] >= 1
        assert report["tpk"]["versions"].get("current") == 1
        # Human form too.
        text = run_kms(replicas.homes[i], "status", "--target", serve.target,
                       "--metrics", f"127.0.0.1:{port}").stdout
        assert f"KMS           {serve.target}: SERVING" in text
        assert "registry      " in text and "endpoints" in text


RACE = """
import sys, time
from pathlib import Path
from kms.server.compose import dummy_psk
from kms.home import open_home
home = open_home(Path(sys.argv[1]))
ks = home.keystore()
ks.list_keys()  # the token is open and scanned: no dummy PSK in this process's view
print("ready", flush=True)
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
dummy_psk(ks, lambda: home.stores.token_lock("dummy-psk"))
print("done", ks.key_info("authn/dummy").label, flush=True)
home.close()
"""


def test_dummy_psk_creation_races_resolve_to_one_object(
    tmp_path: Path, pg_server: PgServer
) -> None:
    """Four replicas' processes, each with a scanned token that has no dummy PSK, all asked
    for it at the same instant: exactly one object is created, every process finds it."""
    home1 = make_home(tmp_path / "home1", {ALICE: PSKS[ALICE]}, {})
    run_kms(home1, "store", "migrate", pg_server.dsn(pg_server.create_database("race")))
    homes = [home1]
    for n in (2, 3, 4):
        run_kms(tmp_path / f"home{n}", "store", "replica", str(home1))
        homes.append(tmp_path / f"home{n}")
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", RACE, str(h), str(go)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=REPO)
        for h in homes
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready", p.stderr.read() if p.stderr else ""
        go.touch()
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert out.strip() == f"done {DUMMY_PSK_LABEL}", (out, err)
    assert dummy_objects(home1) == 1


def test_token_lock_excludes_across_replicas(pg_dsn: str, tmp_path: Path) -> None:
    """Two replicas' store backends (separate homes, one database): while one holds the
    token lock, the other waits; a lock of another name does not."""
    import threading

    from kms.server.config import load_config
    from kms.server.stores import open_stores

    home1 = make_home(tmp_path / "h1", {ALICE: PSKS[ALICE]}, {})
    run_kms(home1, "store", "migrate", pg_dsn)
    run_kms(tmp_path / "h2", "store", "replica", str(home1))
    a, b = (open_stores(load_config(h)) for h in (home1, tmp_path / "h2"))
    try:
        got = threading.Event()

        def other() -> None:
            with b.token_lock("dummy-psk"):
                got.set()

        with a.token_lock("dummy-psk"):
            t = threading.Thread(target=other)
            t.start()
            assert not got.wait(1.0)  # blocked while replica a holds it
            with b.token_lock("another-object"):
                pass  # independent names do not block each other
        t.join(30)
        assert got.is_set()
    finally:
        a.close()
        b.close()
