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
    retries: int = 0  # RESOURCE_EXHAUSTED refusals retried (admitted calls all busy)
    server_cores: float = math.nan  # CPU seconds of the server processes / window seconds
    client_cores: float = math.nan  # the same for the load processes
    # Per serving worker (pid): TCP connections at the start of the window, calls answered
    # and CPU seconds inside it (see worker_counts; empty without a counts folder).
    workers: list[dict[str, float]] = field(default_factory=list)

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
        return percentile(self.latencies_ms, q)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank), NaN for none."""
    if not values:
        return math.nan
    s = sorted(values)
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


def _stat(pid: int, task: str = "") -> tuple[int, float] | None:
    """(parent pid, utime + stime in seconds) of ``pid`` (or of its thread ``task``) from
    /proc, None if gone."""
    path = f"/proc/{pid}/task/{task}/stat" if task else f"/proc/{pid}/stat"
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def _tree(roots: list[int]) -> tuple[set[int], dict[int, tuple[int, float]]]:
    """``roots`` and all their descendants, and every process's /proc stat."""
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
    return want, stats


def tree_cpu(roots: list[int]) -> float:
    """CPU seconds used so far by ``roots`` and all their descendants (Linux /proc)."""
    want, stats = _tree(roots)
    return sum(stats[p][1] for p in want if p in stats)


def thread_cpu(root: int) -> dict[str, float]:
    """CPU seconds used so far by each thread of ``root`` and its descendants, by thread
    id (Linux /proc)."""
    out: dict[str, float] = {}
    for pid in _tree([root])[0]:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            st = _stat(pid, tid)
            if st is not None:
                out[tid] = st[1]
    return out


def connections_by_pid(pids: list[int], port: int) -> dict[int, int]:
    """ESTABLISHED TCP connections whose local port is ``port`` held by each pid (Linux
    /proc: the socket inodes among a process's fds, matched against /proc/net/tcp*)."""
    inodes: dict[str, None] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, state, inode = parts[1], parts[3], parts[9]
                    if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes[inode] = None
        except OSError:
            continue
    out: dict[int, int] = {}
    for pid in pids:
        n = 0
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    n += 1
        except OSError:
            pass
        out[pid] = n
    return out


def read_counts(folder: Any) -> dict[int, int]:
    """Calls answered so far by each worker pid counting into ``folder`` (bench.echo)."""
    out: dict[int, int] = {}
    for name in os.listdir(folder):
        if name.isdigit():
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read(8)
            if len(data) == 8:
                out[int(name)] = int.from_bytes(data, "little")
    return out


def worker_counts(
    conns: dict[int, int], start: dict[int, int], end: dict[int, int],
    cpu0: dict[int, float], cpu1: dict[int, float],
) -> list[dict[str, float]]:
    """One row per worker pid: its connections, and calls and CPU seconds in the window."""
    return [{"pid": pid, "connections": conns.get(pid, 0),
             "calls": end[pid] - start.get(pid, 0),
             "cpu_s": cpu1.get(pid, math.nan) - cpu0.get(pid, math.nan)} for pid in sorted(end)]


def _cpu_of(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        st = _stat(pid)
        if st is not None:
            out[pid] = st[1]
    return out


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
    counts_dir: Any = None,
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
            if counts_dir is not None:
                k0 = read_counts(counts_dir)
                w0 = _cpu_of(list(k0))
                # Every client is connected by now (and none has closed yet, as at the end).
                conns = connections_by_pid(list(k0), int(target.rsplit(":", 1)[1]))
            if on_window is not None:  # the caller's own counters, read at the same moments
                on_window("start")
            time.sleep(max(0.0, start + warmup + duration - time.time()))
            s1, c1 = tree_cpu(roots), tree_cpu(clients_pids)
            if counts_dir is not None:
                k1 = read_counts(counts_dir)
                res.workers = worker_counts(conns, k0, k1, w0, _cpu_of(list(k1)))
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
