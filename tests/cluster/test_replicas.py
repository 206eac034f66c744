"""Three `kms serve` replicas on one PostgreSQL database and one SoftHSM2 token: exactly-once
across replicas, cluster-wide limits, provisioning seen everywhere within 2 s, a replica
SIGKILLed under load, PostgreSQL stopped under load, HAProxy in front."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kms.endpoint.client import KmsClient, KmsRefused, obtain_ticket, resolve
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DEFAULT_FLAGS, DesiredPolicy, Initiator, TicketGrant
from kms.endpoint.session import CryptoSession
from kms.mikey.base_ticket import ticket_id
from kms.mikey.ticket import TpFlag
from kms.rpc import SERVICE_NAME
from tests.cluster.conftest import RATE, Cluster, eventually
from tests.e2e.harness import (
    ALICE,
    BOB,
    CAROL,
    ERIN,
    FRANK,
    GRACE,
    KMS_ID,
    TEAM,
    check_srtp,
    free_port,
    run_kms,
)

REPO = Path(__file__).resolve().parents[2]
REUSABLE = DEFAULT_FLAGS | TpFlag.J
REFUSED = {
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
}


def send_at_once(calls: list[Callable[[], bytes]]) -> list[bytes | KmsRefused]:
    """Run the calls in threads released together; each result or its refusal."""
    barrier = threading.Barrier(len(calls))
    out: list[bytes | KmsRefused] = [b""] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = calls[i]()
        except KmsRefused as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_same_message_to_two_replicas_is_accepted_once(cluster: Cluster) -> None:
    c0, c1, c2 = cluster.client(0), cluster.client(1), cluster.client(2)
    ini = cluster.initiator(ALICE)
    for k in range(6):
        wire, _ = ini.request_ticket(DesiredPolicy(responders=(BOB,), flags=REUSABLE), time.time())
        pair = (c0, c1) if k % 2 else (c1, c2)
        res = send_at_once([lambda c=c, w=wire: c.request_ticket(w) for c in pair])
        ok = [r for r in res if isinstance(r, bytes)]
        refused = [r for r in res if isinstance(r, KmsRefused)]
        assert len(ok) == 1 and len(refused) == 1, res
        assert refused[0].code is grpc.StatusCode.FAILED_PRECONDITION
        assert refused[0].detail == "replayed message"

    # The same RESOLVE_INIT (of a reusable ticket, so only the replay cache decides).
    grant = obtain_ticket(c0, ini, DesiredPolicy(responders=(BOB,), flags=REUSABLE))
    bob = cluster.responder(BOB)
    for k in range(4):
        ti, _ = ini.transfer_init(grant, time.time(), BOB, [CryptoSession(1, 100 + k)])
        rwire, _ = bob.receive_transfer_init(ti, time.time())
        res = send_at_once([lambda c=c, w=rwire: c.resolve_ticket(w) for c in (c1, c2)])
        assert sum(isinstance(r, bytes) for r in res) == 1, res


def test_single_use_ticket_resolves_once_per_responder_across_replicas(cluster: Cluster) -> None:
    ini = cluster.initiator(ALICE)
    grant = obtain_ticket(cluster.client(0), ini, DesiredPolicy(responders=(BOB, CAROL)))
    assert not grant.policy.flags & TpFlag.J

    def resolve_at(i: int, who: bytes) -> None:
        ti, _ = ini.transfer_init(grant, time.time(), who, [CryptoSession(1, 7)])
        resolve(cluster.client(i), cluster.responder(who), ti)

    resolve_at(0, BOB)
    for i in (1, 2, 0):
        with pytest.raises(KmsRefused) as info:
            resolve_at(i, BOB)
        assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION
        assert info.value.detail == "ticket already resolved (reuse not allowed)"
    resolve_at(2, CAROL)  # another responder of the same ticket: its own first resolve
    with pytest.raises(KmsRefused):
        resolve_at(1, CAROL)

    # Bob and Carol at the same moment on two replicas each: one success per responder.
    grant = obtain_ticket(cluster.client(1), ini, DesiredPolicy(responders=(BOB, CAROL)))
    calls = []
    for who in (BOB, CAROL, BOB, CAROL):
        ti, _ = ini.transfer_init(grant, time.time(), who, [CryptoSession(1, 8)])
        wire, _ = cluster.responder(who).receive_transfer_init(ti, time.time())
        calls.append(wire)
    clients = [cluster.client(i) for i in (0, 1, 2, 0)]
    res = send_at_once(
        [lambda c=c, w=w: c.resolve_ticket(w) for c, w in zip(clients, calls, strict=True)]
    )
    assert sum(isinstance(r, bytes) for r in (res[0], res[2])) == 1, res
    assert sum(isinstance(r, bytes) for r in (res[1], res[3])) == 1, res


def test_rate_limit_holds_cluster_wide(cluster: Cluster) -> None:
    """Three replicas, each with a local limiter, would admit 3 bursts; the shared bucket
    admits one burst plus the rate over the elapsed time."""
    per_replica = 50
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(3)

    def hammer(i: int) -> None:
        client = cluster.client(i)
        ini = cluster.initiator(FRANK)
        msgs = [
            ini.request_ticket(DesiredPolicy(responders=(BOB,)), time.time())[0]
            for _ in range(per_replica)
        ]
        barrier.wait()
        for wire in msgs:
            try:
                client.request_ticket(wire)
                key = "ok"
            except KmsRefused as exc:
                key = exc.code.name
            with lock:
                outcomes[key] += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    burst = 2 * RATE
    assert set(outcomes) <= {"ok", "RESOURCE_EXHAUSTED"}, outcomes
    assert outcomes["ok"] >= min(burst, 3 * per_replica) - 1, outcomes
    assert outcomes["ok"] <= burst + RATE * elapsed + 2, (outcomes, elapsed)
    assert outcomes["RESOURCE_EXHAUSTED"] > 0


def test_provisioning_through_one_replica_is_honoured_by_the_others(cluster: Cluster) -> None:
    heidi, heidi_psk = b"sip:heidi@example.org", bytes.fromhex("4e" * 16)
    homes = cluster.homes
    # An endpoint added through replica 2's home ...
    run_kms(homes[1], "endpoint", "add", heidi.decode(), "--psk-hex", heidi_psk.hex())
    ini = Initiator(Credentials(heidi, heidi_psk, KMS_ID), cluster.ks)

    def heidi_gets_a_ticket(i: int) -> bool:
        try:
            obtain_ticket(cluster.client(i), ini, DesiredPolicy(responders=(BOB,)))
        except KmsRefused:
            return False
        return True

    for i in (2, 0):
        eventually(lambda i=i: heidi_gets_a_ticket(i), 2.0, f"new endpoint on replica {i}")

    # ... a group member removed through replica 3's home ...
    alice = cluster.initiator(ALICE)
    grant = obtain_ticket(cluster.client(0), alice, DesiredPolicy(responders=(TEAM,)))
    run_kms(homes[2], "group", "remove", TEAM.decode(), CAROL.decode())
    try:

        def carol_refused(i: int) -> bool:
            ti, _ = alice.transfer_init(grant, time.time(), TEAM, [CryptoSession(1, 9)])
            try:
                resolve(cluster.client(i), cluster.responder(CAROL), ti)
            except KmsRefused as exc:
                seen.append(exc.code)
                return True
            return False

        seen: list[grpc.StatusCode] = []
        for i in (0, 1):
            eventually(lambda i=i: carol_refused(i), 2.0, f"removed member on replica {i}")
        assert seen == [grpc.StatusCode.PERMISSION_DENIED] * 2, seen
    finally:
        run_kms(homes[2], "group", "add", TEAM.decode(), CAROL.decode())

    # ... and a TPK rotated and the old one retired through the first home.
    old = obtain_ticket(cluster.client(1), alice, DesiredPolicy(responders=(BOB,), flags=REUSABLE))
    run_kms(homes[0], "tpk", "rotate")
    ti, _ = alice.transfer_init(old, time.time(), BOB, [CryptoSession(1, 10)])
    resolve(cluster.client(2), cluster.responder(BOB), ti)  # the old TPK is still active
    versions = [line.split()[0] for line in run_kms(homes[0], "tpk", "list").stdout.splitlines()]
    old_version = min(int(v) for v in versions if v.isdigit())
    run_kms(homes[1], "tpk", "retire", str(old_version))

    def old_ticket_refused(i: int) -> bool:
        ti, _ = alice.transfer_init(old, time.time(), BOB, [CryptoSession(1, 11)])
        try:
            resolve(cluster.client(i), cluster.responder(BOB), ti)
        except KmsRefused as exc:
            refusals.append(exc.code)
            return True
        return False

    refusals: list[grpc.StatusCode] = []
    for i in range(3):
        eventually(lambda i=i: old_ticket_refused(i), 2.0, f"retired TPK on replica {i}")
    assert len(refusals) == 3 and set(refusals) <= REFUSED, refusals
    # New tickets (under the new TPK) issued by one replica resolve at another.
    new = obtain_ticket(cluster.client(0), alice, DesiredPolicy(responders=(BOB,)))
    ti, pending = alice.transfer_init(new, time.time(), BOB, [CryptoSession(1, 12)])
    call = resolve(cluster.client(2), cluster.responder(BOB), ti)
    state = alice.establish(pending, call.transfer_resp, time.time())
    check_srtp(state.srtp[0], call.srtp[0])


def test_revocation_through_one_replica_is_enforced_by_every_replica(cluster: Cluster) -> None:
    """`kms revoke` through one replica's home: the others refuse at once (the revocation
    write bumps the registry generation, so no replica answers from a stale cache)."""
    homes = cluster.homes
    erin = cluster.initiator(ERIN)
    grant = obtain_ticket(cluster.client(0), erin, DesiredPolicy(responders=(BOB,), flags=REUSABLE))
    tid = ticket_id(grant.ticket.ticket_data)
    cs = iter(range(100, 200))

    def resolves(i: int, g: TicketGrant) -> grpc.StatusCode | None:
        ti, _ = erin.transfer_init(g, time.time(), BOB, [CryptoSession(1, next(cs))])
        try:
            resolve(cluster.client(i), cluster.responder(BOB), ti)
        except KmsRefused as exc:
            return exc.code
        return None

    assert all(resolves(i, grant) is None for i in range(3))
    run_kms(homes[1], "revoke", "ticket", tid)
    for i in range(3):
        eventually(lambda i=i: resolves(i, grant) is not None, 2.0, f"revoked on replica {i}")
    assert resolves(2, grant) is grpc.StatusCode.PERMISSION_DENIED

    run_kms(homes[2], "revoke", "suspend", ERIN.decode())
    try:

        def erin_refused(i: int) -> bool:
            try:
                obtain_ticket(cluster.client(i), erin, DesiredPolicy(responders=(BOB,)))
            except KmsRefused as exc:
                return exc.code is grpc.StatusCode.PERMISSION_DENIED
            return False

        for i in range(3):
            eventually(lambda i=i: erin_refused(i), 2.0, f"suspended on replica {i}")
    finally:
        run_kms(homes[0], "revoke", "resume", ERIN.decode())
    eventually(lambda: not erin_refused(1), 2.0, "resumed on replica 1")
    listed = run_kms(homes[0], "revoke", "list").stdout
    assert tid in listed and ERIN.decode() not in listed


def test_kms_call_with_several_addresses_skips_a_dead_one(cluster: Cluster) -> None:
    dead = f"127.0.0.1:{free_port()}"
    r = run_kms(
        cluster.homes[1], "call", "--target", f"{dead},{cluster.target(0)},{cluster.target(2)}",
        "--identity", GRACE.decode(), "--psk-hex", cluster.creds(GRACE).psk.hex(),
        "--to", BOB.decode(), "--resolve-as", BOB.decode(),
        "--resolve-psk-hex", cluster.creds(BOB).psk.hex(),
    )
    assert "ticket granted by" in r.stdout, r.stdout + r.stderr


HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"


def test_haproxy_balances_calls_and_skips_a_replica_taken_down(
    cluster: Cluster, tmp_path: Path
) -> None:
    haproxy = shutil.which("haproxy")
    assert haproxy, "haproxy is required (scripts/test-services.sh)"
    port, stats = free_port(), free_port()
    env = {
        **os.environ,
        "KMS_FRONTEND": f"127.0.0.1:{port}",
        "KMS_STATS": f"127.0.0.1:{stats}",
        "KMS_REPLICA_1": cluster.target(0),
        "KMS_REPLICA_2": cluster.target(1),
        "KMS_REPLICA_3": cluster.target(2),
        "KMS_CHECK_INTER": "300ms",
    }
    check = subprocess.run([haproxy, "-c", "-f", str(HAPROXY_CFG)], env=env,
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    log = (tmp_path / "haproxy.log").open("wb")
    proc = subprocess.Popen([haproxy, "-db", "-f", str(HAPROXY_CFG)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        client = KmsClient(f"127.0.0.1:{port}", timeout=10)
        ini = cluster.initiator(GRACE)
        eventually(lambda: _grant_ok(client, ini), 10.0, "haproxy forwards calls")
        before = _served_counts(cluster)
        for _ in range(9):  # ONE client connection: HAProxy spreads its calls
            obtain_ticket(client, ini, DesiredPolicy(responders=(BOB,)))
        after = _served_counts(cluster)
        moved = [a - b for a, b in zip(after, before, strict=True)]
        assert sum(1 for m in moved if m > 0) >= 2, moved  # per call, not per connection

        cluster.kill(1)  # replica 2 taken down
        try:
            failures = 0
            codes: list[grpc.StatusCode] = []
            for _ in range(12):
                try:
                    obtain_ticket(client, ini, DesiredPolicy(responders=(BOB,)))
                except KmsRefused as exc:  # the calls in flight when it went down
                    codes.append(exc.code)
                    failures += 1
                time.sleep(0.1)
            assert failures <= 2 and set(codes) <= {grpc.StatusCode.UNAVAILABLE}, codes
            # Once the health check has marked it down, every call succeeds.
            for _ in range(8):
                obtain_ticket(client, ini, DesiredPolicy(responders=(BOB,)))
        finally:
            cluster.start(1).wait_ready(60)
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _grant_ok(client: KmsClient, ini: Initiator) -> bool:
    try:
        obtain_ticket(client, ini, DesiredPolicy(responders=(BOB,)))
    except KmsRefused:
        return False
    return True


def _served_counts(cluster: Cluster) -> list[int]:
    """Issued tickets per replica, from each replica's own audit log."""
    out = []
    for home in cluster.homes:
        path = home / "audit.log"
        text = path.read_text() if path.exists() else ""
        out.append(text.count('"ticket.issued"'))
    return out


