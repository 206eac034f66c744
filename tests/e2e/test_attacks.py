"""Attacks on a running `kms serve`, each reproduced from outside as an attacker would try
it, and named after the attack (the regression tests of the hardening pass)."""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hsm.software import SoftwareKeyStore
from kms.endpoint.client import KmsClient, KmsRefused, obtain_ticket
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DesiredPolicy, Initiator
from kms.home import open_home
from kms.mikey.constants import DataType, IdType
from kms.mikey.message import Message
from kms.mikey.payloads import Error, Verification
from kms.server.grpc_server import SERVICE_NAME
from tests.e2e.harness import (
    ALICE,
    BOB,
    CAROL,
    ERIN,
    KMS_ID,
    PSKS,
    Kms,
    make_home,
    running_kms,
    set_policy,
)

UNKNOWN = b"sip:nobody@example.org"


def answer(client: KmsClient, wire: bytes) -> tuple[grpc.StatusCode, str, int, bool]:
    """(status, detail, MIKEY error number, whether the error message carries a V)."""
    with pytest.raises(KmsRefused) as info:
        client.request_ticket(wire)
    r = info.value
    assert r.error_message is not None
    err = Message.decode(r.error_message)
    assert err.data_type == DataType.ERROR
    return r.code, r.detail, err.one(Error).error_no, err.first(Verification) is not None


def forged(kms: Kms, who: bytes, sent: float) -> bytes:
    """A REQUEST_INIT_PSK from ``who`` with timestamp ``sent`` and a MAC that cannot verify
    (the attacker does not know the PSK: a random one)."""
    ini = Initiator(Credentials(who, bytes(range(16)), KMS_ID, IdType.URI), kms.ks)
    wire, _ = ini.request_ticket(DesiredPolicy(responders=(BOB,)), sent)
    return wire


def test_attack_registration_oracle(kms: Kms) -> None:
    """A forged REQUEST_INIT gets the same answer for a registered and an unknown identity,
    whatever its timestamp: the timestamp is only judged after the MAC has verified."""
    c = kms.client()
    now = time.time()
    for sent in (now - 1000, now + 1000, now):
        registered = answer(c, forged(kms, CAROL, sent))
        unknown = answer(c, forged(kms, UNKNOWN, sent))
        assert registered == unknown, (sent - now, registered, unknown)
        assert registered == (grpc.StatusCode.UNAUTHENTICATED, "authentication failed", 0, False)
    # The audit log keeps the real reasons apart (the operator may know).
    reasons = [
        json.loads(line).get("reason") for line in (kms.home / "audit.log").read_text().splitlines()
    ]
    assert "unknown identity" in reasons and "MAC verification failed" in reasons


def test_registration_oracle_keeps_timestamp_check_after_mac(kms: Kms) -> None:
    """With the right key, a stale message is still refused as Invalid TS (after the MAC)."""
    c = kms.client()
    stale, _ = kms.initiator(CAROL).request_ticket(
        DesiredPolicy(responders=(BOB,)), time.time() - 1000
    )
    code, _detail, error_no, has_v = answer(c, stale)
    assert (code, error_no, has_v) == (grpc.StatusCode.FAILED_PRECONDITION, 1, True)


def test_dummy_key_is_in_the_token_and_not_an_endpoint(kms: Kms) -> None:
    with open_home(kms.home) as h:
        labels = {k.label for k in h.keystore().list_keys()}
        assert "authn/dummy" in labels
        assert h.registry.find_endpoint(b"authn/dummy") is None


# ------------------------------------------------------------------------------------------
# stalled calls: HEADERS without the request message, no deadline

OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


