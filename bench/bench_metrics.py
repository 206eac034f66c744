#!/usr/bin/env python3
"""What the metrics cost: server CPU per exchange with ``/metrics`` off and on, side by side.

    .venv/bin/python -m bench.bench_metrics [--rounds 3] [--seconds 3] [--clients 8]
                                            [--workers 1]

One throwaway bench home (bench/world.py). For each workload (Ticket Request PSK, Ticket
Resolve PSK), ``kms serve`` is started alternately without and with ``--metrics-listen``
(``--rounds`` times each, so that machine drift hits both alike); with metrics on, a
Prometheus-like scraper reads ``/metrics`` every second during the window, so the scrape's
own cost is counted too. The load is bench/load.py's (client processes, messages made
before the window); server CPU is the server process tree's, from /proc. Prints the median
server CPU per call of each side and the difference (target: at most 3 % more).

On a shared 2-core machine the gRPC figures move by 5-15 % between rounds, more than the
cost being measured. So a second, quieter phase calls the KMS core in one thread, in one
process, back to back, and counts the thread's CPU time: the handler as ``kms serve`` builds
it without metrics, and the same handler with the metered key store and handler around it,
alternating blocks of 25 calls, with the
metric values in memory (one process) and in multiprocess files (``PROMETHEUS_MULTIPROC_DIR``
set, as in a worker of ``kms serve --workers N``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import run_load  # noqa: E402
from bench.messages import Workload, obtain_grant  # noqa: E402
from bench.run import free_port, log  # noqa: E402

TARGET_PCT = 3.0


@contextlib.contextmanager
def kms_serve(home: Path, workers: int, metrics_port: int | None) -> Iterator[tuple[str, int]]:
    listen = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "kms.cli", "--home", str(home), "serve", "--listen", listen,
           "--workers", str(workers), "--log-level", "WARNING"]
    if metrics_port is not None:
        cmd += ["--metrics-listen", f"127.0.0.1:{metrics_port}"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
    try:
        assert p.stdout is not None
        deadline = time.monotonic() + 120
        while True:
            line = p.stdout.readline()
            if "serving on" in line:
                break
            if not line or time.monotonic() > deadline:
                raise RuntimeError("kms serve did not start")
        yield listen, p.pid
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class Scraper:
    """Reads /metrics once a second, as a Prometheus with scrape_interval 1s would."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.stop = threading.Event()
        self.scrapes = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(1.0):
            with urllib.request.urlopen(self.url, timeout=5) as r:
                r.read()
            self.scrapes += 1

    def __enter__(self) -> Scraper:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(10)


