"""The hardening counters on `/metrics` of a real `kms serve --workers 2`: a call that never
sends its request (timed out by the call guard), bodies that are not a MikeyMessage, and new
messages refused because the replay cache is full of live entries; the two workers' counts
add up in the supervisor's exposition. Plus the mapping of every guard event to its
``reason`` label, in process."""

from __future__ import annotations

import collections
import json
import re
import shutil
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from kms.endpoint.client import KmsRefused
from kms.endpoint.initiator import DesiredPolicy
from kms.server.admission import EventCounts
from kms.server.grpc_server import SERVICE_NAME
from kms.server.metrics import GUARD_REASONS, ServerMetrics
from tests.e2e.harness import ALICE, BOB, PSKS, Kms, free_port, make_home, running_kms, set_policy
from tests.observability.helpers import promtool, samples, scrape, value

OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)
REPLAY_CACHE = 4
REQUEST_TIMEOUT_MS = 300


@pytest.fixture(scope="module")
def hardened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Kms, int]]:
    assert shutil.which("softhsm2-util"), "softhsm2-util is required (scripts/setup.sh)"
    home = make_home(tmp_path_factory.mktemp("hard") / "home", {ALICE: PSKS[ALICE]}, {})
    set_policy(home, replay_cache_size=REPLAY_CACHE, rate_limit_per_s=0)
    toml = home / "kms.toml"
    # The template writes every [server] key with its default: replace the one line.
    text, n = re.subn(
        r"^request_timeout_ms = \d+$",
        f"request_timeout_ms = {REQUEST_TIMEOUT_MS}",
        toml.read_text(),
        flags=re.MULTILINE,
    )
    assert n == 1
    toml.write_text(text)
    port = free_port()
    with running_kms(home, "--workers", "2", "--metrics-listen", f"127.0.0.1:{port}") as k:
        yield k, port


def _never() -> Iterator[Any]:
    """A request stream that never yields: HEADERS only, as a stalling attacker sends."""
    time.sleep(30)
    return
    yield


def wait_for(port: int, name: str, at_least: float, **labels: str) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + 20
    while True:
        s = samples(scrape(port))
        if value(s, name, **labels) >= at_least or time.monotonic() > deadline:
            return s
        time.sleep(0.1)


def test_families_present_at_zero_before_any_event(hardened: tuple[Kms, int]) -> None:
    _, port = hardened
    text = scrape(port)
    s = samples(text)
    for reason in GUARD_REASONS.values():
        assert ("kms_guard_refusals_total", frozenset({("reason", reason)})) in s, reason
    assert "# TYPE kms_undecodable_requests_total counter" in text
    assert "# TYPE kms_replay_cache_full_refusals_total counter" in text


def test_event_loop_lag_is_sampled_in_every_worker(hardened: tuple[Kms, int]) -> None:
    """Each worker samples its event loop's lag every 0.25 s (kms_event_loop_lag_seconds):
    both workers' samples add up in the supervisor's exposition."""
    _, port = hardened
    first = value(samples(scrape(port)), "kms_event_loop_lag_seconds_count")
    s = wait_for(port, "kms_event_loop_lag_seconds_count", at_least=first + 8)
    # Two workers, four samples a second each: 8 more within about a second.
    assert value(s, "kms_event_loop_lag_seconds_count") >= first + 8
    assert "# TYPE kms_event_loop_lag_seconds histogram" in scrape(port)


def test_stalled_call_is_counted_as_request_timeout(hardened: tuple[Kms, int]) -> None:
    kms, port = hardened
    before = value(samples(scrape(port)), "kms_guard_refusals_total", reason="request_timeout")
    with grpc.insecure_channel(kms.target, options=list(OWN_CONNECTION)) as ch:
        stalled = ch.stream_unary(f"/{SERVICE_NAME}/RequestTicket").future(_never())
        code = _wait_code(stalled)
    assert code is grpc.StatusCode.CANCELLED
    s = wait_for(port, "kms_guard_refusals_total", before + 1, reason="request_timeout")
    assert value(s, "kms_guard_refusals_total", reason="request_timeout") == before + 1
    assert value(s, "kms_guard_refusals_total", reason="peer_limit") == 0