def _load(
    cluster: Cluster, stop: threading.Event, who: bytes, grants: list[TicketGrant],
    errors: list[BaseException], client: KmsClient,
) -> None:
    ini = cluster.initiator(who)
    while not stop.is_set():
        try:
            grants.append(obtain_ticket(client, ini, DesiredPolicy(responders=(BOB,),
                                                                   flags=REUSABLE)))
        except BaseException as exc:
            errors.append(exc)
        time.sleep(1.5 / RATE)  # under the cluster's per-identity rate limit


def test_sigkill_of_a_replica_under_load(cluster: Cluster) -> None:
    stop = threading.Event()
    grants: list[TicketGrant] = []
    errors: list[BaseException] = []
    client = cluster.client(None)  # all three, round robin, retry on another replica
    assert client.retries == 2
    threads = [
        threading.Thread(target=_load, args=(cluster, stop, who, grants, errors, client))
        for who in (ALICE, ERIN, GRACE)
    ]
    for t in threads:
        t.start()
    try:
        eventually(lambda: len(grants) >= 10, 30.0, "load running")
        cluster.kill(2)  # SIGKILL, mid-call for some
        n = len(grants)
        eventually(lambda: len(grants) >= n + 15, 30.0, "load carrying on")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == [], errors[:3]
    # Every ticket a client received verifies (obtain_ticket checked it) and resolves.
    bob = cluster.responder(BOB)
    for g in grants:
        ti, _ = cluster.initiator(ALICE).transfer_init(g, time.time(), BOB, [CryptoSession(1, 3)])
        resolve(client, bob, ti)
    # The killed replica restarts (no init, same home) and serves again.
    # (A channel to its address may still sit in its reconnect backoff for a moment.)
    cluster.start(2).wait_ready(60)
    c2, alice = cluster.client(2), cluster.initiator(ALICE)
    eventually(lambda: _grant_ok(c2, alice), 10.0, "the restarted replica serves")
    before = _served_counts(cluster)[2]
    for _ in range(6):
        obtain_ticket(client, alice, DesiredPolicy(responders=(BOB,)))
    assert _served_counts(cluster)[2] > before  # back in the round robin of the clients


