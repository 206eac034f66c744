#!/usr/bin/env python3
"""The KMS benchmark suite: every figure measured in one run on this machine, printed as a
table and written as JSON (bench/results/bench-<time>.json).

    .venv/bin/python -m bench.run            # full run (about 6-9 minutes on 2 cores)
    .venv/bin/python -m bench.run --quick    # fewer cases, 1 s windows (under 2 minutes)

Phases, all on 127.0.0.1 and a throwaway KMS home (see bench/world.py for its settings):

1. in-process, no gRPC: the token floor of each exchange (its PKCS#11 operations replayed
   alone), then each exchange called straight on the core with the PKCS#11 key store and
   with the pure-software key store;
2. the echo floor: the same server stack (``kms serve``'s supervisor, workers, event-loop server,
   servicer) with a handler that echoes the request, 1 / 8 / 64 clients;
3. Ticket Request and Ticket Resolve over gRPC (PSK and PK, with and without forking), 1 / 8
   / 64 concurrent clients from separate processes, p50 / p99 latency; then each at half of
   its peak rate (open loop) for the p99 target;
4. 1 -> 2 worker processes (echo and every exchange, 64 clients);
5. the echo floor again, to show how much the machine drifted during the run.

Every rate is also shown as a ratio to the echo floor (same worker count) of this run, and
every exchange's "own" CPU per call: server CPU per call minus the echo call's (same
workers and clients) minus the token floor, i.e. what our code costs beyond gRPC's floor
and the token's.

    .venv/bin/python -m bench.run --quick --with-fork --compare /tmp/base --rounds 2

runs the quick bench against another source tree (``git worktree add /tmp/base <commit>``:
its ``kms`` and ``hsm`` packages, served by this interpreter and this bench) and against
this tree alternately, and prints the before/after ratios of the issue's targets.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TREE_ENV = "KMS_BENCH_TREE"  # read by bench.echo (the servers) too


def tree_shim(tree: Path, folder: Path) -> Path:
    """A folder holding only ``kms`` and ``hsm`` of ``tree`` (symlinks): first on sys.path,
    it serves that tree's code while ``bench`` stays this one."""
    folder.mkdir(parents=True, exist_ok=True)
    for pkg in ("kms", "hsm"):
        src = tree.resolve() / pkg
        if not (src / "__init__.py").exists():
            raise SystemExit(f"--tree {tree}: no {pkg} package there")
        link = folder / pkg
        if not link.exists():
            link.symlink_to(src, target_is_directory=True)
    return folder


if "--tree" in sys.argv[:-1]:  # before anything imports kms
    _tree = Path(sys.argv[sys.argv.index("--tree") + 1])
    _shim = tree_shim(_tree, Path(tempfile.mkdtemp(prefix="kms-bench-tree-")))
    os.environ[TREE_ENV] = str(_shim)
    sys.path.insert(0, str(_shim))

from bench.compare import compare_main  # noqa: E402
from bench.load import LoadResult, run_load  # noqa: E402
from bench.messages import WORKLOADS, Workload, obtain_grant  # noqa: E402

RESULTS = ROOT / "bench" / "results"
COUNTS_ENV = "KMS_BENCH_COUNTS"  # bench.echo's per-worker call counters

# Targets (docs/performance.md): exchange >= 0.8 x composed floor; 2 workers >= 1.6 x
# 1 worker; p99 at half of peak < 10 ms; token path <= 2.5 x the software key store.
T_FLOOR = 0.8
T_SCALE = 1.6
T_P99_MS = 10.0
T_TOKEN_SW = 2.5
# The second pass's targets (issue "halve what our own code costs per exchange"): each PSK
# exchange >= 0.6 x its composed floor with one worker, PK >= 0.7 x; own CPU per PSK
# exchange at most half of the branch point's (--compare).
T_FLOOR_PSK = 0.6
T_FLOOR_PK = 0.7
T_OWN = 0.5


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(
    home: Path, workers: int, echo: bool, logdir: Path, counts: Path | None = None
) -> Any:
    """``bench.echo`` serving ``home``; with ``counts`` (an empty folder) every worker
    counts its calls there (bench.load.read_counts)."""
    port = free_port()
    listen = f"127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "bench.echo", "--home", str(home), "--listen", listen,
           "--workers", str(workers)] + (["--echo"] if echo else [])
    env = dict(os.environ)
    if counts is not None:
        env[COUNTS_ENV] = str(counts)
    errlog = open(logdir / f"server-{'echo' if echo else 'kms'}-w{workers}.log", "ab")  # noqa: SIM115
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=errlog, text=True,
                         env=env)
    try:
        deadline = time.monotonic() + 120
        assert p.stdout is not None
        while True:
            line = p.stdout.readline()
            if "serving on" in line:
                break
            if not line or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start (see {errlog.name})")
        yield listen, p.pid
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        errlog.close()


