"""Cluster mode, measured: 1 replica on SQLite against 1, 2 and 3 replicas on PostgreSQL, in
one run on one machine.

    .venv/bin/python -m bench.cluster [--seconds 4] [--clients 16] [--out FILE]

Steps: a bench home (embedded SoftHSM2 token) serves on SQLite; then `kms store migrate`
moves it into a private PostgreSQL 15 cluster (started here, as the `postgres` user when run
as root, fsync ON as in production) and replicas are made with `kms store replica` (same
token directory, same database). For each set-up and for the Ticket Request and Ticket
Resolve PSK exchanges (J = 1 ticket, so the resolve ledger is not touched) it reports:

* exchanges/s, p50 / p99 latency (closed loop, ``--clients`` concurrent clients spread over
  the replicas by gRPC round robin);
* KMS server CPU per exchange (all replicas' process trees, from /proc) and PostgreSQL CPU
  per exchange (the postmaster's tree);
* database round trips per exchange: statements the KMS database ran (pg_stat_statements;
  every statement is one autocommit round trip) over the exchanges of the load. Background
  work (registry watch polls, pruning) is included, so this is an upper bound.

The per-identity rate limit is ON (at a rate the bench never reaches) so that its round trip
is counted; everything else is the production configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from bench.load import LoadResult, run_load
from bench.messages import Workload, obtain_grant
from bench.world import create_home

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[bench.cluster] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def replicas(homes: list[Path], logdir: Path) -> Iterator[tuple[list[str], list[int]]]:
    procs = []
    targets = []
    try:
        for i, home in enumerate(homes):
            listen = f"127.0.0.1:{free_port()}"
            err = open(logdir / f"{home.name}-{i}.log", "ab")  # noqa: SIM115
            p = subprocess.Popen(
                [sys.executable, "-m", "bench.echo", "--home", str(home), "--listen", listen],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
            )
            procs.append((p, err))
            targets.append(listen)
        for p, err in procs:
            assert p.stdout is not None
            deadline = time.monotonic() + 120
            while "serving on" not in (line := p.stdout.readline()):
                if not line or time.monotonic() > deadline:
                    raise RuntimeError(f"replica did not start (see {err.name})")
        yield targets, [p.pid for p, _ in procs]
    finally:
        for p, err in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            err.close()


def db_statements(dsn: str | None) -> int:
    """Statements the KMS database has run so far (pg_stat_statements, updated at the end of
    each statement; the bench's own statistics queries are excluded)."""
    if dsn is None:
        return 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s "
            "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = current_database() "
            "AND s.query NOT LIKE '%pg_stat_statements%'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def measure(
    name: str, homes: list[Path], w_kind: str, args: argparse.Namespace, logdir: Path,
    dsn: str | None, pg_pid: int | None,
) -> dict[str, Any]:
    from bench.load import tree_cpu

    with replicas(homes, logdir) as (targets, pids):
        target = targets[0] if len(targets) == 1 else "ipv4:" + ",".join(targets)
        w = Workload(w_kind, "psk")
        if w_kind == "resolve":
            import grpc

            from kms import rpc as stubs

            with grpc.insecure_channel(targets[0]) as ch:
                stub = stubs.client_stub(ch)
                grant = obtain_grant(
                    w, lambda b: bytes(stub.RequestTicket(stubs.MikeyMessage(data=b)).data),
                    time.time(),
                )
            w = Workload(w_kind, "psk", grant=grant)
        marks: dict[str, tuple[int, float]] = {}

        def on_window(which: str) -> None:
            marks[which] = (db_statements(dsn), tree_cpu([pg_pid]) if pg_pid else 0.0)

        r: LoadResult = run_load(
            target, w, clients=args.clients, per_client_msgs=args.msgs,
            warmup=1.0, duration=args.seconds, server_pids=pids, on_window=on_window,
        )
    (x0, pg0), (x1, pg1) = marks["start"], marks["end"]
    done = r.completed or math.nan
    row = {
        "setup": name,
        "exchange": w.name,
        "replicas": len(homes),
        "rate": round(r.rate, 1),
        "p50_ms": round(r.pct(0.5), 2),
        "p99_ms": round(r.pct(0.99), 2),
        "srv_cpu_ms": round(r.server_cpu_ms_per_call, 3),
        "pg_cpu_ms": round((pg1 - pg0) / done * 1e3, 3) if pg_pid else 0.0,
        "db_rt": round((x1 - x0) / done, 2) if dsn else 0.0,
        "errors": dict(r.errors),
        "exhausted": r.exhausted,
    }
    log(json.dumps(row))
    return row


