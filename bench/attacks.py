"""The hardening figures, measured against a real `kms serve` (not part of the test suite).

``python -m bench.attacks stalled [--stalled 1000] [--calls 300] [--reopen-per-s 1000]``
    A victim's RequestTicket latency on its own connection, unloaded and while an attacker
    process keeps ``--stalled`` calls open that never send their request (HEADERS only, no
    deadline; a call the server ends is re-opened at once, up to 1,000 re-opens per
    second, over 32 connections).

``python -m bench.attacks oracle [--pairs 300]``
    Forged REQUEST_INITs (wrong MAC) for a registered and an unknown identity, sent in
    pairs in random order: both answers and both timing distributions side by side; then
    the audit bytes written per unauthenticated call with a 60,000-byte IDRi.

The KMS home is made with the operator CLI (the end-to-end tests' harness), in a temporary
folder, with ``rate_limit_per_s = 0`` so that the victim's own rate is not the limit.
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.load import tree_cpu
from kms.endpoint.client import KmsClient, KmsRefused
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DesiredPolicy, Initiator
from kms.mikey.constants import IdType
from kms.server.grpc_server import SERVICE_NAME
from tests.e2e.harness import ALICE, BOB, CAROL, KMS_ID, Kms, make_home, running_kms, set_policy

OWN = [("grpc.use_local_subchannel_pool", 1)]


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def show(name: str, ms: list[float]) -> str:
    return (f"{name:28s} n={len(ms):4d}  p50 {statistics.median(ms):7.2f} ms  "
            f"p90 {pct(ms, 90):7.2f}  p99 {pct(ms, 99):7.2f}  max {max(ms):7.2f}")  # fmt: skip


# --- stalled calls ---------------------------------------------------------------------------


def _attacker(
    target: str, count: int, conns: int, reopen_per_s: float, stop: Any, stats: Any
) -> None:
    """Keeps ``count`` stalled calls open (a separate process: its GIL is not the victim's)."""
    channels = [grpc.insecure_channel(target, options=OWN) for _ in range(conns)]
    methods = [ch.stream_unary(f"/{SERVICE_NAME}/RequestTicket") for ch in channels]
    halt = threading.Event()
    ended: Counter[str] = Counter()
    lock = threading.Lock()

    def never() -> Iterator[Any]:
        halt.wait()
        return
        yield

    reopen: queue.SimpleQueue[int] = queue.SimpleQueue()

    def open_one(i: int) -> None:
        future = methods[i % conns].future(never())
        future.add_done_callback(lambda f: done(f, i))

    def done(f: Any, i: int) -> None:
        with lock:
            ended[f.code().name] += 1
        reopen.put(i)

    def reopener() -> None:
        # Re-open each ended call at once, up to reopen_per_s (each open costs the
        # attacker a thread for its request iterator).
        while not halt.is_set():
            try:
                i = reopen.get(timeout=0.2)
            except queue.Empty:
                continue
            open_one(i)
            time.sleep(1 / reopen_per_s)

    for i in range(count):
        open_one(i)
    if reopen_per_s > 0:
        threading.Thread(target=reopener, daemon=True).start()
    stop.wait()
    halt.set()
    with lock:
        for k, v in ended.items():
            stats[k] = v
    for ch in channels:
        ch.close()


def cpu_share(pids: list[int], seconds: float, cpu0: float) -> float:
    """CPU seconds per second that ``pids`` (and their children) used since ``cpu0``."""
    return (tree_cpu(pids) - cpu0) / seconds


def victim_calls(kms: Kms, n: int) -> tuple[list[float], list[float]]:
    """``n`` RequestTickets and health checks on the victim's own connection: latencies."""
    client = KmsClient(kms.target, timeout=10.0, options=OWN)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(kms.target, options=OWN))
    ini = kms.initiator(ALICE)
    ticket_ms, health_ms = [], []
    try:
        for _ in range(n):
            wire, _ = ini.request_ticket(DesiredPolicy(responders=(BOB,)), time.time())
            t0 = time.perf_counter()
            client.request_ticket(wire)
            ticket_ms.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            health_ms.append((time.perf_counter() - t0) * 1000)
    finally:
        client.close()
    return ticket_ms, health_ms


