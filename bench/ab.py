#!/usr/bin/env python3
"""Short alternating A/B of the server's CPU per call: another source tree against this one.

    .venv/bin/python -m bench.ab --base /tmp/base --rounds 5
    .venv/bin/python -m bench.ab --base /tmp/base --workloads "echo,request psk" --clients 1,8

Per round, each side (base first, then this tree) serves the same bench home, one worker,
and every workload runs at every client count for a short window; the table gives the
median over the rounds of the server CPU per call (process tree, /proc) of each side, their
ratio, and for each exchange its "own" CPU: server CPU per call minus the echo call's at the
same client count minus the token floor (measured once, on this tree: neither side's
changes may touch the token operations for the subtraction to be fair). Many short rounds
resist this machine's drift better than a few long runs (``bench.run --compare``), and
cover only what the gRPC path changes.

Each round also gives a paired ratio (this round's value over the same round's base value);
the table prints their spread (the middle half of the rounds, and the extremes), because
on a shared machine one side can be 20-40 % off the other with identical code. ``--aa``
serves this tree on both sides (an A/A run): its spread is the noise a real A/B must beat.

``--rate R`` adds latency at a fixed offered load: after each closed-loop window, the same
workload runs open loop at R calls/s from 8 clients (latency counted from each call's
scheduled time), and the table gives each side's p50 / p99 and the paired p99 ratios; e.g.
``--workloads "request pk" --clients 8 --rate 160`` for p99 at about half a PK peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import RESULTS, TREE_ENV, server, tree_shim  # noqa: E402, I001
from bench.load import run_load  # noqa: E402
from bench.messages import Workload, obtain_grant  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, help="the other source tree")
    ap.add_argument("--aa", action="store_true",
                    help="A/A: this tree on both sides (the noise of the measurement)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--workloads", default="echo,request psk,resolve psk")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rate", type=float,
                    help="also run each workload open loop at this many calls/s (8 clients)")
    args = ap.parse_args()
    if (args.base is None) == (not args.aa):
        ap.error("give --base PATH, or --aa")
    from bench import inproc
    from bench.messages import generate
    from bench.world import create_home
    from kms.home import open_home
    from kms.server.compose import build_handler

    clients = [int(c) for c in args.clients.split(",")]
    names = [w.strip() for w in args.workloads.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="kms-ab-"))
    try:
        setup = create_home(tmp / "home")
        # A key the base tree may not know yet (its default, auto, is what this tree uses).
        toml = setup.home / "kms.toml"
        toml.write_text(re.sub(r"(?m)^core_calls = .*\n", "", toml.read_text()))
        shim = None if args.aa else tree_shim(args.base, tmp / "base-tree")
        home = open_home(setup.home)
        kms: Any = build_handler(home)
        work: dict[str, Workload] = {}
        floors: dict[str, float] = {}
        for name in names:
            if name == "echo":
                work[name] = Workload("echo")
                continue
            parts = name.split()
            w = Workload(parts[0], parts[1], "fork" in parts[2:], setup.kms_cert_der, setup.pk)
            if w.exchange == "resolve":
                grant = obtain_grant(w, inproc.request_sender(kms), time.time())
                w = dataclasses.replace(w, grant=grant)
            work[name] = w
            calls = inproc.record_ops(kms, w, generate(w, 1, time.time())[0])
            floors[name] = inproc.token_floor(kms.deps.keystore, calls, 0.5).seconds * 1e3
        home.close()
        del kms
        RESULTS.mkdir(parents=True, exist_ok=True)  # a clean clone has none yet
        cpu: dict[tuple[str, str, int], list[float]] = {}
        rates: dict[tuple[str, str, int], list[float]] = {}
        errors: dict[tuple[str, str, int], int] = {}
        p50s: dict[tuple[str, str, int], list[float]] = {}
        p99s: dict[tuple[str, str, int], list[float]] = {}
        for rnd in range(args.rounds):
            for side in ("base", "this"):
                if side == "base" and shim is not None:
                    os.environ[TREE_ENV] = str(shim)
                else:
                    os.environ.pop(TREE_ENV, None)
                for echo in (True, False):
                    todo = [n for n in names if (n == "echo") == echo]
                    if not todo:
                        continue
                    with server(setup.home, 1, echo, RESULTS) as (target, spid):
                        for name in todo:
                            for c in clients:
                                cap = 4000 if echo else 700
                                per = math.ceil(cap * (args.seconds + 0.5) * 1.3 / c) + 5
                                r = run_load(target, work[name], clients=c, per_client_msgs=per,
                                             warmup=0.5, duration=args.seconds,
                                             server_pid=spid)
                                cpu.setdefault((side, name, c), []).append(
                                    r.server_cpu_ms_per_call)
                                rates.setdefault((side, name, c), []).append(r.rate)
                                errors[(side, name, c)] = (errors.get((side, name, c), 0)
                                                           + sum(r.errors.values()))
                                print(f"[{time.strftime('%H:%M:%S')}] round {rnd + 1} {side} "
                                      f"{name} c={c}: {r.rate:,.0f}/s "
                                      f"{r.server_cpu_ms_per_call:.3f} ms/call "
                                      f"errors {dict(r.errors)}",
                                      file=sys.stderr, flush=True)
                            if args.rate and not echo:
                                per = math.ceil(args.rate * (args.seconds + 0.5) * 1.3 / 8) + 3
                                r = run_load(target, work[name], clients=8, per_client_msgs=per,
                                             warmup=0.5, duration=args.seconds, rate=args.rate,
                                             server_pid=spid)
                                p50s.setdefault((side, name, 0), []).append(r.pct(0.5))
                                p99s.setdefault((side, name, 0), []).append(r.pct(0.99))
                                print(f"[{time.strftime('%H:%M:%S')}] round {rnd + 1} {side} "
                                      f"{name} open loop {args.rate:g}/s: {r.rate:,.0f}/s "
                                      f"p50 {r.pct(0.5):.2f} ms p99 {r.pct(0.99):.2f} ms",
                                      file=sys.stderr, flush=True)
        os.environ.pop(TREE_ENV, None)

        def med(side: str, name: str, c: int, of: Any = cpu) -> float:
            vals = [v for v in of.get((side, name, c), []) if not math.isnan(v)]
            return statistics.median(vals) if vals else math.nan

        def paired(name: str, c: int, of: Any = cpu, own: bool = False) -> list[float]:
            """This round's value over the same round's base value, per round."""
            b, t = of.get(("base", name, c), []), of.get(("this", name, c), [])
            if own:
                f = floors[name]
                eb, et = cpu.get(("base", "echo", c), []), cpu.get(("this", "echo", c), [])
                b = [x - e - f for x, e in zip(b, eb, strict=False)]
                t = [x - e - f for x, e in zip(t, et, strict=False)]
            return [y / x for x, y in zip(b, t, strict=False)
                    if x > 0 and not (math.isnan(x) or math.isnan(y))]

        def spread(vals: list[float]) -> str:
            if not vals:
                return f"{'-':>28}"
            v = sorted(vals)
            q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
            return f"{q[1]:>5.2f} [{q[0]:.2f}-{q[2]:.2f}] ({v[0]:.2f}-{v[-1]:.2f})"

        base_name = "this tree (A/A)" if args.aa else str(args.base.resolve())
        print(f"\nbase: {base_name}  this: {ROOT}  ({args.rounds} alternating rounds, "
              f"{args.seconds:g} s windows, medians; server CPU ms per call)")
        print(f"{'workload':<18} {'clients':>7} {'base':>8} {'this':>8} {'this/base':>9} "
              f"{'floor':>7} {'own base':>8} {'own this':>8} {'this/base':>9}")
        for name in names:
            for c in clients:
                b, t = med("base", name, c), med("this", name, c)
                line = (f"{name:<18} {c:>7} {b:>8.3f} {t:>8.3f} {t / b:>9.2f}")
                if name != "echo" and "echo" in names:
                    f = floors[name]
                    ob = b - med("base", "echo", c) - f
                    ot = t - med("this", "echo", c) - f
                    line += f" {f:>7.3f} {ob:>8.3f} {ot:>8.3f} {ot / ob:>9.2f}"
                print(line)
        print("\nrates (calls/s, medians) and failed calls (all rounds)")
        print(f"{'workload':<18} {'clients':>7} {'base':>8} {'this':>8} {'this/base':>9} "
              f"{'err base':>8} {'err this':>8}")
        for name in names:
            for c in clients:
                b, t = med("base", name, c, rates), med("this", name, c, rates)
                print(f"{name:<18} {c:>7} {b:>8.0f} {t:>8.0f} {t / b:>9.2f} "
                      f"{errors.get(('base', name, c), 0):>8} "
                      f"{errors.get(('this', name, c), 0):>8}")
        print("\npaired per-round ratios this/base: median [middle half] (extremes); "
              "run --aa for the noise")
        print(f"{'workload':<18} {'clients':>7} {'server CPU per call':>28} "
              f"{'own CPU per call':>28} {'rate':>28}")
        for name in names:
            for c in clients:
                own = (spread(paired(name, c, own=True))
                       if name != "echo" and "echo" in names else f"{'-':>28}")
                print(f"{name:<18} {c:>7} {spread(paired(name, c)):>28} {own:>28} "
                      f"{spread(paired(name, c, rates)):>28}")
        if args.rate:
            print(f"\nopen loop at {args.rate:g} calls/s offered, 8 clients: latency ms, "
                  "medians over the rounds; paired p99 ratios this/base")
            print(f"{'workload':<18} {'p50 base':>8} {'p50 this':>8} {'p99 base':>8} "
                  f"{'p99 this':>8} {'p99 this/base':>28}")
            for name in names:
                if name == "echo":
                    continue
                print(f"{name:<18} {med('base', name, 0, p50s):>8.2f} "
                      f"{med('this', name, 0, p50s):>8.2f} {med('base', name, 0, p99s):>8.2f} "
                      f"{med('this', name, 0, p99s):>8.2f} {spread(paired(name, 0, p99s)):>28}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
