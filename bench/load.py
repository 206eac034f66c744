"""Multi-process gRPC load: N concurrent clients spread over P client processes.

Each client is a thread with its own channel (``grpc.use_local_subchannel_pool``: its own TCP
connection, so SO_REUSEPORT can spread clients over the server's worker processes) making
blocking unary calls back to back (closed loop), or, with ``rate``, on a fixed schedule
(open loop; latency counted from the scheduled send time, so a late server is not hidden).

Each process generates its own messages (distinct per call) before a common start time; the
timed window is ``[start + warmup, start + warmup + duration]``. Calls that complete inside
it count for throughput; calls that start inside it give the latency percentiles.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench.messages import Workload, generate

CALL_TIMEOUT_S = 10.0


@dataclass
class LoadResult:
    clients: int
    processes: int
    duration: float
    completed: int = 0  # OK calls completed inside the window
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    exhausted: int = 0  # clients that ran out of pre-generated messages in the window
    retries: int = 0  # RESOURCE_EXHAUSTED refusals retried (server threads all busy)
    server_cores: float = math.nan  # CPU seconds of the server processes / window seconds
    client_cores: float = math.nan  # the same for the load processes

    @property
    def server_cpu_ms_per_call(self) -> float:
        if not self.completed:
            return math.nan
        return self.server_cores * self.duration / self.completed * 1e3
    gen_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.completed / self.duration

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return math.nan
        s = sorted(self.latencies_ms)
        return s[min(len(s) - 1, int(q * len(s)))]


def _client_process(
    target: str,
    w: Workload,
    threads: int,
    count: int,
    start_in: float,
    warmup: float,
    duration: float,
    rate_per_client: float | None,
    conn: Any,
) -> None:
    import grpc

    from kms import rpc

    t0 = time.perf_counter()
    msgs = generate(w, count, time.time())
    gen_s = time.perf_counter() - t0
    it = iter(msgs)
    lock = threading.Lock()
    opts: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]
    if target.startswith("ipv4:"):  # several replicas: each call to the next one
        opts.append(("grpc.lb_policy_name", "round_robin"))
    channels = [grpc.insecure_channel(target, options=opts) for _ in range(threads)]
    for ch in channels:
        grpc.channel_ready_future(ch).result(timeout=30)
    conn.send(("ready", gen_s))
    start_wall = conn.recv()  # common start time (time.time()) from the driver
    begin = start_wall + warmup
    end = begin + duration
    results: list[tuple[list[float], int, Counter[str], bool, int]] = []

    def client(ch: Any) -> None:
        stub = rpc.client_stub(ch)
        call = getattr(stub, w.method)
        lat: list[float] = []
        done = 0
        retries = 0
        errs: Counter[str] = Counter()
        exhausted = False
        interval = 1.0 / rate_per_client if rate_per_client else 0.0
        next_at = start_wall + (random.random() * interval if interval else 0.0)
        while True:
            now = time.time()
            if now < start_wall:
                time.sleep(start_wall - now)
                continue
            if interval:
                if next_at > now:
                    time.sleep(next_at - now)
                sched = next_at
                next_at += interval
            else:
                sched = time.time()
            if sched >= end:
                break
            with lock:
                wire = next(it, None)
            if wire is None:
                exhausted = time.time() < end
                break
            while True:
                try:
                    call(rpc.MikeyMessage(data=wire), timeout=CALL_TIMEOUT_S)
                    ok = True
                    break
                except grpc.RpcError as exc:
                    ok = False
                    code = exc.code()
                    err = code.name if code is not None else "?"
                    if code != grpc.StatusCode.RESOURCE_EXHAUSTED or time.time() >= end:
                        break
                    # All server threads busy (maximum_concurrent_rpcs): refused before the
                    # handler, so the same message is still fresh. Back off and retry, as a
                    # well-behaved client does; latency counts from the first attempt.
                    retries += 1
                    time.sleep(0.001 + random.random() * 0.004)
            t_end = time.time()
            if sched >= begin:
                lat.append((t_end - sched) * 1000.0)
            if begin <= t_end <= end:
                if ok:
                    done += 1
                else:
                    errs[err] += 1
        with lock:
            results.append((lat, done, errs, exhausted, retries))

    ts = [threading.Thread(target=client, args=(ch,)) for ch in channels]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for ch in channels:
        ch.close()
    conn.send(("done", results))


_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, utime + stime in seconds) of ``pid`` from /proc, None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def tree_cpu(roots: list[int]) -> float:
    """CPU seconds used so far by ``roots`` and all their descendants (Linux /proc)."""
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                stats[int(name)] = st
    want = set(roots)
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _) in stats.items():
            if ppid in want and pid not in want:
                want.add(pid)
                changed = True
    return sum(stats[p][1] for p in want if p in stats)


def run_load(
    target: str,
    w: Workload,
    *,
    clients: int,
    per_client_msgs: int,
    warmup: float,
    duration: float,
    rate: float | None = None,
    max_processes: int = 8,
    server_pid: int | None = None,
    server_pids: list[int] | None = None,
    on_window: Any = None,
) -> LoadResult:
    """Run ``clients`` concurrent clients over min(clients, max_processes) processes."""
    ctx = multiprocessing.get_context("spawn")
    procs_n = min(clients, max_processes)
    split = [clients // procs_n + (1 if i < clients % procs_n else 0) for i in range(procs_n)]
    per_client_rate = rate / clients if rate else None
    pipes = []
    procs = []
    for n in split:
        a, b = ctx.Pipe()
        p = ctx.Process(
            target=_client_process,
            args=(target, w, n, per_client_msgs * n, 0.0, warmup, duration,
                  per_client_rate, b),
            daemon=True,
        )
        p.start()
        b.close()
        pipes.append(a)
        procs.append(p)
    res = LoadResult(clients, procs_n, duration)
    try:
        for a in pipes:
            if not a.poll(300):
                raise RuntimeError("load process did not get ready")
            _kind, gen_s = a.recv()
            res.gen_s = max(res.gen_s, gen_s)
        start = time.time() + 0.2
        for a in pipes:
            a.send(start)
        roots = server_pids or ([server_pid] if server_pid is not None else [])
        if roots:
            clients_pids = [p.pid for p in procs if p.pid is not None]
            time.sleep(max(0.0, start + warmup - time.time()))
            s0, c0 = tree_cpu(roots), tree_cpu(clients_pids)
            if on_window is not None:  # the caller's own counters, read at the same moments
                on_window("start")
            time.sleep(max(0.0, start + warmup + duration - time.time()))
            s1, c1 = tree_cpu(roots), tree_cpu(clients_pids)
            if on_window is not None:
                on_window("end")
            res.server_cores = (s1 - s0) / duration
            res.client_cores = (c1 - c0) / duration
        for a in pipes:
            if not a.poll(warmup + duration + CALL_TIMEOUT_S + 60):
                raise RuntimeError("load process did not finish")
            _, results = a.recv()
            for lat, done, errs, exhausted, retries in results:
                res.retries += retries
                res.latencies_ms += lat
                res.completed += done
                res.errors.update(errs)
                res.exhausted += int(exhausted)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    return res