class StalledCalls:
    """Keeps ``count`` RequestTicket calls open on ONE connection that never send their
    request message (HEADERS only, no deadline); a call the server ends is re-opened at
    once, as the attacker would."""

    def __init__(self, target: str, count: int) -> None:
        self.channel = grpc.insecure_channel(target, options=list(OWN_CONNECTION))
        self.method = self.channel.stream_unary(f"/{SERVICE_NAME}/RequestTicket")
        self.stop = threading.Event()
        self.ended: collections.Counter[grpc.StatusCode] = collections.Counter()
        self._lock = threading.Lock()
        self.open = 0
        self.details: set[str] = set()
        for _ in range(count):
            self._open()

    def _never(self) -> Iterator[Any]:
        self.stop.wait()
        return
        yield  # a generator that never yields a request

    def _open(self) -> None:
        with self._lock:
            self.open += 1
        future = self.method.future(self._never())
        future.add_done_callback(self._done)

    def _done(self, future: Any) -> None:
        with self._lock:
            self.open -= 1
            self.ended[future.code()] += 1
            self.details.add(str(future.details()))
        if not self.stop.is_set():
            self._open()

    def close(self) -> None:
        self.stop.set()
        self.channel.close()


def test_attack_stalled_calls_lock_out_everyone(kms: Kms) -> None:
    """300 stalled calls on one connection, re-opened as soon as they end (more than the
    128 a worker admits): a victim on its own connection and the health check are still
    served, each within 2 s, and the server ends the stalled calls and logs it."""
    attack = StalledCalls(kms.target, 300)
    try:
        time.sleep(1.0)  # the attack is in place
        victim = KmsClient(kms.target, timeout=2.0, options=OWN_CONNECTION)
        try:
            for _ in range(5):
                t0 = time.monotonic()
                obtain_ticket(victim, kms.initiator(ERIN), DesiredPolicy(responders=(BOB,)))
                assert time.monotonic() - t0 < 2.0
                with grpc.insecure_channel(kms.target, options=list(OWN_CONNECTION)) as ch:
                    status = health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=2.0
                    )
                assert status.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            victim.close()
        deadline = time.monotonic() + 30
        while sum(attack.ended.values()) < 300 and time.monotonic() < deadline:
            time.sleep(0.1)
        ended = dict(attack.ended)
    finally:
        attack.close()
    # Every stalled call was ended by the server: cancelled (no request in time, or shed)
    # or refused as a stream over the connection's limit (REFUSED_STREAM: UNAVAILABLE).
    assert sum(ended.values()) >= 300, (ended, attack.details)
    assert grpc.StatusCode.CANCELLED in ended, (ended, attack.details)
    assert set(ended) <= {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}, ended
    # Logged, rate-limited: a few lines, not one per cancelled call.
    lines = [ln for ln in kms.serve.stderr.splitlines() if "call cancelled" in ln]
    assert lines and len(lines) < 20, len(lines)


# ------------------------------------------------------------------------------------------
# bodies that are not protobuf at all


def test_attack_non_protobuf_body(kms: Kms) -> None:
    """``ff ff ff`` as the body: INVALID_ARGUMENT with a one-line detail (not INTERNAL and a
    traceback), a MIKEY error message, one audit record per call, and at most one log line
    for many such calls."""
    audit = kms.home / "audit.log"
    before = len(audit.read_text().splitlines())
    with grpc.insecure_channel(kms.target, options=list(OWN_CONNECTION)) as ch:
        for method in ("RequestTicket", "ResolveTicket"):
            raw = ch.unary_unary(f"/{SERVICE_NAME}/{method}")
            for _ in range(10):
                with pytest.raises(grpc.RpcError) as info:
                    raw(b"\xff\xff\xff", timeout=5)
                err = info.value
                assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, err
                assert err.details() == "request is not a mikey.kms.v1.MikeyMessage"
                trailer = dict(err.trailing_metadata() or ())["mikey-error-bin"]
                assert Message.decode(trailer).one(Error).error_no == 12  # Unspecified
    records = [json.loads(x) for x in audit.read_text().splitlines()[before:]]
    refused = [r for r in records if r.get("reason") == "request body is not a transport message"]
    assert len(refused) == 20 and all(r["outcome"] == "malformed" for r in refused)
    assert all(r["size"] == 3 for r in refused)
    stderr = kms.serve.stderr
    assert "Exception deserializing" not in stderr and "Traceback" not in stderr
    assert 1 <= stderr.count("request body is not a MikeyMessage") <= 2


# ------------------------------------------------------------------------------------------
# replay cache full of live entries


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kms]:
    home = make_home(tmp_path_factory.mktemp("e2e-replay") / "home", {ALICE: PSKS[ALICE]}, {})
    set_policy(home, replay_cache_size=20, rate_limit_per_s=0, max_bytes=4096, keep=2)
    with running_kms(home) as k:
        yield k