def load_row(name: str, workers: int, r: LoadResult, echo: float, **extra: Any) -> dict[str, Any]:
    return {
        "workload": name,
        "workers": workers,
        "clients": r.clients,
        "client_processes": r.processes,
        "rate": r.rate,
        "x_echo": r.rate / echo if echo else math.nan,
        "p50_ms": r.pct(0.50),
        "p99_ms": r.pct(0.99),
        "calls": r.completed,
        "errors": dict(r.errors),
        "retried_resource_exhausted": r.retries,
        "exhausted_clients": r.exhausted,
        "server_cores": r.server_cores,
        "client_cores": r.client_cores,
        "server_cpu_ms_per_call": r.server_cpu_ms_per_call,
        "per_worker": r.workers,
        **extra,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer cases, 1 s windows")
    ap.add_argument("--seconds", type=float, help="timed window per gRPC case")
    ap.add_argument("--out", type=Path, help="JSON output path")
    ap.add_argument("--keep-home", action="store_true", help="keep the throwaway KMS home")
    ap.add_argument("--with-fork", action="store_true",
                    help="with --quick: the forking exchanges too")
    ap.add_argument("--tree", type=Path,
                    help="measure the kms/hsm packages of this source tree instead")
    ap.add_argument("--compare", type=Path, metavar="BASE_TREE",
                    help="alternate runs against BASE_TREE and this tree; before/after table")
    ap.add_argument("--rounds", type=int, default=2, help="with --compare: runs per tree")
    args = ap.parse_args()
    if args.compare is not None:
        passthrough = [a for a in ("--quick", "--with-fork") if getattr(args, a[2:].replace(
            "-", "_"))] + (["--seconds", str(args.seconds)] if args.seconds else [])
        return compare_main(args.compare, args.rounds, passthrough, args.out)
    quick = args.quick
    duration = args.seconds or (1.0 if quick else 3.0)
    warmup = 0.3 if quick else 0.5
    inproc_s = 0.6 if quick else 1.5
    clients_list = (1, 8, 64)
    scale_clients = (8, 64)  # 8: where SO_REUSEPORT's spread of few connections shows
    workloads = [w for w in WORKLOADS if not (quick and w[2] and not args.with_fork)]
    started = time.time()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / f"bench-{stamp}.json"
    tmp = Path(tempfile.mkdtemp(prefix="kms-bench-"))
    home_path = tmp / "home"
    logdir = RESULTS / f"logs-{stamp}"
    logdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "settings": {"duration_s": duration, "warmup_s": warmup, "inproc_s": inproc_s,
                     "quick": quick},
        "tree": str(args.tree.resolve()) if args.tree else str(ROOT),
    }
    try:
        # --- setup ---------------------------------------------------------------------
        from bench.world import create_home

        log(f"creating the bench KMS home in {home_path}")
        setup = create_home(home_path)

        # --- 1. in-process: token floor, token key store, software key store ------------
        from bench import inproc
        from kms.home import open_home
        from kms.server.compose import build_handler

        home = open_home(home_path)
        token_kms: Any = build_handler(home)
        sw_kms, sw_cert = inproc.software_kms(token_kms, setup)
        token_ks = token_kms.deps.keystore
        grants: dict[bool, Any] = {}
        floors: dict[str, Any] = {}
        inproc_rows: list[dict[str, Any]] = []
        for ex, auth, fork in workloads:
            name = Workload(ex, auth, fork).name
            base_t = Workload(ex, auth, fork, setup.kms_cert_der, setup.pk)
            base_s = Workload(ex, auth, fork, sw_cert, setup.pk)
            if ex == "resolve":
                if fork not in grants:
                    grants[fork] = obtain_grant(base_t, inproc.request_sender(token_kms),
                                                time.time())
                sw_grant = obtain_grant(base_s, inproc.request_sender(sw_kms), time.time())
                base_t = dataclasses.replace(base_t, grant=grants[fork])
                base_s = dataclasses.replace(base_s, grant=sw_grant)
            from bench.messages import generate

            calls = inproc.record_ops(token_kms, base_t, generate(base_t, 1, time.time())[0])
            tf = inproc.token_floor(token_ks, calls, 0.25 if quick else 0.6)
            floors[name] = {"seconds": tf.seconds, "ops": dict(tf.ops),
                            "by_kind_s": tf.by_kind_s}
            # Alternating rounds, median: machine noise hits both key stores alike.
            rts, rss = [], []
            for _ in range(3):
                rts.append(inproc.measure_inproc(token_kms, base_t, inproc_s / 3))
                rss.append(inproc.measure_inproc(sw_kms, base_s, inproc_s / 3))
            rt = sorted(rts, key=lambda x: x.rate)[1]
            rs = sorted(rss, key=lambda x: x.rate)[1]
            inproc_rows.append({
                "workload": name,
                "token_rate": rt.rate, "token_p50_ms": rt.p50_ms, "token_p99_ms": rt.p99_ms,
                "software_rate": rs.rate, "software_p50_ms": rs.p50_ms,
                "software_p99_ms": rs.p99_ms,
                "token_over_software": rs.rate / rt.rate,
            })
            log(f"in-process {name}: token floor {tf.seconds * 1e3:.3f} ms "
                f"({sum(tf.ops.values())} ops), token {rt.rate:.0f}/s, "
                f"software {rs.rate:.0f}/s")
        home.close()
        del token_kms, sw_kms
        result["token_floor"] = floors
        result["inproc"] = inproc_rows
        inproc_rate = {r["workload"]: r["token_rate"] for r in inproc_rows}

        # --- 2-4. gRPC -----------------------------------------------------------------
        echo_w = Workload("echo")
        echo_floor: dict[int, float] = {}
        grpc_rows: list[dict[str, Any]] = []
        half_rows: list[dict[str, Any]] = []

        def counts_dir() -> Path:
            return Path(tempfile.mkdtemp(prefix="counts-", dir=tmp))

        def echo_runs(workers: int, clients: tuple[int, ...], tag: str = "") -> None:
            cdir = counts_dir()
            with server(home_path, workers, True, logdir, cdir) as (target, spid):
                best = 0.0
                rows = []
                for n in clients:
                    per = math.ceil(15000 * (warmup + duration) / n) + 5
                    r = run_load(target, echo_w, clients=n, per_client_msgs=per,
                                 warmup=warmup, duration=duration, server_pid=spid,
                                 counts_dir=cdir)
                    rows.append(r)
                    best = max(best, r.rate)
                    log(f"echo{tag} w={workers} c={n}: {r.rate:.0f} RPC/s "
                        f"p50 {r.pct(0.5):.2f} ms p99 {r.pct(0.99):.2f} ms")
                if not tag:
                    echo_floor[workers] = best
                for r in rows:
                    grpc_rows.append(load_row("echo" + tag, workers, r, echo_floor[workers]))

        def exchange_runs(workers: int, clients: tuple[int, ...], half: bool) -> None:
            cdir = counts_dir()
            with server(home_path, workers, False, logdir, cdir) as (target, spid):
                for ex, auth, fork in workloads:
                    name = Workload(ex, auth, fork).name
                    w = Workload(ex, auth, fork, setup.kms_cert_der, setup.pk,
                                 grants.get(fork) if ex == "resolve" else None)
                    cap = min(echo_floor[workers], workers * 2.0 * inproc_rate[name])
                    peak = 0.0
                    for n in clients:
                        per = math.ceil(cap * (warmup + duration) * 1.3 / n) + 3
                        r = run_load(target, w, clients=n, per_client_msgs=per,
                                     warmup=warmup, duration=duration, server_pid=spid,
                                     counts_dir=cdir)
                        peak = max(peak, r.rate)
                        grpc_rows.append(load_row(name, workers, r, echo_floor[workers]))
                        log(f"{name} w={workers} c={n}: {r.rate:.0f}/s p50 "
                            f"{r.pct(0.5):.2f} ms p99 {r.pct(0.99):.2f} ms"
                            + (f" errors {dict(r.errors)}" if r.errors else "")
                            + (f" EXHAUSTED {r.exhausted}" if r.exhausted else ""))
                    if half:
                        rate = peak / 2
                        n = 8
                        per = math.ceil(rate * (warmup + duration) * 1.3 / n) + 3
                        r = run_load(target, w, clients=n, per_client_msgs=per,
                                     warmup=warmup, duration=duration, rate=rate,
                                     server_pid=spid)
                        half_rows.append(load_row(name, workers, r, echo_floor[workers],
                                                  offered_rate=rate, peak_rate=peak))
                        log(f"{name} half load ({rate:.0f}/s offered, 8 clients): "
                            f"{r.rate:.0f}/s p50 {r.pct(0.5):.2f} ms "
                            f"p99 {r.pct(0.99):.2f} ms")

        echo_runs(1, clients_list)
        exchange_runs(1, clients_list, half=True)
        echo_runs(2, scale_clients)
        exchange_runs(2, scale_clients, half=False)
        echo_runs(1, (64,), tag=" (again, end of run)")
        result["echo_floor"] = {str(k): v for k, v in echo_floor.items()}
        result["grpc"] = grpc_rows
        result["half_load"] = half_rows
        result["elapsed_s"] = time.time() - started
        result["summary"] = summarise(result, workloads)
        out.write_text(json.dumps(result, indent=2, default=str))
        print_tables(result)
        print(f"\nJSON: {out}\nelapsed: {result['elapsed_s']:.0f} s")
    finally:
        if args.keep_home:
            log(f"kept {home_path}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _peak(rows: list[dict[str, Any]], name: str, workers: int) -> float:
    return max((r["rate"] for r in rows if r["workload"] == name and r["workers"] == workers),
               default=math.nan)


def summarise(res: dict[str, Any], workloads: list[tuple[str, str, bool]]) -> dict[str, Any]:
    echo1 = res["echo_floor"]["1"]
    echo2 = res["echo_floor"].get("2", math.nan)
    t_echo = 1.0 / echo1
    grpc = res["grpc"]
    echo_cpu = echo_cpu_ms(res)
    for r in grpc:
        r["own_ms_per_call"] = own_ms(r, echo_cpu, res["token_floor"])
    out: dict[str, Any] = {"echo_call_ms": t_echo * 1e3,
                           "echo_scaling": echo2 / echo1, "exchanges": {},
                           "echo_cpu_ms": {f"w{w} c{c}": v for (w, c), v in echo_cpu.items()}}
    for ex, auth, fork in workloads:
        name = Workload(ex, auth, fork).name
        floor_s = res["token_floor"][name]["seconds"]
        composed = 1.0 / (t_echo + floor_s)
        p1 = _peak(grpc, name, 1)
        p2 = _peak(grpc, name, 2)
        half = next((r for r in res["half_load"] if r["workload"] == name), None)
        ip = next(r for r in res["inproc"] if r["workload"] == name)
        t_floor = T_FLOOR_PK if " pk" in name else T_FLOOR_PSK
        w2 = [r for r in grpc if r["workload"] == name and r["workers"] == 2]
        w2_peak = max(w2, key=lambda r: r["rate"], default=None)
        w1 = [r for r in grpc if r["workload"] == name and r["workers"] == 1]
        w1_peak = max(w1, key=lambda r: r["rate"], default=None)
        # What 2 workers can reach on this machine: the cores the load generator leaves,
        # over what one worker used at its peak (2 at most).
        bound = math.nan
        if w2_peak and w1_peak and w1_peak["server_cores"] > 0:
            left = (res["machine"]["cpus"] or 2) - w2_peak["client_cores"]
            bound = min(2.0, left / w1_peak["server_cores"])
        out["exchanges"][name] = {
            "own_ms_c1": _own_at(grpc, name, 1, 1),
            "own_ms_c8": _own_at(grpc, name, 1, 8),
            "srv_ms_c1": _srv_at(grpc, name, 1, 1),
            "srv_ms_c8": _srv_at(grpc, name, 1, 8),
            "scaling_bound": bound,
            "w2_balance": balance(w2_peak),
            "token_floor_ms": floor_s * 1e3,
            "composed_floor": composed,
            "peak_w1": p1,
            "peak_w1_over_composed": p1 / composed,
            "peak_w2": p2,
            "peak_w2_over_2x_composed": p2 / (2 * composed),
            "scaling_w2_over_w1": p2 / p1,
            "half_load_p99_ms": half["p99_ms"] if half else math.nan,
            "token_over_software": ip["token_over_software"],
            "floor_target": t_floor,
            "targets": {
                "floor>=0.6/0.7": p1 / composed >= t_floor,
                "floor>=0.8": p1 / composed >= T_FLOOR,
                "scaling>=1.6": p2 / p1 >= T_SCALE,
                "p99@half<10ms": bool(half and half["p99_ms"] < T_P99_MS),
                "token<=2.5xsw": ip["token_over_software"] <= T_TOKEN_SW,
            },
        }
    return out


def echo_cpu_ms(res: dict[str, Any]) -> dict[tuple[int, int], float]:
    """Server CPU per echo call by (workers, clients), from the first echo runs."""
    return {(r["workers"], r["clients"]): r["server_cpu_ms_per_call"]
            for r in res["grpc"] if r["workload"] == "echo"}


def own_ms(
    row: dict[str, Any], echo_cpu: dict[tuple[int, int], float], floors: dict[str, Any]
) -> float:
    """Server CPU per call - echo CPU per call (same workers and clients) - token floor."""
    f = floors.get(row["workload"])
    e = echo_cpu.get((row["workers"], row["clients"]))
    if f is None or e is None:
        return math.nan
    return float(row["server_cpu_ms_per_call"] - e - f["seconds"] * 1e3)


def _own_at(rows: list[dict[str, Any]], name: str, workers: int, clients: int) -> float:
    return next((r.get("own_ms_per_call", math.nan) for r in rows if r["workload"] == name
                 and r["workers"] == workers and r["clients"] == clients), math.nan)


def _srv_at(rows: list[dict[str, Any]], name: str, workers: int, clients: int) -> float:
    return next((r["server_cpu_ms_per_call"] for r in rows if r["workload"] == name
                 and r["workers"] == workers and r["clients"] == clients), math.nan)


def balance(row: dict[str, Any] | None) -> dict[str, Any]:
    """How evenly a multi-worker row's calls and connections were spread."""
    per = (row or {}).get("per_worker") or []
    calls = [w["calls"] for w in per]
    if len(calls) < 2 or not max(calls):
        return {"calls": calls, "connections": [w["connections"] for w in per],
                "min_over_max": math.nan}
    return {"calls": calls, "connections": [w["connections"] for w in per],
            "min_over_max": min(calls) / max(calls)}


def print_tables(res: dict[str, Any]) -> None:
    s = res["summary"]
    echo1 = res["echo_floor"]["1"]
    print(f"\nEcho floor (same server stack, 1 worker): {echo1:,.0f} RPC/s "
          f"({s['echo_call_ms']:.3f} ms per call); 2 workers: "
          f"{res['echo_floor'].get('2', math.nan):,.0f} RPC/s (x{s['echo_scaling']:.2f})")
    again = [r for r in res["grpc"] if r["workload"].startswith("echo (again")]
    if again:
        print(f"Echo at the end of the run (64 clients): {again[0]['rate']:,.0f} RPC/s "
              f"(x{again[0]['rate'] / echo1:.2f} of the first): machine drift")
    print("\nToken floor (PKCS#11 operations of one exchange, each replayed alone)")
    print(f"{'exchange':<18} {'ms':>7} {'x echo call':>11}  operations")
    for name, f in res["token_floor"].items():
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(f["ops"].items()))
        x_call = f["seconds"] / s["echo_call_ms"] * 1e3
        print(f"{name:<18} {f['seconds'] * 1e3:>7.3f} {x_call:>11.2f}  {ops}")
    print("\nIn-process, no gRPC, one thread (median of 3 alternating rounds; x echo floor)")
    print(f"{'exchange':<18} {'token/s':>8} {'x echo':>7} {'p50 ms':>7} {'software/s':>10} "
          f"{'x echo':>7} {'p50 ms':>7} {'sw/token':>8}")
    for r in res["inproc"]:
        print(f"{r['workload']:<18} {r['token_rate']:>8,.0f} {r['token_rate'] / echo1:>7.3f} "
              f"{r['token_p50_ms']:>7.2f} {r['software_rate']:>10,.0f} "
              f"{r['software_rate'] / echo1:>7.3f} {r['software_p50_ms']:>7.2f} "
              f"{r['token_over_software']:>8.2f}")
    print("\ngRPC (rate, ratio to the echo floor of the same worker count, latency)")
    print(f"{'workload':<28} {'w':>2} {'clients':>7} {'rate/s':>8} {'x echo':>7} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'srv cores':>9} {'cli cores':>9} {'srv ms/call':>11}"
          f" {'own ms':>7}  notes")
    for r in res["grpc"]:
        notes = []
        if r["errors"]:
            notes.append(f"errors {r['errors']}")
        if r["retried_resource_exhausted"]:
            notes.append(f"{r['retried_resource_exhausted']} retries (all threads busy)")
        if r["exhausted_clients"]:
            notes.append(f"{r['exhausted_clients']} clients ran out of messages")
        print(f"{r['workload']:<28} {r['workers']:>2} {r['clients']:>7} {r['rate']:>8,.0f} "
              f"{r['x_echo']:>7.3f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} "
              f"{r['server_cores']:>9.2f} {r['client_cores']:>9.2f} "
              f"{r['server_cpu_ms_per_call']:>11.3f} {r.get('own_ms_per_call', math.nan):>7.3f}"
              f"  {'; '.join(notes)}")
    multi = [r for r in res["grpc"] if r["workers"] > 1 and r.get("per_worker")]
    if multi:
        print("\nPer worker (SO_REUSEPORT spreads connections; calls and CPU in the window)")
        print(f"{'workload':<28} {'clients':>7} {'connections':>12} {'calls':>16} "
              f"{'cpu s':>12} {'min/max calls':>13}")
        for r in multi:
            per = r["per_worker"]
            conns = "/".join(str(w["connections"]) for w in per)
            calls = "/".join(str(w["calls"]) for w in per)
            cpu = "/".join(f"{w['cpu_s']:.2f}" for w in per)
            print(f"{r['workload']:<28} {r['clients']:>7} {conns:>12} {calls:>16} {cpu:>12} "
                  f"{balance(r)['min_over_max']:>13.2f}")
    print("\nHalf of peak load (open loop, 8 clients, 1 worker)")
    print(f"{'exchange':<18} {'offered/s':>9} {'done/s':>8} {'x echo':>7} {'p50 ms':>7} "
          f"{'p99 ms':>7}")
    for r in res["half_load"]:
        print(f"{r['workload']:<18} {r['offered_rate']:>9,.0f} {r['rate']:>8,.0f} "
              f"{r['x_echo']:>7.3f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f}")
    print("\nTargets (composed floor = 1 / (echo call time + token floor), per worker)")
    print(f"{'exchange':<18} {'composed/s':>10} {'peak w1':>8} {'ratio':>6} {'>=0.8':>5} "
          f"{'w2/w1':>6} {'>=1.6':>5} {'p99@½':>6} {'<10':>4} {'tok/sw':>6} {'<=2.5':>5}")
    for name, e in s["exchanges"].items():
        t = e["targets"]

        def yn(ok: bool) -> str:
            return "yes" if ok else "NO"

        print(f"{name:<18} {e['composed_floor']:>10,.0f} {e['peak_w1']:>8,.0f} "
              f"{e['peak_w1_over_composed']:>6.2f} {yn(t['floor>=0.8']):>5} "
              f"{e['scaling_w2_over_w1']:>6.2f} {yn(t['scaling>=1.6']):>5} "
              f"{e['half_load_p99_ms']:>6.2f} {yn(t['p99@half<10ms']):>4} "
              f"{e['token_over_software']:>6.2f} {yn(t['token<=2.5xsw']):>5}")
    print("\nSecond-pass targets (own = server CPU/call - echo CPU/call at the same workers and "
          "clients - token floor;\n  w2 bound = what 2 workers can reach here: cores the load "
          "generator leaves / cores 1 worker used)")
    print(f"{'exchange':<18} {'own c1':>7} {'own c8':>7} {'ratio':>6} {'target':>6} {'met':>4} "
          f"{'p99@½':>6} {'<10':>4} {'w2/w1':>6} {'bound':>6} {'>=1.6':>5} {'balance':>7}")
    for name, e in s["exchanges"].items():
        t = e["targets"]
        print(f"{name:<18} {e['own_ms_c1']:>7.3f} {e['own_ms_c8']:>7.3f} "
              f"{e['peak_w1_over_composed']:>6.2f} {e['floor_target']:>6.1f} "
              f"{'yes' if t['floor>=0.6/0.7'] else 'NO':>4} {e['half_load_p99_ms']:>6.2f} "
              f"{'yes' if t['p99@half<10ms'] else 'NO':>4} {e['scaling_w2_over_w1']:>6.2f} "
              f"{e['scaling_bound']:>6.2f} {'yes' if t['scaling>=1.6'] else 'NO':>5} "
              f"{e['w2_balance']['min_over_max']:>7.2f}")


if __name__ == "__main__":
    sys.exit(main())