def _wait_code(future: Any) -> grpc.StatusCode:
    deadline = time.monotonic() + 20
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert future.done(), "the server did not end the stalled call"
    code: grpc.StatusCode = future.code()
    return code


def test_non_protobuf_bodies_are_counted(hardened: tuple[Kms, int]) -> None:
    kms, port = hardened
    audit = kms.home / "audit.log"
    lines = len(audit.read_text().splitlines())
    before = value(samples(scrape(port)), "kms_undecodable_requests_total")
    for _ in range(3):  # a connection each: SO_REUSEPORT spreads them over both workers
        with grpc.insecure_channel(kms.target, options=list(OWN_CONNECTION)) as ch:
            for method in ("RequestTicket", "ResolveTicket"):
                with pytest.raises(grpc.RpcError) as info:
                    ch.unary_unary(f"/{SERVICE_NAME}/{method}")(b"\xff\xff\xff", timeout=5)
                assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    s = samples(scrape(port))
    assert value(s, "kms_undecodable_requests_total") == before + 6
    # Still audited with the metered handler in between (one record per call).
    records = [json.loads(x) for x in audit.read_text().splitlines()[lines:]]
    refused = [r for r in records if r.get("reason") == "request body is not a transport message"]
    assert len(refused) == 6 and all(r["outcome"] == "malformed" for r in refused)


def test_replay_cache_full_refusals_are_counted(hardened: tuple[Kms, int]) -> None:
    kms, port = hardened
    c = kms.client()
    ini = kms.initiator(ALICE)
    codes: collections.Counter[str] = collections.Counter()
    for _ in range(REPLAY_CACHE + 4):
        wire, _ = ini.request_ticket(DesiredPolicy(responders=(BOB,)), time.time())
        try:
            c.request_ticket(wire)
            codes["ok"] += 1
        except KmsRefused as exc:
            codes[exc.code.name] += 1
    assert set(codes) == {"ok", "RESOURCE_EXHAUSTED"}, codes
    assert codes["RESOURCE_EXHAUSTED"] >= 4, codes
    s = samples(scrape(port))
    assert value(s, "kms_replay_cache_full_refusals_total") == codes["RESOURCE_EXHAUSTED"]
    # The exposition stays valid for Prometheus.
    r = promtool("check", "metrics", stdin=scrape(port))
    # One line per lint problem (naming, units, _total, ...); none.
    assert r.returncode == 0 and (r.stdout + r.stderr).strip() == "", r.stdout + r.stderr


def test_every_guard_event_maps_to_its_reason() -> None:
    reg = CollectorRegistry()
    m = ServerMetrics(reg)
    guard, servicer = EventCounts(), EventCounts()
    guard.listener = servicer.listener = m.guard_event
    guard["request_timeouts"] += 2
    guard["shed_waiting"] += 3
    guard["refused_peer_limit"] += 1
    guard["refused_watches"] += 1
    guard["shed_waiting"] += 0  # no increase, nothing counted
    guard["not_a_known_event"] += 5  # ignored, not a new label value
    servicer["undecodable_body"] += 4
    s = samples(generate_latest(reg).decode())
    got = {dict(ls)["reason"]: v for (n, ls), v in s.items() if n == "kms_guard_refusals_total"}
    assert got == {"request_timeout": 2, "shed": 3, "peer_limit": 1, "health_watches": 1}
    assert value(s, "kms_undecodable_requests_total") == 4
    assert guard == {"request_timeouts": 2, "shed_waiting": 3, "refused_peer_limit": 1,
                     "refused_watches": 1, "not_a_known_event": 5}
