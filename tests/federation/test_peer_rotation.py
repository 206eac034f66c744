"""Rotating the key two federated KMSs share, and changing a peer's settings, while both
`kms serve` and cross-domain resolves keep running (RFC 6043 9; IDRpsk names the version of
the key used, 4.2.3). Two domains, provisioned and operated with the CLI only:

    A (kms:a.example)  Alice   peer B: may resolve for sip:*@b.example
    B (kms:b.example)  Bob     peer A: may resolve for sip:*@a.example

A client keeps making calls both ways (A's ticket resolved at B, B's at A: each forwarded
to the issuer) while the operators run the whole procedure of docs/federation.md. B's
registry is put back to the schema the previous release wrote (no ``peers.send_version``)
before its first start: `kms serve` migrates it and B keeps resolving, then rotates.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from hsm.software import SoftwareKeyStore
from kms.endpoint.client import KmsClient, KmsRefused, obtain_ticket
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DesiredPolicy, Initiator
from kms.endpoint.responder import Responder
from kms.endpoint.session import CryptoSession
from kms.mikey.constants import ErrorNo, IdType
from tests.e2e.harness import free_port, run_kms, set_policy
from tests.federation.conftest import Domain, _provision
from tests.federation.pki import TestCa

A_ID, B_ID = "kms:a.example", "kms:b.example"
ALICE, BOB = b"sip:alice@a.example", b"sip:bob@b.example"
PSKS = {ALICE: bytes.fromhex("a1" * 16), BOB: bytes.fromhex("b0" * 16)}
HOME_OF = {ALICE: "A", BOB: "B"}
KEY_V1 = bytes.fromhex("ab" * 32)
KEY_V2 = bytes.fromhex("5e" * 32)
SESSIONS = (CryptoSession(1, 0x0707_0001),)


@dataclass
class Two:
    domains: dict[str, Domain]
    ca: TestCa
    endpoint_cert: Any
    ks: SoftwareKeyStore = field(default_factory=SoftwareKeyStore)
    clients: list[KmsClient] = field(default_factory=list)

    def __getitem__(self, name: str) -> Domain:
        return self.domains[name]

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.clients.clear()

    def client(self, name: str) -> KmsClient:
        c = KmsClient(
            self.domains[name].target, root_certificates=self.ca.path,
            certificate_chain=self.endpoint_cert.cert, private_key=self.endpoint_cert.key,
            timeout=10, retries=0,
        )  # fmt: skip
        self.clients.append(c)
        return c

    def creds(
        self, who: bytes, key: bytes | None = None, psk_name: bytes | None = None
    ) -> Credentials:
        kms_id = self.domains[HOME_OF[who]].kms_id_bytes
        return Credentials(
            who, PSKS[who] if key is None else key, kms_id, IdType.URI, psk_name=psk_name
        )


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Two]:
    assert shutil.which("softhsm2-util"), "softhsm2-util is required (scripts/setup.sh)"
    with two_domains(tmp_path_factory.mktemp("peer-rotation")) as t:
        yield t


@contextlib.contextmanager
def two_domains(root: Path) -> Iterator[Two]:
    """A and B provisioned with the CLI (B's registry as the previous release left it) and
    serving; stopped again on the way out (also used by bench/peer_rotation.py)."""
    with contextlib.ExitStack() as stack:
        ca = TestCa(root / "pki")
        a = Domain("A", A_ID, root / "A", free_port(), ca.issue("kms-a"))
        b = Domain("B", B_ID, root / "B", free_port(), ca.issue("kms-b"))
        for d in (a, b):
            stack.callback(d.kill)
        plans = [
            (a, {ALICE: PSKS[ALICE]}, [[B_ID, "--address", b.target, "--psk-hex", KEY_V1.hex(),
                                        "--resolve-for", "sip:*@b.example"]]),
            (b, {BOB: PSKS[BOB]}, [[A_ID, "--address", a.target, "--psk-hex", KEY_V1.hex(),
                                    "--resolve-for", "sip:*@a.example"]]),
        ]  # fmt: skip
        with futures.ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(_provision, d, ca, u, p) for d, u, p in plans]:
                f.result()
        for d in (a, b):
            set_policy(d.home, rate_limit_per_s=0)  # the loop below calls as fast as it can
        _as_the_previous_release_left_it(b.home / "registry.sqlite3")
        with futures.ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(d.start) for d in (a, b)]:
                f.result()
        two = Two({"A": a, "B": b}, ca, ca.issue("endpoints"))
        stack.callback(two.close)
        yield two
        two.close()
        for d in (a, b):
            d.stop()


def _as_the_previous_release_left_it(path: Path) -> None:
    """Schema 5: the registry of a home made before peer key versions (its peer rows kept)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 6
        conn.execute("ALTER TABLE peers DROP COLUMN send_version")
        conn.execute("PRAGMA user_version = 5")
        assert conn.execute("SELECT count(*) FROM peers").fetchone()[0] == 1
    finally:
        conn.close()


def cross_call(two: Two, clients: dict[str, KmsClient], caller: bytes, callee: bytes) -> str:
    """A whole call: ``caller`` gets a ticket at its KMS, ``callee`` resolves it at ITS KMS
    (which forwards it to the issuer), the keys agree. Returns the correlation id."""
    ini = Initiator(two.creds(caller), two.ks)
    grant = obtain_ticket(clients[HOME_OF[caller]], ini, DesiredPolicy(responders=(callee,)))
    ti, pending = ini.transfer_init(grant, time.time(), callee, SESSIONS)
    res = Responder(two.creds(callee), two.ks)
    wire, pr = res.receive_transfer_init(ti, time.time())
    cid = "rot-" + uuid.uuid4().hex[:12]
    call = res.accept_resolve(
        pr, clients[HOME_OF[callee]].resolve_ticket(wire, correlation_id=cid), time.time()
    )
    assert call.transfer_resp is not None
    ends = ini.establish(pending, call.transfer_resp, time.time())
    assert ends.srtp[0].key_and_salt == call.srtp[0].key_and_salt
    return cid


class Caller:
    """Calls both ways in a loop (A's ticket resolved at B, then B's at A) until stopped;
    records every failure."""

    def __init__(self, two: Two) -> None:
        self.two = two
        self.clients = {"A": two.client("A"), "B": two.client("B")}
        self.done = {"A->B": 0, "B->A": 0}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, caller, callee in (("A->B", ALICE, BOB), ("B->A", BOB, ALICE)):
                try:
                    cross_call(self.two, self.clients, caller, callee)
                except Exception as exc:
                    with self._lock:
                        self.failures.append(f"{name}: {exc!r}")
                else:
                    with self._lock:
                        self.done[name] += 1

    def __enter__(self) -> Caller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def progress(self, calls: int = 2) -> None:
        """Wait until ``calls`` more calls have succeeded in each direction."""
        with self._lock:
            target = {k: v + calls for k, v in self.done.items()}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with self._lock:
                if all(self.done[k] >= target[k] for k in target) or self.failures:
                    return
            time.sleep(0.02)
        raise AssertionError(f"no progress: {self.done}, failures {self.failures}")


def versions(d: Domain, peer: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(
        run_kms(d.home, "peer", "psk-list", peer, "--json").stdout
    )
    return out


def token_labels(d: Domain) -> set[str]:
    return {k["label"] for k in json.loads(run_kms(d.home, "keys", "list", "--json").stdout)
            if k["present"]}  # fmt: skip


def forged_peer_resolve(two: Two, key: bytes, psk_name: bytes) -> KmsRefused | None:
    """What B would send A for Bob: a RESOLVE_INIT_PSK naming B's key version ``psk_name``
    in IDRpsk, MACed with ``key``, for a ticket A issued (sent straight to A)."""
    ini = Initiator(two.creds(ALICE), two.ks)
    client = two.client("A")
    grant = obtain_ticket(client, ini, DesiredPolicy(responders=(BOB,)))
    ti, _pending = ini.transfer_init(grant, time.time(), BOB, SESSIONS)
    as_b = Responder(
        Credentials(BOB, key, two["A"].kms_id_bytes, IdType.URI, psk_name=psk_name), two.ks
    )
    wire, _pr = as_b.receive_transfer_init(ti, time.time())
    try:
        client.resolve_ticket(wire, correlation_id="forged-" + uuid.uuid4().hex[:8])
    except KmsRefused as exc:
        return exc
    return None


def test_rotation_on_both_sides_while_calls_go_on(two: Two) -> None:
    a, b = two["A"], two["B"]
    with contextlib.closing(sqlite3.connect(b.home / "registry.sqlite3")) as conn:  # migrated
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 6
    old_a = versions(a, B_ID)
    assert [(v["version"], v["state"], v["sending"]) for v in old_a] == [(1, "active", True)]
    v1_label_a = old_a[0]["key_label"]
    assert forged_peer_resolve(two, KEY_V1, B_ID.encode()) is None  # B's key works as sent
    with Caller(two) as caller:
        caller.progress()
        # 1. Both operators import the new key (same value, same number): accepted at once.
        run_kms(a.home, "peer", "rotate-psk", B_ID, "--psk-hex", KEY_V2.hex())
        caller.progress()
        run_kms(b.home, "peer", "rotate-psk", A_ID, "--psk-hex", KEY_V2.hex())
        caller.progress()
        # 2. Each switches what it sends with, one after the other.
        out = run_kms(a.home, "peer", "use-psk", B_ID, "2").stdout
        assert "IDRpsk kms:a.example#psk2" in out
        caller.progress()
        run_kms(b.home, "peer", "use-psk", A_ID, "2")
        caller.progress()
        # 3. Both retire version 1.
        run_kms(a.home, "peer", "retire-psk", B_ID, "1")
        caller.progress()
        run_kms(b.home, "peer", "retire-psk", A_ID, "1")
        caller.progress()
    assert caller.failures == []
    assert min(caller.done.values()) >= 14
    # Each side's audit log shows the peer's requests under the new version.
    for d, peer in ((a, B_ID), (b, A_ID)):
        served = [r for r in d.audit() if r.get("method") == "peer" and r.get("peer") == peer]
        assert {r.get("psk_version") for r in served} >= {None, 2}, served[-1]
        assert served[-1]["psk_version"] == 2 and served[-1]["outcome"] == "ok"
    # ...and what each forwarded with: v2 from its use-psk on.
    for d in (a, b):
        sent = [r for r in d.audit() if r.get("via_peer")]
        assert sent[0].get("peer_psk_version") is None and sent[-1]["peer_psk_version"] == 2
    listed = versions(a, B_ID)
    assert [(v["version"], v["state"], v["sending"]) for v in listed] == [
        (1, "retired", False), (2, "active", True),
    ]  # fmt: skip
    # The old key is refused from now on (as a wrong MAC), and its token object is gone.
    refused = forged_peer_resolve(two, KEY_V1, B_ID.encode())
    assert refused is not None and refused.code is grpc.StatusCode.UNAUTHENTICATED
    assert refused.error_no == ErrorNo.AUTH_FAILURE
    assert any(r.get("reason") == "peer PSK version 1 retired" for r in a.audit())
    labels = token_labels(a)
    assert v1_label_a not in labels and listed[1]["key_label"] in labels
    assert listed[1]["key_label"] != v1_label_a  # rotation never reuses a label
    assert forged_peer_resolve(two, KEY_V2, B_ID.encode() + b"#psk2") is None


def test_unknown_version_is_refused_like_a_wrong_mac(two: Two) -> None:
    wrong_mac = forged_peer_resolve(two, bytes(32), B_ID.encode() + b"#psk2")
    unknown = forged_peer_resolve(two, KEY_V2, B_ID.encode() + b"#psk9")
    assert wrong_mac is not None and unknown is not None
    assert (unknown.code, unknown.error_no) == (wrong_mac.code, wrong_mac.error_no)
    assert (unknown.code, unknown.error_no) == (
        grpc.StatusCode.UNAUTHENTICATED,
        ErrorNo.AUTH_FAILURE,
    )
    assert unknown.detail == wrong_mac.detail
    reasons = [r.get("reason") for r in two["A"].audit()]
    assert "peer unknown PSK version 9" in reasons and "peer MAC verification failed" in reasons


def test_use_and_retire_refusals(two: Two) -> None:
    a = two["A"]
    sending = next(v["version"] for v in versions(a, B_ID) if v["sending"])
    for version, message in ((7, "no PSK version 7"), (1, "PSK version 1 is retired")):
        r = run_kms(a.home, "peer", "use-psk", B_ID, str(version), check=False)
        assert r.returncode != 0 and message in r.stderr, r.stderr
    r = run_kms(a.home, "peer", "retire-psk", B_ID, str(sending), check=False)
    assert r.returncode != 0 and "the one this KMS sends with" in r.stderr, r.stderr
    r = run_kms(a.home, "peer", "rotate-psk", B_ID, "--psk-hex", KEY_V1.hex(), "--version", "2",
                check=False)  # fmt: skip
    assert r.returncode != 0 and "must be newer than version 2" in r.stderr, r.stderr


def test_psk_list_never_prints_key_material(two: Two) -> None:
    a = two["A"]
    secrets = {k.hex() for k in (KEY_V1, KEY_V2)} | {k.hex().upper() for k in (KEY_V1, KEY_V2)}
    for args in (("psk-list", B_ID), ("psk-list", B_ID, "--json"), ("list",), ("list", "--json")):
        out = run_kms(a.home, "peer", *args)
        text = out.stdout + out.stderr
        assert not any(s in text or s[:16] in text for s in secrets), text


def _cert_peer_pem(kms_id: str) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, kms_id)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(kms_id)]), False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM)