def inproc_cpu(home: Path, setup: str, n: int) -> dict[str, Any]:
    """Server CPU per exchange without gRPC and without load noise from other processes:
    the core with this home's stores, called in this process, one thread (process CPU time
    over ``n`` Ticket Requests and ``n`` reusable-ticket Ticket Resolves)."""
    from bench.world import ALICE, BOB, KMS_ID, PSKS
    from hsm.software import SoftwareKeyStore
    from kms.endpoint.common import Credentials
    from kms.endpoint.initiator import DEFAULT_FLAGS, DesiredPolicy, Initiator
    from kms.endpoint.responder import Responder
    from kms.endpoint.session import CryptoSession
    from kms.home import open_home
    from kms.mikey.ticket import TpFlag
    from kms.server.compose import build_handler

    h = open_home(home)
    try:
        handler = build_handler(h)
        h.stores.start_background()
        ks = SoftwareKeyStore()
        ini = Initiator(Credentials(ALICE, PSKS[ALICE], KMS_ID.encode()), ks)
        bob = Responder(Credentials(BOB, PSKS[BOB], KMS_ID.encode()), ks)
        desired = DesiredPolicy(responders=(BOB,), flags=DEFAULT_FLAGS | TpFlag.J)
        t = time.time()
        reqs = [ini.request_ticket(desired, t) for _ in range(n + 5)]
        grant = ini.accept_ticket(reqs[0][1], handler.request_ticket(reqs[0][0], t).data, t)
        res = []
        for _ in range(n + 5):
            ti, _ = ini.transfer_init(grant, t, BOB, [CryptoSession(1, 5)])
            res.append(bob.receive_transfer_init(ti, t)[0])
        for w, _ in reqs[1:5]:  # warm-up: caches, token working copies
            handler.request_ticket(w, time.time())
        for w in res[:5]:
            handler.resolve_ticket(w, time.time())
        c0 = time.process_time()
        for w, _ in reqs[5:]:
            assert handler.request_ticket(w, time.time()).outcome.value == "ok"
        c1 = time.process_time()
        for w in res[5:]:
            assert handler.resolve_ticket(w, time.time()).outcome.value == "ok"
        c2 = time.process_time()
    finally:
        h.close()
    row = {"setup": setup, "request_cpu_ms": round((c1 - c0) / n * 1e3, 3),
           "resolve_cpu_ms": round((c2 - c1) / n * 1e3, 3)}
    log(json.dumps(row))
    return row


def set_rate(home: Path, rate: int) -> None:
    conf = home / "kms.toml"
    text, n = re.subn(r"(?m)^rate_limit_per_s = .*$", f"rate_limit_per_s = {rate}",
                      conf.read_text())
    assert n == 1
    conf.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--msgs", type=int, default=1500, help="messages per client")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--inproc", type=int, default=300, help="in-process exchanges per kind")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from kms.server.replica import make_replica_home
    from kms.server.store_migrate import migrate_home
    from tests.pgcluster import running_pg

    tmp = Path(tempfile.mkdtemp(prefix="kms-bench-cluster-"))
    logdir = tmp / "logs"
    logdir.mkdir()
    rows: list[dict[str, Any]] = []
    try:
        home = tmp / "home1"
        create_home(home)
        set_rate(home, 1_000_000)  # on, never reached: its round trip is counted
        inproc = [inproc_cpu(home, "sqlite", args.inproc)]
        for kind in ("request", "resolve"):
            rows.append(measure("sqlite", [home], kind, args, logdir, None, None))
        with running_pg(fsync=True,
                        extra="-c shared_preload_libraries=pg_stat_statements") as pg:
            dsn = pg.dsn(pg.create_database("bench"))
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION pg_stat_statements")
            moved = migrate_home(home, dsn)
            log(f"migrated: {moved.describe()}")
            inproc.append(inproc_cpu(home, "postgresql", args.inproc))
            inproc.append(inproc_cpu(home, "postgresql", args.inproc))  # twice: noise check
            homes = [home]
            for n in (2, 3):
                homes.append(make_replica_home(home, tmp / f"home{n}"))
            for n in (1, 2, 3):
                for kind in ("request", "resolve"):
                    rows.append(measure(f"postgresql x{n}", homes[:n], kind, args, logdir,
                                        dsn, pg.postmaster_pid()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(rows)
    print("\nin-process server CPU per exchange (no gRPC; one thread):")
    for r in inproc:
        print(f"  {r['setup']:<11} request {r['request_cpu_ms']:.3f} ms   "
              f"resolve {r['resolve_cpu_ms']:.3f} ms")
    out = args.out or ROOT / "bench" / "results" / f"cluster-{int(time.time())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "inproc": inproc, "cores": os.cpu_count(),
                               "clients": args.clients, "seconds": args.seconds}, indent=2))
    print(f"\nwritten {out}")
    return 0


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ["setup", "exchange", "rate/s", "p50 ms", "p99 ms", "srv CPU ms", "pg CPU ms",
            "db rt", "vs sqlite CPU", "errors"]
    base = {r["exchange"]: r["srv_cpu_ms"] for r in rows if r["setup"] == "sqlite"}
    table = [head]
    for r in rows:
        ratio = r["srv_cpu_ms"] / base[r["exchange"]] - 1 if base.get(r["exchange"]) else 0.0
        table.append([r["setup"], r["exchange"], f"{r['rate']:.0f}", f"{r['p50_ms']:.1f}",
                      f"{r['p99_ms']:.1f}", f"{r['srv_cpu_ms']:.2f}", f"{r['pg_cpu_ms']:.2f}",
                      f"{r['db_rt']:.2f}", f"{ratio:+.0%}", str(sum(r["errors"].values()))])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    print()
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    cpu = {r["setup"]: r["srv_cpu_ms"] for r in rows if r["exchange"] == "request psk"}
    if cpu:
        print("\nprojected request exchanges/s per added core (1000 / server CPU ms): "
              + ", ".join(f"{k}: {1000 / v:.0f}" for k, v in cpu.items() if v))


if __name__ == "__main__":
    sys.exit(main())
