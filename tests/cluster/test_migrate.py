"""`kms store migrate DSN` on a populated single-host home: identical answers before and after,
all or nothing, safe to run twice, and nothing lost (a single-use ticket resolved before the
switch stays resolved; an accepted message stays a replay)."""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import grpc
import pytest

from kms.cli import main as cli_main
from kms.endpoint.client import KmsRefused, obtain_ticket, resolve
from kms.endpoint.initiator import DEFAULT_FLAGS, DesiredPolicy
from kms.endpoint.session import CryptoSession
from kms.mikey.constants import IdType
from kms.mikey.ticket import TpFlag
from kms.store.pg import PgDatabase, PgSettings
from kms.store.pg_registry import PgRegistry
from tests.e2e.harness import (
    ALICE,
    BOB,
    CAROL,
    PSKS,
    TEAM,
    Kms,
    make_home,
    run_kms,
    running_kms,
)
from tests.pgcluster import PgServer

LISTS = (
    ("endpoint", "list", "--json"),
    ("group", "list", "--json"),
    ("tpk", "list", "--json"),
    ("app", "list", "--json"),
    ("peer", "list", "--json"),
    ("keys", "list", "--json"),
)


def answers(home: Path) -> dict[str, str]:
    """What the operator's list commands print (run in this process: no interpreter start)."""
    out = {}
    for cmd in LISTS:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert cli_main(["--home", str(home), *cmd]) == 0
        out[" ".join(cmd)] = buf.getvalue()
    return out


def test_migrate_gives_identical_answers_and_loses_nothing(
    tmp_path: Path, pg_server: PgServer
) -> None:
    home = make_home(tmp_path / "home", {k: PSKS[k] for k in (ALICE, BOB, CAROL)},
                     {TEAM: (BOB, CAROL)})
    run_kms(home, "app", "add", "urn:example:voice")
    run_kms(home, "app", "add", "urn:example:video")
    (tmp_path / "ab.psk").write_text("5a" * 32)
    run_kms(home, "peer", "add", "kms:b.example", "--address", "127.0.0.1:1",
            "--psk-file", str(tmp_path / "ab.psk"), "--resolve-for", "sip:*@b.example",
            "--rate", "2.5", "--deadline-ms", "1500")
    # A rotated peer key sent with version 2 (peers.send_version, psk_versions) moves too.
    run_kms(home, "peer", "rotate-psk", "kms:b.example", "--psk-hex", "6b" * 32)
    run_kms(home, "peer", "use-psk", "kms:b.example", "2")
    run_kms(home, "tpk", "rotate")

    with running_kms(home) as kms:
        ini = kms.initiator(ALICE)
        single = kms.grant(DesiredPolicy(responders=(BOB,)))
        reusable = kms.grant(DesiredPolicy(responders=(BOB,), flags=DEFAULT_FLAGS | TpFlag.J))
        ti, _ = ini.transfer_init(single, time.time(), BOB, [CryptoSession(1, 1)])
        resolve(kms.client(), kms.responder(BOB), ti)
        accepted, _ = ini.request_ticket(DesiredPolicy(responders=(BOB,)), time.time())
        kms.client().request_ticket(accepted)
        # Not while it serves.
        busy = run_kms(home, "store", "migrate", pg_server.dsn("postgres"), check=False)
        assert busy.returncode == 1 and "stop it first" in busy.stderr
    before = answers(home)

    # A database that already holds another registry: refused, kms.toml untouched.
    other = pg_server.dsn(pg_server.create_database("other"))
    db = PgDatabase(PgSettings(dsn=other))
    reg = PgRegistry(db, owns_db=True)
    reg.migrate()
    reg.add_endpoint(b"sip:someone@else", IdType.URI, "psk/else")
    reg.close()
    toml = (home / "kms.toml").read_text()
    r = run_kms(home, "store", "migrate", other, check=False)
    assert r.returncode == 1 and "already holds a different registry" in r.stderr, r.stderr
    assert (home / "kms.toml").read_text() == toml

    # A password in the DSN: refused without echoing it.
    r = run_kms(home, "store", "migrate", "postgresql://kms:s3cret@127.0.0.1/x", check=False)
    assert r.returncode == 1 and "must not contain a password" in r.stderr
    assert "s3cret" not in r.stderr + r.stdout

    dsn = pg_server.dsn(pg_server.create_database("moved"))
    out = run_kms(home, "store", "migrate", dsn).stdout
    assert "moved 3 endpoints, 1 groups (2 memberships), 2 applications, 1 peers, " \
           "2 TPK versions" in out, out
    assert "1 resolve-ledger entries" in out and "replay-cache entries" in out
    assert 'backend = "postgresql"' in (home / "kms.toml").read_text()
    again = run_kms(home, "store", "migrate", dsn)
    assert "nothing to do" in again.stdout

    assert answers(home) == before
    assert '"send_version": 2' in before["peer list --json"]

    with running_kms(home) as kms2:
        k = Kms(home, kms2.serve, ks=kms.ks)
        # The single-use ticket resolved before the switch stays resolved ...
        ti, _ = ini.transfer_init(single, time.time(), BOB, [CryptoSession(1, 2)])
        with pytest.raises(KmsRefused) as info:
            resolve(k.client(), k.responder(BOB), ti)
        assert info.value.detail == "ticket already resolved (reuse not allowed)"
        # ... the message accepted before is still a replay ...
        with pytest.raises(KmsRefused) as info:
            k.client().request_ticket(accepted)
        assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION
        # ... and tickets issued before resolve after; new ones work.
        ti, _ = ini.transfer_init(reusable, time.time(), BOB, [CryptoSession(1, 3)])
        resolve(k.client(), k.responder(BOB), ti)
        obtain_ticket(k.client(), k.initiator(ALICE), DesiredPolicy(responders=(TEAM,)))
        k.close_clients()