def test_attack_replay_cache_eviction(small_cache: Kms) -> None:
    """More fresh messages than the replay cache holds: the excess is refused
    (RESOURCE_EXHAUSTED, retry later), and a replay of an accepted message is still refused
    as a replay (before, its digest had been evicted and the replay was accepted)."""
    c = small_cache.client()
    ini = small_cache.initiator(ALICE)
    first = []
    for _ in range(10):
        wire, _ = ini.request_ticket(DesiredPolicy(responders=(BOB,)), time.time())
        c.request_ticket(wire)
        first.append(wire)
    codes: collections.Counter[grpc.StatusCode] = collections.Counter()
    details = set()
    for _ in range(30):
        wire, _ = ini.request_ticket(DesiredPolicy(responders=(BOB,)), time.time())
        try:
            c.request_ticket(wire)
            codes[grpc.StatusCode.OK] += 1
        except KmsRefused as exc:
            codes[exc.code] += 1
            details.add(exc.detail)
    assert codes == {grpc.StatusCode.OK: 10, grpc.StatusCode.RESOURCE_EXHAUSTED: 20}
    assert details == {"server busy, retry later"}
    for wire in first:
        code, detail, error_no, has_v = answer(c, wire)
        assert (code, detail, error_no, has_v) == (
            grpc.StatusCode.FAILED_PRECONDITION, "replayed message", 1, True,
        )  # fmt: skip
    assert "replay cache full of live entries" in small_cache.serve.stderr


# ------------------------------------------------------------------------------------------
# audit amplification


def test_attack_audit_amplification(kms: Kms) -> None:
    """An unregistered 60,000-byte IDRi is not copied into the refusal's audit record:
    what an unauthenticated call writes is bounded (under 1 KiB here, against 60 KB)."""
    audit = kms.home / "audit.log"
    huge = b"sip:" + b"a" * 59_984 + b"@example.org"  # 60,000 bytes
    c = kms.client()
    before = audit.stat().st_size
    for _ in range(10):
        wire = forged(kms, huge, time.time())
        assert len(wire) > 60_000
        assert answer(c, wire)[0] is grpc.StatusCode.UNAUTHENTICATED
    written = audit.stat().st_size - before
    assert written < 10 * 1024, written
    last = json.loads(audit.read_text().splitlines()[-1])
    assert last["reason"] == "unknown identity"
    assert last["sender"].startswith("sip:aaaa") and "60000 bytes, sha256:" in last["sender"]
    assert len(last["sender"]) < 160


def test_audit_log_rotates_under_kms_serve(small_cache: Kms) -> None:
    """[audit] max_bytes: the log of a running KMS is rotated and stays bounded."""
    c = small_cache.client()
    for _ in range(60):
        with pytest.raises(KmsRefused):
            c.request_ticket(forged(small_cache, b"sip:x" * 100, time.time()))
    home = small_cache.home
    assert (home / "audit.log.1").exists() and (home / "audit.log.2").exists()
    assert not (home / "audit.log.3").exists()  # keep = 2
    for name in ("audit.log", "audit.log.1", "audit.log.2"):
        assert (home / name).stat().st_size < 4096 + 2048


def test_replay_is_refused_after_a_restart(tmp_path: Any) -> None:
    """The replay cache outlives the process (RFC 3830 5.4: an accepted message is
    remembered for its whole acceptance window): the same REQUEST_INIT sent again to a
    restarted KMS is refused as a replay, not answered with a second ticket."""
    home = make_home(tmp_path / "home", {ALICE: PSKS[ALICE]}, {})
    wire, _ = Initiator(Credentials(ALICE, PSKS[ALICE], KMS_ID, IdType.URI),
                        SoftwareKeyStore()).request_ticket(DesiredPolicy((BOB,)), time.time())
    with running_kms(home) as k:
        k.client().request_ticket(wire)
    with running_kms(home) as k:
        assert answer(k.client(), wire) == (
            grpc.StatusCode.FAILED_PRECONDITION, "replayed message", 1, True,
        )  # fmt: skip
