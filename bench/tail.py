#!/usr/bin/env python3
"""p99 at half load: each exchange's tail beside the echo call's at the same offered rate.

    .venv/bin/python -m bench.tail [--rounds 3] [--seconds 10] [--workloads "request psk,..."]
                                   [--rate R] [--tree OTHER_SOURCE_TREE]

``bench.run --quick`` reads p99 at half of peak from one 1 s window: some 270 calls, so its
p99 is about the third-slowest call, and the machine's scheduling (8 load processes and the
server on 2 cores) is in it as much as the server. Here, per exchange:

1. its peak (closed loop, 8 clients, one worker) and so its half-load rate R;
2. rounds of S-second windows, open loop at R from 8 clients: the exchange, then the echo call
   (same server stack, ``bench.echo --echo``, no KMS work) at the same R from the same load
   generator: the control. Latencies are pooled over the rounds, and per-round p99s shown;
3. the model: the load generator's arrival process (8 clients, each periodic with a random
   phase, bench.load) into one FIFO server whose service time is constant and equal to the
   exchange's server CPU per call measured at R: the tail an ideal server would have.

So the measured tail splits into what the queue alone gives (model), what the machine and
the gRPC stack give at that rate (echo control), and the rest (the exchange's own variation:
GIL hand-offs with the token thread, SQLite, collections).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# bench.run first: its --tree handling must run before anything imports kms.
from bench.run import RESULTS, log, server  # noqa: E402, I001
from bench.load import LoadResult, percentile, run_load, thread_cpu  # noqa: E402
from bench.messages import Workload, obtain_grant  # noqa: E402

CLIENTS = 8


def model_p(service_ms: float, rate: float, seconds: float, q: float, seed: int = 1) -> float:
    """Latency quantile ``q`` of a FIFO server with constant service time fed by CLIENTS
    periodic clients at ``rate`` in all, each with a random phase (as bench.load schedules
    them), over many windows of ``seconds``."""
    rnd = random.Random(seed)
    interval = CLIENTS / rate
    lat: list[float] = []
    for _ in range(20):
        arrivals = sorted(
            rnd.random() * interval + k * interval
            for _c in range(CLIENTS) for k in range(int(seconds / interval)))
        free_at = 0.0
        for a in arrivals:
            start = max(a, free_at)
            free_at = start + service_ms / 1e3
            lat.append((free_at - a) * 1e3)
    return percentile(lat, q)


@dataclasses.dataclass
class Side:
    latencies: list[float] = dataclasses.field(default_factory=list)
    p99s: list[float] = dataclasses.field(default_factory=list)
    cpu_ms: list[float] = dataclasses.field(default_factory=list)
    busiest_ms: list[float] = dataclasses.field(default_factory=list)
    done: int = 0
    errors: int = 0

    def add(self, r: LoadResult, busiest_ms: float) -> None:
        self.busiest_ms.append(busiest_ms)
        self.latencies += r.latencies_ms
        self.p99s.append(r.pct(0.99))
        self.cpu_ms.append(r.server_cpu_ms_per_call)
        self.done += r.completed
        self.errors += sum(r.errors.values())


def open_loop(target: str, w: Workload, rate: float, seconds: float,
              spid: int) -> tuple[LoadResult, float]:
    """The load result and the busiest server thread's CPU per call in the window (the
    event loop's: the serialised part of a call, the queue's service time)."""
    cpu: dict[str, dict[str, float]] = {}

    def on_window(what: str) -> None:
        cpu[what] = thread_cpu(spid)

    per = math.ceil(rate * (seconds + 0.5) * 1.3 / CLIENTS) + 3
    r = run_load(target, w, clients=CLIENTS, per_client_msgs=per, warmup=0.5,
                 duration=seconds, rate=rate, server_pid=spid, on_window=on_window)
    a, b = cpu.get("start", {}), cpu.get("end", {})
    busiest = max((b[t] - a.get(t, 0.0) for t in b), default=0.0)
    per_call = busiest / r.completed * 1e3 if r.completed else 0.0
    return r, per_call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0, help="window per round")
    ap.add_argument("--workloads", default="request psk,request pk,resolve psk,resolve pk")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="offered rate for every workload (default: half of its peak)")
    ap.add_argument("--tree", type=Path,
                    help="serve the kms/hsm packages of this source tree (before/after runs)")
    args = ap.parse_args()

    from bench import inproc
    from bench.world import create_home
    from kms.home import open_home
    from kms.server.compose import build_handler

    tmp = Path(tempfile.mkdtemp(prefix="kms-tail-"))
    logdir = RESULTS / f"logs-tail-{time.strftime('%Y%m%d-%H%M%S')}"
    logdir.mkdir(parents=True, exist_ok=True)
    try:
        setup = create_home(tmp / "home")
        home = open_home(setup.home)
        kms = build_handler(home)
        loads: list[Workload] = []
        for name in args.workloads.split(","):
            parts = name.split()
            w = Workload(parts[0], parts[1], "fork" in parts[2:], setup.kms_cert_der, setup.pk)
            if w.exchange == "resolve":
                w = dataclasses.replace(
                    w, grant=obtain_grant(w, inproc.request_sender(kms), time.time()))
            loads.append(w)
        home.close()
        del kms
        # One `kms serve` per home: the echo server gets a home of its own.
        echo_home = create_home(tmp / "echo-home").home

        rows: list[tuple[str, float, Side, Side, float, float]] = []
        with server(setup.home, 1, False, logdir) as (kms_t, kms_pid), \
                server(echo_home, 1, True, logdir) as (echo_t, echo_pid):
            for w in loads:
                rate = args.rate
                if not rate:
                    per = math.ceil(900 * 3.5 / CLIENTS) + 3
                    peak = run_load(kms_t, w, clients=CLIENTS, per_client_msgs=per,
                                    warmup=0.5, duration=3.0, server_pid=kms_pid).rate
                    rate = peak / 2
                    log(f"{w.name}: peak {peak:.0f}/s, half {rate:.0f}/s")
                ex, echo = Side(), Side()
                for i in range(args.rounds):
                    # Alternate which goes first, so that a drift of the machine hits both.
                    order = [(ex, kms_t, w, kms_pid), (echo, echo_t, Workload("echo"),
                                                        echo_pid)]
                    for side, target, load, pid in (order if i % 2 == 0 else order[::-1]):
                        side.add(*open_loop(target, load, rate, args.seconds, pid))
                    log(f"{w.name} round {i + 1}: p99 {ex.p99s[-1]:.2f} ms, echo at the "
                        f"same rate {echo.p99s[-1]:.2f} ms")
                service = statistics.median(ex.busiest_ms)
                rows.append((w.name, rate, ex, echo, service,
                             model_p(service, rate, args.seconds, 0.99)))

        print(f"\np99 at the offered rate: {args.rounds} rounds x {args.seconds:g} s, "
              f"{CLIENTS} clients, 1 worker; latencies pooled over the rounds (ms)")
        print(f"{'workload':<16}{'rate/s':>7}{'calls':>7}{'p50':>7}{'p90':>7}{'p99':>7}"
              f"{'p99.9':>7}  {'per-round p99':<20}{'errors':>6}")
        for name, rate, ex, echo, _service, _model in rows:
            for label, side in ((name, ex), ("  echo, same rate", echo)):
                rounds = "/".join(f"{p:.1f}" for p in side.p99s)
                qs = "".join(f"{percentile(side.latencies, q):>7.2f}"
                             for q in (0.5, 0.9, 0.99, 0.999))
                print(f"{label:<16}{rate:>7.0f}{side.done:>7}{qs}"
                      f"  {rounds:<20}{side.errors:>6}")
        print("\nwhere the p99 comes from (ms): service = the event loop's CPU per call (the "
              "busiest server\nthread), process = all server threads' CPU per call; model = "
              "the same arrivals into a FIFO\nserver with a constant service time")
        print(f"{'workload':<16}{'service':>8}{'process':>8}{'model':>7}{'echo':>7}"
              f"{'measured':>9}{'  < 10 ms':>9}")
        for name, _rate, ex, echo, service, model in rows:
            p99 = percentile(ex.latencies, 0.99)
            print(f"{name:<16}{service:>8.2f}{statistics.median(ex.cpu_ms):>8.2f}{model:>7.2f}"
                  f"{percentile(echo.latencies, 0.99):>7.2f}{p99:>9.2f}"
                  f"{'yes' if p99 < 10 else 'NO':>9}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
