"""SIGTERM while clients load the KMS: every response a client received is complete and
verifies; the server drains and exits 0, then serves again from the same home."""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from kms.endpoint.client import KmsClient, KmsRefused, run_call
from kms.endpoint.initiator import DesiredPolicy, Initiator, PendingRequest
from kms.mikey.constants import DataType
from kms.mikey.message import Message
from kms.mikey.ticket import TpFlag
from tests.e2e.harness import (
    ALICE,
    BOB,
    CAROL,
    ERIN,
    FRANK,
    GRACE,
    PSKS,
    TEAM,
    Kms,
    check_srtp,
    make_home,
    run_kms,
    set_policy,
    start_serve,
)

LOADERS = (ALICE, CAROL, ERIN, FRANK, GRACE)
FORKING = TpFlag.E | TpFlag.F | TpFlag.G | TpFlag.H | TpFlag.I


@dataclass
class Load:
    ok: list[tuple[Initiator, PendingRequest, bytes, float]] = field(default_factory=list)
    refused: list[grpc.StatusCode] = field(default_factory=list)


def _loader(kms: Kms, who: bytes, load: Load, stop: threading.Event, lock: threading.Lock) -> None:
    ini = kms.initiator(who)
    failures = 0
    with KmsClient(kms.target, timeout=10) as client:
        while not stop.is_set() and failures < 3:
            now = time.time()
            wire, pending = ini.request_ticket(DesiredPolicy(responders=(BOB,)), now)
            try:
                data = client.request_ticket(wire)
            except KmsRefused as exc:
                with lock:
                    load.refused.append(exc.code)
                failures += 1
                time.sleep(0.05)
                continue
            with lock:
                load.ok.append((ini, pending, data, now))


def test_sigterm_under_load_loses_nothing_and_restart_keeps_endpoints(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    set_policy(home, rate_limit_per_s=0)  # unlimited: this test is about load, not rates
    serve = start_serve(home, "--grace", "10", "--threads", "8")
    kms = Kms(home, serve)
    try:
        load, stop, lock = Load(), threading.Event(), threading.Lock()
        threads = [
            threading.Thread(target=_loader, args=(kms, w, load, stop, lock)) for w in LOADERS
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while len(load.ok) < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(load.ok) >= 100, (load.refused, serve.stderr)
        t0 = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        rc = serve.proc.wait(30)
        drain_s = time.monotonic() - t0
        time.sleep(0.3)  # let the loaders see the closed port
        stop.set()
        for t in threads:
            t.join(30)
        assert rc == 0, serve.stderr
        assert drain_s < 10
    finally:
        stop.set()
        serve.kill()

    # Every response a client received OK is a complete REQUEST_RESP that verifies.
    for ini, pending, data, now in load.ok:
        assert Message.decode(data).data_type == DataType.REQUEST_RESP
        grant = ini.accept_ticket(pending, data, now)
        assert grant.session_keys
    # After SIGTERM, calls get no response at all: UNAVAILABLE (refused, port closed) or
    # CANCELLED (accepted by gRPC but cut off before a handler ran); never a broken one.
    assert set(load.refused) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    assert load.refused, "the loaders never saw the server go away"
    logs = [json.loads(ln) for ln in serve.stderr.splitlines() if ln.startswith("{")]
    assert any(e["msg"] == "stopping" and e.get("signal") == "SIGTERM" for e in logs)
    assert any(e["msg"] == "stopped" and e.get("clean") is True for e in logs)
    issued = sum(
        1 for ln in (home / "audit.log").read_text().splitlines()
        if json.loads(ln).get("event") == "ticket.issued"
    )  # fmt: skip
    # No completed response was lost: every ticket the KMS issued reached its client (a
    # call counts as in flight until gRPC has sent its response, and drain waits for it).
    assert issued == len(load.ok)

    # Endpoints intact on disk, and the same home serves again.
    listed = json.loads(run_kms(home, "endpoint", "list", "--json").stdout)
    assert {e["identity"] for e in listed} == {i.decode() for i in PSKS}
    groups = json.loads(run_kms(home, "group", "list", "--json").stdout)
    assert groups == [{"group": TEAM.decode(), "members": [BOB.decode(), CAROL.decode()]}]
    again = start_serve(home)
    kms2 = Kms(home, again)
    try:
        call = run_call(kms2.client(), kms2.initiator(ALICE), kms2.client(), kms2.responder(BOB))
        check_srtp(call.initiator.srtp[0], call.responder.srtp[0])
        forked = run_call(kms2.client(), kms2.initiator(ERIN), kms2.client(),
                          kms2.responder(CAROL), to=TEAM,
                          desired=DesiredPolicy(responders=(TEAM,), flags=FORKING))  # fmt: skip
        check_srtp(forked.initiator.srtp[0], forked.responder.srtp[0])
    finally:
        kms2.close_clients()
        assert again.terminate() == 0, again.stderr