def health(target: str, service: str) -> str:
    with grpc.insecure_channel(target) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


def test_postgresql_stopped_under_load(cluster: Cluster) -> None:
    client = cluster.client(None)
    ini = cluster.initiator(ERIN)
    accepted, _ = ini.request_ticket(DesiredPolicy(responders=(BOB,)), time.time())
    client.request_ticket(accepted)

    codes: Counter[str] = Counter()
    stop = threading.Event()

    def load(i: int) -> None:
        c = cluster.client(i, timeout=15)
        me = cluster.initiator((ALICE, GRACE, CAROL)[i])  # each well under the rate limit
        while not stop.is_set():
            try:
                obtain_ticket(c, me, DesiredPolicy(responders=(BOB,)))
                codes["OK"] += 1
            except KmsRefused as exc:
                codes[exc.code.name] += 1
            time.sleep(1.5 / RATE)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        cluster.pg.stop()
        try:
            time.sleep(1.0)
            down = Counter(codes)
            # An accepted message sent again while the database is gone: never accepted.
            with pytest.raises(KmsRefused) as info:
                cluster.client(0, timeout=15).request_ticket(accepted)
            assert info.value.code is grpc.StatusCode.UNAVAILABLE
            # Readiness: the KMS service leaves the load balancer's rotation within a probe
            # (5 s); the process stays live.
            eventually(lambda: health(cluster.target(0), SERVICE_NAME) == "NOT_SERVING",
                       15.0, "readiness NOT_SERVING while PostgreSQL is down")
            assert health(cluster.target(0), "") == "SERVING"
        finally:
            cluster.pg.start()
        during = codes - down
        assert during["UNAVAILABLE"] > 0, codes
        # Recovery without a restart: ready again, and every replica answers again.
        eventually(lambda: health(cluster.target(0), SERVICE_NAME) == "SERVING",
                   15.0, "readiness SERVING once PostgreSQL is back")
        for i in range(3):
            eventually(lambda i=i: _grant_ok(cluster.client(i), cluster.initiator(ERIN)),
                       30.0, f"replica {i} after PostgreSQL came back")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes  # never INTERNAL, never anything else
    # Nothing lost: the message accepted before the outage is still a replay.
    with pytest.raises(KmsRefused) as info:
        cluster.client(1).request_ticket(accepted)
    assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert all(s is not None and s.proc.poll() is None for s in cluster.serves)
