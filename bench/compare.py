"""Before/after: the quick bench against another source tree and this one, alternately.

    .venv/bin/python -m bench.run --quick --with-fork --compare /tmp/base --rounds 2

Each round runs ``bench.run`` twice as a subprocess, first with ``--tree BASE`` (the other
tree's ``kms`` and ``hsm``, same interpreter, same bench) and then on this tree, so that
the machine's drift hits both sides alike; the table gives, per exchange, the median over
the rounds of each side and their ratio (after / before). This machine's absolute numbers
move 30-50 % between runs; ratios taken within one session move much less.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# (label, key in summary["exchanges"][name], format)
METRICS: tuple[tuple[str, str, str], ...] = (
    ("server CPU ms/call, 1 client", "srv_ms_c1", ".3f"),
    ("server CPU ms/call, 8 clients", "srv_ms_c8", ".3f"),
    ("own CPU ms/call, 1 client", "own_ms_c1", ".3f"),
    ("own CPU ms/call, 8 clients", "own_ms_c8", ".3f"),
    ("peak w1 / composed floor", "peak_w1_over_composed", ".2f"),
    ("peak rate, 1 worker", "peak_w1", ",.0f"),
    ("p99 ms at half load", "half_load_p99_ms", ".2f"),
    ("2 workers / 1 worker", "scaling_w2_over_w1", ".2f"),
    ("token floor ms", "token_floor_ms", ".3f"),
)


def _median(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else math.nan


def run_side(tree: Path | None, extra: list[str], out: Path, log: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.run", *extra, "--out", str(out)]
    if tree is not None:
        cmd += ["--tree", str(tree)]
    with open(log, "ab") as f:
        subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=f, check=True)
    return dict(json.loads(out.read_text()))


def table(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per exchange and metric: medians of both sides and after / before."""
    rows: list[dict[str, Any]] = []
    names = list(after[0]["summary"]["exchanges"])
    for name in names:
        for label, key, fmt in METRICS:
            b = _median([r["summary"]["exchanges"][name][key] for r in before])
            a = _median([r["summary"]["exchanges"][name][key] for r in after])
            rows.append({"exchange": name, "metric": label, "key": key, "fmt": fmt,
                         "before": b, "after": a,
                         "after_over_before": a / b if b else math.nan,
                         "before_runs": [r["summary"]["exchanges"][name][key] for r in before],
                         "after_runs": [r["summary"]["exchanges"][name][key] for r in after]})
    for label, w, c in (("echo CPU ms/call, 1 worker 1 client", 1, 1),
                        ("echo CPU ms/call, 1 worker 8 clients", 1, 8)):
        key = f"w{w} c{c}"
        b = _median([r["summary"]["echo_cpu_ms"].get(key, math.nan) for r in before])
        a = _median([r["summary"]["echo_cpu_ms"].get(key, math.nan) for r in after])
        rows.append({"exchange": "echo", "metric": label, "key": key, "fmt": ".3f",
                     "before": b, "after": a, "after_over_before": a / b if b else math.nan})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'exchange':<18} {'metric':<32} {'before':>9} {'after':>9} {'after/before':>12}")
    for r in rows:
        fmt = r["fmt"]
        print(f"{r['exchange']:<18} {r['metric']:<32} {format(r['before'], fmt):>9} "
              f"{format(r['after'], fmt):>9} {r['after_over_before']:>12.2f}")


def compare_main(base: Path, rounds: int, extra: list[str], out: Path | None) -> int:
    if not (base / "kms" / "__init__.py").exists():
        raise SystemExit(f"--compare {base}: not a source tree with a kms package")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = RESULTS / f"compare-{stamp}"
    folder.mkdir()
    log = folder / "runs.log"
    before: list[dict[str, Any]] = []
    after: list[dict[str, Any]] = []
    started = time.time()
    for i in range(rounds):
        for side, tree, acc in (("before", base, before), ("after", None, after)):
            print(f"[{time.strftime('%H:%M:%S')}] round {i + 1}/{rounds}: {side}",
                  file=sys.stderr, flush=True)
            acc.append(run_side(tree, extra, folder / f"{side}-{i + 1}.json", log))
    rows = table(before, after)
    result = {"base": str(base.resolve()), "tree": str(ROOT), "rounds": rounds,
              "options": extra, "elapsed_s": time.time() - started, "rows": rows}
    path = out or folder / "compare.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"before: {base.resolve()}  after: {ROOT}  ({rounds} alternating rounds, medians)")
    print_table(rows)
    print(f"\nJSON: {path} (each run's own JSON and tables: {folder})")
    return 0


__all__ = ["compare_main", "print_table", "table"]
