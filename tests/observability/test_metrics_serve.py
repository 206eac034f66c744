"""`/metrics` of a running `kms serve --workers 2`: every family counts what the calls made
over real gRPC did, the two workers' counters add up, the exposition passes `promtool check
metrics` while calls run, and no identity, ticket id or correlation id becomes a label."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from kms.endpoint.client import KmsClient, KmsRefused, obtain_ticket, resolve, run_call
from kms.endpoint.initiator import DesiredPolicy
from kms.endpoint.session import CryptoSession
from kms.mikey.ticket import TpFlag
from tests.e2e.harness import ALICE, BOB, CAROL, ERIN, FRANK, GRACE, MALLORY, TEAM, run_kms
from tests.observability.conftest import Observed
from tests.observability.helpers import has, promtool, samples, scrape, value

FORKING = TpFlag.E | TpFlag.F | TpFlag.G | TpFlag.H | TpFlag.I
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


def fresh_client(o: Observed) -> KmsClient:
    """A client with a connection of its own (SO_REUSEPORT spreads connections, not calls)."""
    c = KmsClient(o.kms.target, timeout=10, options=OWN_CONNECTION)
    o.kms._clients.append(c)
    return c


def calls_ok(s: dict, method: str) -> float:  # type: ignore[type-arg]
    return value(s, "kms_calls_total", method=method, outcome="ok")


def per_worker_calls(home: Path) -> dict[str, float]:
    """RequestTicket OK calls per worker pid, read from each worker's multiprocess file."""
    out: dict[str, float] = {}
    for f in sorted((home / "state" / "metrics-mp").glob("counter_*.db")):
        pid = f.stem.split("_", 1)[1]
        total = 0.0
        for fam in MultiProcessCollector.merge([str(f)], accumulate=True):  # type: ignore[no-untyped-call]
            for smp in fam.samples:
                if (smp.name == "kms_calls_total" and smp.labels.get("method") == "RequestTicket"
                        and smp.labels.get("outcome") == "ok"):
                    total += smp.value
        out[pid] = total
    return out


def test_calls_counted_and_workers_add_up(observed: Observed) -> None:
    o = observed
    before = samples(scrape(o.metrics_port))
    n = 16
    for _ in range(n):
        run_call(fresh_client(o), o.kms.initiator(ALICE), fresh_client(o), o.kms.responder(BOB))
    after = samples(scrape(o.metrics_port))
    assert calls_ok(after, "RequestTicket") - calls_ok(before, "RequestTicket") == n
    assert calls_ok(after, "ResolveTicket") - calls_ok(before, "ResolveTicket") == n
    d_local = value(after, "kms_resolves_total", path="local", result="ok") - value(
        before, "kms_resolves_total", path="local", result="ok")
    assert d_local == n
    d_tickets = value(after, "kms_tickets_issued_total", key_type="tgk", forking="false") - value(
        before, "kms_tickets_issued_total", key_type="tgk", forking="false")
    assert d_tickets == n
    assert value(after, "kms_call_duration_seconds_count", method="RequestTicket") - value(
        before, "kms_call_duration_seconds_count", method="RequestTicket") == n
    # The token did work for every exchange, and answered.
    assert value(after, "kms_token_operation_duration_seconds_count") - value(
        before, "kms_token_operation_duration_seconds_count") >= 4 * n
    assert value(after, "kms_token_up") == 1
    # Two workers served, and what /metrics shows is the sum of their own counts.
    workers = per_worker_calls(o.kms.home)
    assert len(workers) == 2, workers
    assert all(v > 0 for v in workers.values()), workers
    assert sum(workers.values()) == calls_ok(after, "RequestTicket")


