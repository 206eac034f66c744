#!/usr/bin/env python3
"""Profile the KMS server under load with py-spy --gil (``pip install py-spy``; not a project
dependency): one exchange, N clients, the server's samples folded into a summary of where
its CPU goes (own frames and inclusive time by function).

    .venv/bin/python -m bench.profile --workload "request psk" --clients 8 --seconds 8
    .venv/bin/python -m bench.profile --echo --clients 8 --seconds 8

Writes the raw collapsed stacks to bench/results/profile-<workload>.txt (usable with
flamegraph.pl or speedscope) and prints the top functions.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# bench.run first: its --tree handling must run before anything imports kms.
from bench.run import RESULTS, server  # noqa: E402, I001
from bench.load import run_load  # noqa: E402
from bench.messages import Workload, obtain_grant  # noqa: E402


def summarise(raw: Path, top: int) -> None:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].rstrip(")")
                  for f in stack.split(";")]
        frames = [f for f in frames if f]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    print(f"\n{total} samples (active threads)")
    print("\nself time:")
    for f, n in own.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {f}")
    print("\ninclusive time:")
    for f, n in incl.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="request psk", help="e.g. 'resolve pk fork'")
    ap.add_argument("--echo", action="store_true")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--native", action="store_true", help="py-spy --native")
    ap.add_argument("--tree", type=Path, help="profile the kms/hsm of this source tree")
    ap.add_argument("--all-threads", action="store_true",
                    help="sample every active thread, not only the GIL holder")
    args = ap.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    from bench import inproc
    from bench.world import create_home
    from kms.home import open_home
    from kms.server.compose import build_handler

    parts = args.workload.split()
    ex, auth, fork = parts[0], parts[1], "fork" in parts[2:]
    tmp = Path(tempfile.mkdtemp(prefix="kms-bench-"))
    try:
        setup = create_home(tmp / "home")
        w = Workload("echo") if args.echo else Workload(ex, auth, fork, setup.kms_cert_der,
                                                        setup.pk)
        if w.exchange == "resolve":
            home = open_home(setup.home)
            kms: Any = build_handler(home)
            w = dataclasses.replace(w, grant=obtain_grant(w, inproc.request_sender(kms),
                                                          time.time()))
            home.close()
        RESULTS.mkdir(parents=True, exist_ok=True)
        raw = RESULTS / f"profile-{w.name.replace(' ', '-')}-c{args.clients}.txt"
        with server(setup.home, 1, args.echo, RESULTS) as (target, spid):
            spy = subprocess.Popen(
                [pyspy, "record", "--pid", str(spid), "--format", "raw", "--rate", str(args.rate),
                 *([] if args.all_threads else ["--gil"]),
                 "--duration", str(math.ceil(args.seconds)), "--output", str(raw),
                 *(["--native"] if args.native else [])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            r = run_load(target, w, clients=args.clients,
                         per_client_msgs=math.ceil(1500 * args.seconds / args.clients),
                         warmup=0.5, duration=args.seconds, server_pid=spid)
            spy.wait(args.seconds + 30)
        print(f"{w.name}: {r.rate:.0f}/s, p50 {r.pct(0.5):.2f} ms, p99 {r.pct(0.99):.2f} ms, "
              f"server {r.server_cores:.2f} cores, {r.server_cpu_ms_per_call:.3f} ms CPU/call")
        summarise(raw, args.top)
        print(f"\nraw stacks: {raw}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