def test_certificate_peer_is_not_a_psk_peer(two: Two, tmp_path: Path) -> None:
    a = two["A"]
    pem = tmp_path / "c.pem"
    pem.write_bytes(_cert_peer_pem("kms:c.example"))
    run_kms(a.home, "peer", "add", "kms:c.example", "--address", "127.0.0.1:9", "--cert", str(pem))
    for args in (("rotate-psk", "kms:c.example", "--psk-hex", KEY_V2.hex()),
                 ("use-psk", "kms:c.example", "1"), ("retire-psk", "kms:c.example", "1"),
                 ("psk-list", "kms:c.example")):  # fmt: skip
        r = run_kms(a.home, "peer", *args, check=False)
        assert r.returncode != 0 and "not a PSK peer" in r.stderr, (args, r.stderr)
    run_kms(a.home, "peer", "remove", "kms:c.example")


def test_peer_set_takes_effect_on_the_running_servers(two: Two) -> None:
    a, b = two["A"], two["B"]
    clients = {"A": two.client("A"), "B": two.client("B")}
    cross_call(two, clients, ALICE, BOB)
    # B sends A's tickets to A's address; a wrong one: B reports A unavailable...
    run_kms(b.home, "peer", "set", A_ID, "--address", f"127.0.0.1:{free_port()}",
            "--deadline-ms", "800")  # fmt: skip
    with pytest.raises(KmsRefused) as info:
        cross_call(two, clients, ALICE, BOB)
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
    # ...and the right one again: at once.
    run_kms(b.home, "peer", "set", A_ID, "--address", a.target, "--deadline-ms", "2000")
    cross_call(two, clients, ALICE, BOB)
    # A no longer lets B resolve for anyone, then for Bob's domain again.
    run_kms(a.home, "peer", "set", B_ID, "--clear-resolve-for")
    with pytest.raises(KmsRefused) as info:
        cross_call(two, clients, ALICE, BOB)
    assert info.value.code is grpc.StatusCode.PERMISSION_DENIED
    listed = json.loads(run_kms(a.home, "peer", "list", "--json").stdout)
    assert next(p for p in listed if p["kms_id"] == B_ID)["resolve_for"] == []
    run_kms(a.home, "peer", "set", B_ID, "--resolve-for", "sip:*@b.example", "--rate", "100")
    cross_call(two, clients, ALICE, BOB)
    listed = json.loads(run_kms(a.home, "peer", "list", "--json").stdout)
    entry = next(p for p in listed if p["kms_id"] == B_ID)
    assert (entry["resolve_for"], entry["rate_per_s"]) == (["sip:*@b.example"], 100.0)
    r = run_kms(a.home, "peer", "set", B_ID, check=False)
    assert r.returncode != 0 and "nothing to change" in r.stderr
    r = run_kms(a.home, "peer", "set", "kms:nobody.example", "--rate", "1", check=False)
    assert r.returncode != 0 and "unknown peer KMS kms:nobody.example" in r.stderr