def test_refusals_by_status_and_mikey_error(observed: Observed) -> None:
    o = observed
    before = samples(scrape(o.metrics_port))
    # A resolve by someone the ticket does not name: PERMISSION_DENIED, ERR 7 (Invalid ID).
    ini = o.kms.initiator(ALICE)
    grant = obtain_ticket(fresh_client(o), ini, DesiredPolicy(responders=(BOB,)))
    ti, _ = ini.transfer_init(grant, time.time(), BOB, (CryptoSession(1, 0x1234),))
    with pytest.raises(KmsRefused) as denied:
        resolve(fresh_client(o), o.kms.responder(MALLORY), ti)
    assert denied.value.code is grpc.StatusCode.PERMISSION_DENIED
    # The same REQUEST_INIT twice: the second is a replay (FAILED_PRECONDITION, ERR 1).
    wire, _ = o.kms.initiator(ERIN).request_ticket(DesiredPolicy(responders=(BOB,)), time.time())
    client = fresh_client(o)
    client.request_ticket(wire)
    with pytest.raises(KmsRefused) as replay:
        client.request_ticket(wire)
    assert replay.value.code is grpc.StatusCode.FAILED_PRECONDITION
    # A wrong PSK: UNAUTHENTICATED.
    with pytest.raises(KmsRefused) as unauth:
        obtain_ticket(fresh_client(o), o.kms.initiator(FRANK).__class__(
            o.kms.creds(FRANK, b"\x00" * 24), o.kms.ks), DesiredPolicy(responders=(BOB,)))
    assert unauth.value.code is grpc.StatusCode.UNAUTHENTICATED
    # Not even MIKEY: INVALID_ARGUMENT.
    with pytest.raises(KmsRefused) as garbage:
        fresh_client(o).request_ticket(b"\x01not mikey")
    assert garbage.value.code is grpc.StatusCode.INVALID_ARGUMENT
    after = samples(scrape(o.metrics_port))

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("kms_calls_total", method="ResolveTicket", outcome="denied",
                 code="PERMISSION_DENIED", mikey_error="7") == 1
    assert delta("kms_resolves_total", path="local", result="refused") == 1
    assert delta("kms_calls_total", method="RequestTicket", outcome="precondition",
                 code="FAILED_PRECONDITION", mikey_error="1") == 1
    assert delta("kms_replay_refusals_total") == 1
    assert delta("kms_calls_total", method="RequestTicket", code="UNAUTHENTICATED") == 1
    assert delta("kms_calls_total", method="RequestTicket", code="INVALID_ARGUMENT") == 1
    assert delta("kms_rate_limit_refusals_total") == 0


def test_forking_ticket_and_rate_limit(observed: Observed) -> None:
    o = observed
    before = samples(scrape(o.metrics_port))
    run_call(fresh_client(o), o.kms.initiator(ALICE), fresh_client(o), o.kms.responder(CAROL),
             desired=DesiredPolicy(responders=(TEAM,), flags=FORKING), to=TEAM)
    # [policy] rate_limit_per_s is 50 per identity (per worker): four threads on one
    # connection (one worker) send Mallory's requests faster than the bucket refills.
    client = fresh_client(o)
    ini = o.kms.initiator(MALLORY)
    lock = threading.Lock()
    counts = {"limited": 0, "sent": 0}
    codes: set[grpc.StatusCode] = set()

    def send() -> None:
        while True:
            with lock:
                if (counts["limited"] > 0 and counts["sent"] >= 120) or counts["sent"] >= 600:
                    return
                counts["sent"] += 1
                wire, _ = ini.request_ticket(DesiredPolicy(responders=(BOB,)), time.time())
            try:
                client.request_ticket(wire)
            except KmsRefused as exc:
                with lock:
                    codes.add(exc.code)
                    counts["limited"] += 1

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    limited = counts["limited"]
    assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert limited > 0
    after = samples(scrape(o.metrics_port))
    assert value(after, "kms_tickets_issued_total", forking="true") - value(
        before, "kms_tickets_issued_total", forking="true") == 1
    assert value(after, "kms_rate_limit_refusals_total", scope="identity") - value(
        before, "kms_rate_limit_refusals_total", scope="identity") == limited
    assert value(after, "kms_calls_total", code="RESOURCE_EXHAUSTED") - value(
        before, "kms_calls_total", code="RESOURCE_EXHAUSTED") == limited


def test_no_identity_ticket_or_correlation_id_in_exposition(observed: Observed) -> None:
    o = observed
    run_call(fresh_client(o), o.kms.initiator(ALICE), fresh_client(o), o.kms.responder(BOB))
    text = scrape(o.metrics_port)
    records = [json.loads(line) for line in (o.kms.home / "audit.log").read_text().splitlines()]
    secrets = {str(r[k]) for r in records for k in ("ticket_id", "correlation_id", "sender")
               if r.get(k)}
    assert len(secrets) > 10
    for s in secrets:
        assert s not in text
    for ident in (ALICE, BOB, CAROL, MALLORY, TEAM):
        assert ident.decode() not in text
    assert "example.org" not in text


def test_promtool_check_metrics_under_load(observed: Observed) -> None:
    o = observed
    stop = threading.Event()
    errors: list[BaseException] = []
    done = [0]

    def load() -> None:
        try:
            while not stop.is_set():
                run_call(fresh_client(o), o.kms.initiator(ALICE), fresh_client(o),
                         o.kms.responder(BOB))
                done[0] += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        texts = []
        while len(texts) < 3 or done[0] < 6:
            texts.append(scrape(o.metrics_port))
            assert not errors, errors
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    for text in texts[-3:]:
        checked = promtool("check", "metrics", stdin=text)
        # promtool prints one line per lint problem (naming, units, _total, ...); none.
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout.strip() == "" and checked.stderr.strip() == "", checked
    assert has(samples(texts[-1]), "kms_build_info")