def _inproc_child(home_path: str, grant: object, rounds: int, seconds: float,
                  conn: object) -> None:
    """One process: plain vs metered handler in alternating blocks of 25 calls, CPU time of
    this thread per call (the SoftHSM token computes in this thread too); ``rounds`` x
    ``seconds`` of calls per side. Sends the means back."""
    from bench import inproc
    from bench.messages import generate
    from kms.home import open_home
    from kms.server.compose import build_handler
    from kms.server.metrics import ServerMetrics
    from kms.server.observed import ObservedHandler, ObservedKeyStore

    home = open_home(Path(home_path))
    plain = build_handler(home)
    m = ServerMetrics(None)
    metered = ObservedHandler(build_handler(home, keystore=ObservedKeyStore(home.keystore(), m)), m)
    out = {}
    block = 25
    for w in (Workload("request"), Workload("resolve", grant=grant)):  # type: ignore[arg-type]
        cal = generate(w, 20, time.time())
        t0 = time.thread_time()
        for wire in cal:
            inproc.call(plain, w, wire)  # type: ignore[arg-type]
        per = (time.thread_time() - t0) / len(cal)
        n = max(4 * block, int(rounds * seconds / per) // block * block)
        msgs = generate(w, 2 * n, time.time())
        cpu = {"off": 0.0, "on": 0.0}
        for i in range(0, 2 * n, 2 * block):
            for j, (side, kms) in enumerate((("off", plain), ("on", metered))):
                chunk = msgs[i + j * block: i + (j + 1) * block]
                t0 = time.thread_time()
                for wire in chunk:
                    reply = inproc.call(kms, w, wire)  # type: ignore[arg-type]
                    if not reply.ok:
                        raise RuntimeError(f"{w.name}: {reply.outcome} {reply.detail}")
                cpu[side] += time.thread_time() - t0
        out[w.name] = {k: v / n * 1e3 for k, v in cpu.items()}
    home.close()
    conn.send(out)  # type: ignore[attr-defined]


def _micro_child(conn: object) -> None:
    """Cost of single metric updates and of the metered key store per operation (over the
    software key store, so that the token's own time does not hide it), in microseconds."""
    import os

    from prometheus_client import CollectorRegistry

    from hsm.software import SoftwareKeyStore
    from kms.keystore import KeyRef
    from kms.mikey.prf import PrfFunc
    from kms.server.metrics import ServerMetrics
    from kms.server.observed import ObservedKeyStore

    m = ServerMetrics(None if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else CollectorRegistry())
    ks = SoftwareKeyStore()
    ks.import_secret("k", b"k" * 20)
    mk = ObservedKeyStore(ks, m)
    key = KeyRef("k")
    hist = m.token_seconds.labels("hmac")

    def cost(fn: object, n: int = 30000) -> float:
        best = 1e9
        for _ in range(5):
            t0 = time.thread_time()
            for _ in range(n):
                fn()  # type: ignore[operator]
            best = min(best, (time.thread_time() - t0) / n)
        return best * 1e6

    out = {
        "histogram observe": cost(lambda: hist.observe(0.0003)),
        "labelled counter inc": cost(
            lambda: m.calls.labels("RequestTicket", "ok", "OK", "none").inc()),
        "metered random(1) - bare": cost(lambda: mk.random(1)) - cost(lambda: ks.random(1)),
        "metered prf_many - bare": cost(
            lambda: mk.prf_many(key, [(b"x" * 20, 16)], PrfFunc.MIKEY_1))
        - cost(lambda: ks.prf_many(key, [(b"x" * 20, 16)], PrfFunc.MIKEY_1)),
    }
    conn.send(out)  # type: ignore[attr-defined]


def in_child(target: object, args: tuple[object, ...], multiproc: bool, folder: Path) -> object:
    """Run ``target(*args, conn)`` in a spawned process (with PROMETHEUS_MULTIPROC_DIR set
    when ``multiproc``: the value class is chosen when prometheus-client is imported)."""
    import multiprocessing
    import os

    ctx = multiprocessing.get_context("spawn")
    a, b = ctx.Pipe()
    old = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if multiproc:
        folder.mkdir(exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    try:
        p = ctx.Process(target=target, args=(*args, b))  # type: ignore[arg-type]
        p.start()
    finally:
        if multiproc:
            if old is None:
                os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            else:
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = old
    result = a.recv()
    p.join(30)
    return result


def inproc_compare(home_path: Path, grant: object, rounds: int, seconds: float,
                   multiproc: bool) -> dict[str, dict[str, float]]:
    res = in_child(_inproc_child, (str(home_path), grant, rounds, seconds), multiproc,
                   home_path.parent / "mp")
    return res  # type: ignore[return-value]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--inproc-rounds", type=int, default=5)
    ap.add_argument("--skip-grpc", action="store_true", help="in-process phase only")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kms-bench-metrics-"))
    try:
        from bench import inproc
        from bench.world import create_home
        from kms.home import open_home
        from kms.server.compose import build_handler

        home_path = tmp / "home"
        setup = create_home(home_path)
        home = open_home(home_path)
        grant = obtain_grant(Workload("resolve"), inproc.request_sender(build_handler(home)),
                             time.time())
        home.close()
        workloads = [Workload("request"), dataclasses.replace(Workload("resolve"), grant=grant)]
        del setup
        inproc_rows = []
        for multiproc in (False, True):
            res = inproc_compare(home_path, grant, args.inproc_rounds, 1.0, multiproc)
            for name, v in res.items():
                inproc_rows.append((name, "multiprocess" if multiproc else "in memory",
                                    v["off"], v["on"], (v["on"] / v["off"] - 1) * 100))
                log(f"in-process {name} ({inproc_rows[-1][1]}): off {v['off']:.3f} ms, "
                    f"on {v['on']:.3f} ms")
        micro = {kind: in_child(_micro_child, (), kind == "multiprocess", tmp / "mp-micro")
                 for kind in ("in memory", "multiprocess")}
        rows = []
        for w in ([] if args.skip_grpc else workloads):
            cpu: dict[bool, list[float]] = {False: [], True: []}
            rate: dict[bool, list[float]] = {False: [], True: []}
            for rnd in range(args.rounds):
                for on in (False, True):
                    mport = free_port() if on else None
                    with kms_serve(home_path, args.workers, mport) as (target, pid):
                        per = math.ceil(1500 * (0.5 + args.seconds) / args.clients) + 5
                        scr = Scraper(mport) if mport is not None else contextlib.nullcontext()
                        with scr:
                            r = run_load(target, w, clients=args.clients, per_client_msgs=per,
                                         warmup=0.5, duration=args.seconds, server_pid=pid)
                    if r.errors or r.exhausted:
                        log(f"  note: errors {dict(r.errors)} exhausted {r.exhausted}")
                    cpu[on].append(r.server_cpu_ms_per_call)
                    rate[on].append(r.rate)
                    log(f"{w.name} round {rnd + 1} metrics {'on ' if on else 'off'}: "
                        f"{r.rate:.0f}/s, server CPU {r.server_cpu_ms_per_call:.3f} ms/call")
            off, on_ = statistics.median(cpu[False]), statistics.median(cpu[True])
            rows.append((w.name, statistics.median(rate[False]), off,
                         statistics.median(rate[True]), on_, (on_ / off - 1) * 100))
        print("\nin-process, one thread, CPU ms per call (thread time, alternating blocks of "
              f"25 calls, about {args.inproc_rounds} s per side)")
        print(f"{'workload':<14} {'values':<13} {'off':>8} {'on':>8} {'+%':>7}")
        for name, kind, off, on, pct in inproc_rows:
            print(f"{name:<14} {kind:<13} {off:>8.3f} {on:>8.3f} {pct:>+7.1f}")
        print("\nsingle updates, us (best of 5 x 30000, thread time)")
        for kind, res in micro.items():
            print(f"  {kind:<13} " + ", ".join(
                f"{k} {v:.2f}" for k, v in res.items()))  # type: ignore[attr-defined]
        if args.skip_grpc:
            return 0
        print(f"\nworkers {args.workers}, {args.clients} clients, {args.seconds:.0f} s windows, "
              f"median of {args.rounds} alternating rounds")
        print(f"{'workload':<14} {'off /s':>8} {'off ms/call':>12} {'on /s':>8} "
              f"{'on ms/call':>11} {'CPU +%':>7}  target <= {TARGET_PCT:.0f} %")
        for name, r0, c0, r1, c1, pct in rows:
            verdict = "ok" if pct <= TARGET_PCT else "OVER"
            print(f"{name:<14} {r0:>8.0f} {c0:>12.3f} {r1:>8.0f} {c1:>11.3f} {pct:>+7.1f}  "
                  f"{verdict}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
