#!/usr/bin/env python3
"""Two test runs of the openCryptoki modules at once, as two engineers' suites on one machine.

The ``ock_token`` fixture holds the machine-wide openCryptoki lock for one test module at a
time (tests/token_modules.py). This runs the same modules in two pytest processes at the same
time with ``MIKEY_KMS_OCK_TRACE`` set, then checks from the trace that

* the two runs never held the token at the same time (no overlapping lock intervals), and
* they interleaved (each got the token while the other still had modules to run),

and prints each run's time next to the wall time. Usage (from the repository root, as root):

    .venv/bin/python scripts/ock-concurrent-runs.py [pytest node ids ...]
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = [
    "tests/hsm/test_mechanisms.py",
    "tests/cli/test_token_check.py",
    "tests/hsm/test_token_modules.py",
]


def main(argv: list[str]) -> int:
    targets = argv or DEFAULT
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace"
        env = {**os.environ, "MIKEY_KMS_OCK_TRACE": str(trace)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *targets]
        start = time.monotonic()
        procs = [
            subprocess.Popen(cmd, cwd=REPO,  # noqa: S603 (our own interpreter and args)
                             env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for _ in range(2)
        ]
        ends: dict[int, float] = {}
        while len(ends) < len(procs):
            for i, p in enumerate(procs):
                if i not in ends and p.poll() is not None:
                    ends[i] = time.monotonic() - start
            time.sleep(0.05)
        outs = [p.communicate()[0] for p in procs]
        took = [ends[i] for i in range(len(procs))]
        wall = time.monotonic() - start
        lines = [ln.split() for ln in trace.read_text().splitlines()]
    for p, out in zip(procs, outs, strict=True):
        if p.returncode != 0:
            print(out[-3000:])
            print(f"a run failed (exit {p.returncode})")
            return 1
    held: list[tuple[float, float, str]] = []
    opened: dict[str, float] = {}
    for t, pid, event in lines:
        if event == "acquired":
            assert pid not in opened, f"{pid} acquired twice"
            opened[pid] = float(t)
        else:
            held.append((opened.pop(pid), float(t), pid))
    assert not opened, f"never released: {opened}"
    held.sort()
    overlaps = [(a, b) for a, b in itertools.pairwise(held) if b[0] < a[1]]
    switches = sum(1 for a, b in itertools.pairwise(held) if a[2] != b[2])
    pids = sorted({h[2] for h in held})
    print(f"lock intervals: {len(held)} (pids {', '.join(pids)}), hand-overs between runs: "
          f"{switches}, overlapping intervals: {len(overlaps)}")
    print(f"run times: {took[0]:.1f} s and {took[1]:.1f} s, wall {wall:.1f} s; token held "
          f"{sum(b - a for a, b, _ in held):.1f} s in all")
    for a, b, pid in held:
        print(f"  {pid} {a - held[0][0]:7.2f} .. {b - held[0][0]:7.2f}")
    if overlaps:
        print("FAIL: the two runs held the token at the same time")
        return 1
    if len(pids) != 2 or switches < 2:
        print("FAIL: the runs did not interleave (one waited for the other's whole session)")
        return 1
    print("ok: never shared, interleaved module by module")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