def test_registry_gauges_follow_tpk_rotation(observed: Observed) -> None:
    o = observed
    s = samples(scrape(o.metrics_port))
    assert value(s, "kms_registry_entries", kind="endpoints") == 7
    assert value(s, "kms_registry_entries", kind="groups") == 1
    assert value(s, "kms_tpk_versions", state="current") == 1
    version = value(s, "kms_tpk_current_version")
    created = value(s, "kms_tpk_current_created_timestamp_seconds")
    assert abs(created - time.time()) < 3600
    assert value(s, "kms_tpk_max_age_seconds") == 90 * 86400
    run_kms(o.kms.home, "tpk", "rotate")
    s = samples(scrape(o.metrics_port))
    assert value(s, "kms_tpk_current_version") == version + 1
    assert value(s, "kms_tpk_versions", state="active") >= 1
    assert value(s, "kms_tpk_current_created_timestamp_seconds") >= created
    # Tickets under the new TPK are issued and resolved; the counter keeps going.
    run_call(fresh_client(o), o.kms.initiator(ALICE), fresh_client(o), o.kms.responder(BOB))


def test_token_loss_shows_as_down_then_reconnects(observed: Observed) -> None:
    """Last in this module: the token folder goes away and comes back."""
    o = observed
    tokens = o.kms.home / "token" / "tokens"
    away = o.kms.home.parent / "tokens-moved-away"
    before = samples(scrape(o.metrics_port))
    shutil.move(tokens, away)
    try:
        codes = []
        for _ in range(6):  # fresh connections: both workers see the token gone
            with pytest.raises(KmsRefused) as info:
                obtain_ticket(fresh_client(o), o.kms.initiator(GRACE),
                              DesiredPolicy(responders=(BOB,)))
            codes.append(info.value.code)
        assert codes == [grpc.StatusCode.UNAVAILABLE] * 6
        down = samples(scrape(o.metrics_port))
        assert value(down, "kms_token_up") == 0
        assert value(down, "kms_calls_total", outcome="unavailable", code="UNAVAILABLE") - value(
            before, "kms_calls_total", outcome="unavailable", code="UNAVAILABLE") == 6
        assert value(down, "kms_token_operation_errors_total", error="unavailable") > value(
            before, "kms_token_operation_errors_total", error="unavailable")
    finally:
        shutil.move(away, tokens)
    # Calls and the token probe find the token again in every worker.
    deadline = time.monotonic() + 30
    s = samples(scrape(o.metrics_port))
    while value(s, "kms_token_up") != 1 and time.monotonic() < deadline:
        with contextlib.suppress(KmsRefused):
            obtain_ticket(fresh_client(o), o.kms.initiator(GRACE), DesiredPolicy(responders=(BOB,)))
        time.sleep(0.5)
        s = samples(scrape(o.metrics_port))
    assert value(s, "kms_token_up") == 1
    assert value(s, "kms_token_reconnects_total") >= 1


def test_a_killed_worker_keeps_its_counts_and_loses_its_live_gauge(observed: Observed) -> None:
    """After the token test: a worker is killed; the supervisor restarts it."""
    o = observed
    folder = o.kms.home / "state" / "metrics-mp"
    before = samples(scrape(o.metrics_port))
    pids = {int(f.stem.split("_")[-1]) for f in folder.glob("counter_*.db")}
    assert len(pids) >= 2
    victim = max(pids)
    gauge = folder / f"gauge_livemin_{victim}.db"
    assert gauge.exists(), sorted(p.name for p in folder.iterdir())
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while gauge.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not gauge.exists()  # the supervisor dropped the dead worker's live gauge
    # The replacement worker comes up and serves (fresh connections reach it too).
    served = 0
    while served < 6 and time.monotonic() < deadline:
        with contextlib.suppress(KmsRefused):
            obtain_ticket(fresh_client(o), o.kms.initiator(GRACE), DesiredPolicy(responders=(BOB,)))
            served += 1
    assert served == 6
    after = samples(scrape(o.metrics_port))
    # Counters of the dead worker still count: nothing went backwards.
    for key, v in before.items():
        if key[0] == "kms_calls_total":
            assert after.get(key, 0.0) >= v, key
    assert value(after, "kms_token_up") == 1
    assert o.kms.serve.proc.poll() is None