def bench_stalled(kms: Kms, stalled: int, calls: int, reopen_per_s: float) -> None:
    victim_calls(kms, 20)  # warm-up (token working copies, connections)
    server = [kms.serve.proc.pid]
    t0, cpu0 = time.monotonic(), tree_cpu(server)
    base, base_h = victim_calls(kms, calls)
    base_cpu = cpu_share(server, time.monotonic() - t0, cpu0)
    ctx = multiprocessing.get_context("spawn")
    manager = ctx.Manager()
    stop, stats = ctx.Event(), manager.dict()
    attacker = ctx.Process(
        target=_attacker, args=(kms.target, stalled, 32, reopen_per_s, stop, stats)
    )
    attacker.start()
    time.sleep(3.0)  # the attack is in place
    try:
        t0, cpu0, att0 = time.monotonic(), tree_cpu(server), tree_cpu([attacker.pid or 0])
        loaded, loaded_h = victim_calls(kms, calls)
        spent = time.monotonic() - t0
        loaded_cpu = cpu_share(server, spent, cpu0)
        attacker_cpu = cpu_share([attacker.pid or 0], spent, att0)
    finally:
        stop.set()
        attacker.join(30)
    result = dict(stats)
    manager.shutdown()
    print(f"victim RequestTicket (PSK) on its own connection, {calls} calls each")
    print(show("unloaded", base))
    print(show(f"{stalled} stalled (re-open {reopen_per_s:g}/s)", loaded))
    print(show("health unloaded", base_h))
    print(show("health under attack", loaded_h))
    print(f"p99 ratio (attack / unloaded): {pct(loaded, 99) / pct(base, 99):.2f}; "
          f"slowest victim call {max(loaded):.1f} ms")  # fmt: skip
    print(f"attacker calls ended by the server: {result}")
    print(f"server CPU (s/s): unloaded {base_cpu:.2f}, under attack {loaded_cpu:.2f}; "
          f"attacker process {attacker_cpu:.2f} (2 cores, shared)")  # fmt: skip
    lines = [x for x in kms.serve.stderr.splitlines() if "call cancelled" in x]
    print(f"server log lines about it: {len(lines)}")


# --- registration oracle ---------------------------------------------------------------------


def forged(kms: Kms, who: bytes, skew: float = 0.0) -> bytes:
    ini = Initiator(Credentials(who, bytes(range(16)), KMS_ID, IdType.URI), kms.ks)
    wire, _ = ini.request_ticket(DesiredPolicy(responders=(BOB,)), time.time() + skew)
    return wire


def one(client: KmsClient, wire: bytes) -> tuple[float, tuple[str, int | None]]:
    t0 = time.perf_counter()
    try:
        client.request_ticket(wire)
        answer: tuple[str, int | None] = ("OK", None)
    except KmsRefused as exc:
        answer = (exc.code.name, exc.error_no)
    return (time.perf_counter() - t0) * 1000, answer


def bench_oracle(kms: Kms, pairs: int) -> None:
    client = KmsClient(kms.target, timeout=10.0, options=OWN)
    unknown = b"sip:nobody@example.org"
    rng = random.Random(7)
    times: dict[str, list[float]] = {"registered": [], "unknown": []}
    answers: dict[str, Counter[tuple[str, int | None]]] = {k: Counter() for k in times}
    slower = 0
    for i in range(pairs + 20):
        order = [("registered", CAROL), ("unknown", unknown)]
        rng.shuffle(order)
        got = {}
        for name, who in order:
            got[name] = one(client, forged(kms, who))
        if i < 20:
            continue  # warm-up
        for name, (ms, ans) in got.items():
            times[name].append(ms)
            answers[name][ans] += 1
        slower += got["registered"][0] > got["unknown"][0]
    print(f"forged REQUEST_INIT (wrong MAC, fresh timestamp), {pairs} pairs")
    for name in times:
        print(show(name, times[name]), " answers", dict(answers[name]))
    print(f"registered slower in {slower} of {pairs} pairs")
    for skew in (-1000.0, 1000.0):
        stale = {name: one(client, forged(kms, who, skew))[1]
                 for name, who in (("registered", CAROL), ("unknown", unknown))}  # fmt: skip
        print(f"timestamp {skew:+.0f} s, wrong MAC: {stale}")

    audit = kms.home / "audit.log"
    huge = b"sip:" + b"a" * 59_984 + b"@example.org"
    before, n = audit.stat().st_size, 50
    for _ in range(n):
        one(client, forged(kms, huge))
    print(f"audit bytes per unauthenticated call with a 60,000-byte IDRi: "
          f"{(audit.stat().st_size - before) / n:.0f}")  # fmt: skip
    client.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("stalled", help="victim latency while stalled calls are open")
    s.add_argument("--stalled", type=int, default=1000)
    s.add_argument("--calls", type=int, default=300)
    s.add_argument("--reopen-per-s", type=float, default=1000.0,
                   help="how fast the attacker re-opens ended calls (0: never)")  # fmt: skip
    o = sub.add_parser("oracle", help="registered vs unknown identity: answers and timing")
    o.add_argument("--pairs", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kms-bench-attacks-") as tmp:
        home = make_home(Path(tmp) / "home")
        set_policy(home, rate_limit_per_s=0)
        with running_kms(home) as kms:
            if args.what == "stalled":
                bench_stalled(kms, args.stalled, args.calls, args.reopen_per_s)
            else:
                bench_oracle(kms, args.pairs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
