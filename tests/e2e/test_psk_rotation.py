"""Endpoint PSK rotation without downtime, end to end: `kms endpoint rotate-psk` while
`kms serve` runs, old and new phones mixed (IDRpsk names the new version, RFC 6043 4.2.1 /
4.2.3), calls with real SRTP across rotate and retire, the retired PSK refused and its token
object destroyed; mode-3 tickets (4.1.1, IDRpsk of the Ticket Data, A.1) likewise."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest

from kms.endpoint.client import KmsRefused, obtain_ticket, resolve
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DesiredPolicy, Initiator
from kms.endpoint.modes import mode3_ticket
from kms.endpoint.responder import Responder
from kms.endpoint.session import CryptoSession
from kms.mikey.constants import ErrorNo, IdType
from tests.e2e.harness import (
    ALICE,
    BOB,
    CAROL,
    ERIN,
    FRANK,
    KMS_ID,
    PSKS,
    REPO,
    Kms,
    check_srtp,
    make_home,
    run_kms,
    running_kms,
)

SESSIONS = (CryptoSession(1, 0x9050001),)


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kms]:
    home = make_home(tmp_path_factory.mktemp("psk") / "home")
    with running_kms(home) as k:
        yield k


def rotate(kms: Kms, who: bytes, *args: str) -> tuple[bytes, bytes, str]:
    """`kms endpoint rotate-psk`: (the new PSK, its IDRpsk name, its token label)."""
    out = run_kms(kms.home, "endpoint", "rotate-psk", who.decode(), *args).stdout
    psk = re.search(r"psk: ([0-9a-f]+)", out)
    name = re.search(r"name \(IDRpsk\): (\S+)", out)
    label = re.search(r"key (\S+)\n", out)
    assert psk and name and label, out
    return bytes.fromhex(psk[1]), name[1].encode(), label[1]


def creds(who: bytes, psk: bytes, name: bytes | None) -> Credentials:
    return Credentials(who, psk, KMS_ID, IdType.URI, psk_name=name)


def call(kms: Kms, ini: Initiator, res: Responder, *, mode3: bool = False) -> None:
    """A whole call: ticket, transfer, resolve, real SRTP. ``mode3``: the Initiator makes
    the ticket under its PSK (RFC 6043 4.1.1; IDRpsk names the version it holds) instead of
    asking the KMS for one."""
    desired = DesiredPolicy(responders=(res.creds.identity,))
    if mode3:
        grant = mode3_ticket(ini, desired, time.time())
    else:
        grant = obtain_ticket(kms.client(), ini, desired)
    ti, pending = ini.transfer_init(grant, time.time(), res.creds.identity, SESSIONS)
    got = resolve(kms.client(), res, ti)
    assert got.transfer_resp is not None
    ends = ini.establish(pending, got.transfer_resp, time.time())
    check_srtp(ends.srtp[0], got.srtp[0])


def refused(fn: object) -> KmsRefused:
    with pytest.raises(KmsRefused) as info:
        fn()  # type: ignore[operator]
    return info.value


def token_labels(kms: Kms) -> dict[str, bool]:
    keys = json.loads(run_kms(kms.home, "keys", "list", "--json").stdout)
    return {k["label"]: k["present"] for k in keys}


def test_rotate_then_retire_with_old_and_new_phones_mixed(kms: Kms) -> None:
    old_bob = Responder(creds(BOB, PSKS[BOB], None), kms.ks)
    old_bob_ini = Initiator(creds(BOB, PSKS[BOB], None), kms.ks)
    alice = kms.initiator(ALICE)
    call(kms, alice, old_bob)
    v1_label = next(
        line.split()[2]
        for line in run_kms(kms.home, "endpoint", "psk-list", BOB.decode()).stdout.splitlines()
        if line.startswith("1 ")
    )

    new_psk, name, v2_label = rotate(kms, BOB)
    assert name == BOB + b"#psk2" and new_psk != PSKS[BOB]
    new_bob = Responder(creds(BOB, new_psk, name), kms.ks)
    new_bob_ini = Initiator(creds(BOB, new_psk, name), kms.ks)
    # Both phones work at once, in both roles; each answer is protected with the PSK its
    # request used (the endpoint library verifies the response with its own PSK).
    call(kms, alice, new_bob)
    call(kms, alice, old_bob)
    call(kms, new_bob_ini, kms.responder(CAROL))
    call(kms, old_bob_ini, kms.responder(CAROL))
    # The old PSK under the new name (or the new one under none) is refused.
    wrong = Initiator(creds(BOB, PSKS[BOB], name), kms.ks)
    r = refused(lambda: obtain_ticket(kms.client(), wrong, DesiredPolicy(responders=(CAROL,))))
    assert r.code is grpc.StatusCode.UNAUTHENTICATED
    # Another identity cannot use Bob's version name.
    mallory = Initiator(creds(ERIN, new_psk, name), kms.ks)
    r = refused(lambda: obtain_ticket(kms.client(), mallory, DesiredPolicy(responders=(CAROL,))))
    assert r.error_no == ErrorNo.AUTH_FAILURE
    labels = token_labels(kms)
    assert labels[v1_label] and labels[v2_label]

    out = run_kms(kms.home, "endpoint", "retire-psk", BOB.decode(), "1").stdout
    assert f"key {v1_label} destroyed" in out
    r = refused(lambda: call(kms, alice, old_bob))
    assert (r.code, r.error_no) == (grpc.StatusCode.UNAUTHENTICATED, ErrorNo.AUTH_FAILURE)
    r = refused(lambda: obtain_ticket(kms.client(), old_bob_ini,
                                      DesiredPolicy(responders=(CAROL,))))  # fmt: skip
    assert r.error_no == ErrorNo.AUTH_FAILURE
    call(kms, alice, new_bob)
    call(kms, new_bob_ini, kms.responder(CAROL))
    assert v1_label not in token_labels(kms)  # the old token object is destroyed
    records = [json.loads(x) for x in (kms.home / "audit.log").read_text().splitlines()]
    assert any(r.get("reason") == "PSK version 1 retired" for r in records)
    assert any(r.get("psk_version") == 2 and r.get("outcome") == "ok" for r in records)
    # The last usable version cannot be retired.
    p = run_kms(kms.home, "endpoint", "retire-psk", BOB.decode(), "2", check=False)
    assert p.returncode == 1 and "only PSK" in p.stderr


def test_overlap_ends_by_itself_and_due_versions_are_destroyed(kms: Kms) -> None:
    old = Initiator(creds(CAROL, PSKS[CAROL], None), kms.ks)
    new_psk, name, _ = rotate(kms, CAROL, "--overlap", "2")
    new = Initiator(creds(CAROL, new_psk, name), kms.ks)
    call(kms, old, kms.responder(ALICE))  # inside the overlap
    call(kms, new, kms.responder(ALICE))
    time.sleep(2.2)
    r = refused(lambda: obtain_ticket(kms.client(), old, DesiredPolicy(responders=(ALICE,))))
    assert r.error_no == ErrorNo.AUTH_FAILURE
    call(kms, new, kms.responder(ALICE))
    out = run_kms(kms.home, "endpoint", "retire-psk", "--due").stdout
    assert f"retired PSK version 1 of {CAROL.decode()}" in out
    listed = json.loads(run_kms(kms.home, "endpoint", "psk-list", CAROL.decode(),
                                "--json").stdout)  # fmt: skip
    assert [(v["version"], v["state"]) for v in listed] == [(1, "retired"), (2, "active")]


def test_kms_call_sends_the_psk_name(kms: Kms) -> None:
    path = kms.home.parent / "erin-v2.hex"
    out = run_kms(kms.home, "endpoint", "rotate-psk", ERIN.decode(), "--out", str(path)).stdout
    assert "psk:" not in out and oct(path.stat().st_mode & 0o777) == "0o600"
    new_psk = bytes.fromhex(path.read_text().strip())
    name = ERIN + b"#psk2"
    assert f"name (IDRpsk): {name.decode()}" in out
    proc = subprocess.run(
        [sys.executable, "-m", "kms.cli", "--home", str(kms.home), "call",
         "--target", kms.target, "--identity", ERIN.decode(), "--psk-hex", new_psk.hex(),
         "--psk-name", name.decode(), "--to", ALICE.decode(),
         "--resolve-as", ALICE.decode(), "--resolve-psk-hex", PSKS[ALICE].hex()],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert new_psk.hex() not in proc.stdout
    # Without the name, the new PSK is the wrong key for version 1.
    proc = subprocess.run(
        [sys.executable, "-m", "kms.cli", "--home", str(kms.home), "call",
         "--target", kms.target, "--identity", ERIN.decode(), "--psk-hex", new_psk.hex(),
         "--to", ALICE.decode()],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "UNAUTHENTICATED" in proc.stderr


def test_mode_3_tickets_across_a_rotation(kms: Kms) -> None:
    old = Initiator(creds(FRANK, PSKS[FRANK], None), kms.ks)
    alice = kms.responder(ALICE)
    call(kms, old, alice, mode3=True)
    new_psk, name, _ = rotate(kms, FRANK)
    new = Initiator(creds(FRANK, new_psk, name), kms.ks)
    # Old and new phones both make tickets the KMS resolves, each under its own version.
    call(kms, old, alice, mode3=True)
    call(kms, new, alice, mode3=True)
    # A ticket made before the retirement, under the version about to be retired.
    stale = mode3_ticket(old, DesiredPolicy(responders=(ALICE,)), time.time())
    run_kms(kms.home, "endpoint", "retire-psk", FRANK.decode(), "1")
    fresh = mode3_ticket(old, DesiredPolicy(responders=(ALICE,)), time.time())
    for grant in (stale, fresh):  # the retired version is refused, whenever it was used
        ti, _ = old.transfer_init(grant, time.time(), ALICE, SESSIONS)
        r = refused(lambda ti=ti: resolve(kms.client(), alice, ti))
        assert (r.code, r.error_no) == (grpc.StatusCode.UNAUTHENTICATED, ErrorNo.AUTH_FAILURE)
    call(kms, new, alice, mode3=True)
    records = [json.loads(x) for x in (kms.home / "audit.log").read_text().splitlines()]
    assert any(
        r.get("reason") == "ticket refused: PSK version 1 retired" for r in records
    ), records[-3:]
