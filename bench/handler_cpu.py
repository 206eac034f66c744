"""The same handler in-process and inside a gRPC server: CPU of the handler's own thread per
call, with the garbage collector's runs and the thread's context switches next to it.

    .venv/bin/python -m bench.handler_cpu [--workload "request psk"] [--rounds 2]
    .venv/bin/python -m bench.handler_cpu --gc freeze      # gc.freeze() after start-up
    .venv/bin/python -m bench.handler_cpu --gc off         # no collections while measured

One process builds the handler of a bench home (``build_handler``, as ``bench.inproc``
does) and serves it with ``KmsServer`` (one core slot, as a SoftHSM worker has) on
127.0.0.1; load processes (``bench.load``) call it at 1 and 8 clients. Each round first
runs the handler in-process (with and without a correlation id, which the server passes)
and then under the server. Thread CPU (``time.thread_time``) is taken around the handler
call in the serving thread, so the gRPC machinery outside the handler is not in it; context
switches (``getrusage(RUSAGE_THREAD)``: voluntary ones are waits, e.g. for the GIL after a
token call; involuntary ones preemption) and the collector's runs (``gc.callbacks``) per
call say what differs between the two. Not part of the test suite; numbers move with the
machine's load (docs/performance.md, "Second pass, part C").
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import inproc
from bench.load import run_load
from bench.messages import WORKLOADS, Workload, generate, obtain_grant

CORRELATION_ID = "0123456789abcdef0123456789abcdef"


@dataclasses.dataclass
class Tally:
    """Per-call sums over one measured window."""

    calls: int = 0
    cpu: float = 0.0
    voluntary: int = 0
    involuntary: int = 0
    gc_runs: list[int] = dataclasses.field(default_factory=lambda: [0, 0, 0])
    gc_cpu: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0, 0.0])

    def line(self) -> str:
        n = max(self.calls, 1)
        gcs = ", ".join(f"gen{g} {self.gc_runs[g] / n:.3f} runs {self.gc_cpu[g] / n * 1e3:.4f} ms"
                        for g in range(3))
        return (f"{self.cpu / n * 1e3:.3f} ms thread CPU/call over {self.calls} calls; "
                f"context switches/call voluntary {self.voluntary / n:.2f} involuntary "
                f"{self.involuntary / n:.2f}; gc/call {gcs}")


class Measured:
    """The handler, measured around each call in the calling thread while ``tally`` is set."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.tally: Tally | None = None
        self._lock = threading.Lock()

    def _timed(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        tally = self.tally
        if tally is None:
            return fn(*args, **kwargs)
        r0, c0 = resource.getrusage(resource.RUSAGE_THREAD), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            cpu = time.thread_time() - c0
            r1 = resource.getrusage(resource.RUSAGE_THREAD)
            with self._lock:
                tally.calls += 1
                tally.cpu += cpu
                tally.voluntary += r1.ru_nvcsw - r0.ru_nvcsw
                tally.involuntary += r1.ru_nivcsw - r0.ru_nivcsw

    # No steps (kms.server.federated): the server then runs each whole call, a PK
    # message's RSA operation included, in the serving thread, where it is measured.
    request_steps = None
    resolve_steps = None

    def request_ticket(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed(self._inner.request_ticket, *args, **kwargs)

    def resolve_ticket(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed(self._inner.resolve_ticket, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class GcWatch:
    """Thread CPU of each collection, by generation, into the current tally."""

    def __init__(self) -> None:
        self.tally: Tally | None = None
        self._start: dict[int, float] = {}

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        me = threading.get_ident()
        if phase == "start":
            self._start[me] = time.thread_time()
            return
        began = self._start.pop(me, None)
        if self.tally is not None and began is not None:
            g = info["generation"]
            self.tally.gc_runs[g] += 1
            self.tally.gc_cpu[g] += time.thread_time() - began


def in_process(handler: Measured, kms: Any, w: Workload, calls: int, cid: bool,
               watch: GcWatch) -> Tally:
    tally = Tally()
    msgs = generate(w, calls, time.time())
    fn = handler.resolve_ticket if w.exchange == "resolve" else handler.request_ticket
    handler.tally = watch.tally = tally
    try:
        for wire in msgs:
            if cid:
                fn(wire, time.time(), correlation_id=CORRELATION_ID)
            else:
                fn(wire, time.time())
    finally:
        handler.tally = watch.tally = None
    return tally


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="request psk", help="a PSK workload name")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calls", type=int, default=600, help="in-process calls per round")
    ap.add_argument("--seconds", type=float, default=3.0, help="server window per load")
    ap.add_argument("--gc", choices=("on", "freeze", "off"), default="on")
    args = ap.parse_args()
    from bench.world import create_home
    from kms.home import open_home
    from kms.server.compose import build_handler
    from kms.server.grpc_server import KmsServer
    from kms.server.slots import CoreSlots

    with tempfile.TemporaryDirectory(prefix="kms-handler-cpu-") as tmp:
        setup = create_home(Path(tmp) / "home")
        home = open_home(setup.home)
        kms: Any = build_handler(home)
        chosen = [Workload(e, a, f, setup.kms_cert_der, setup.pk) for e, a, f in WORKLOADS]
        w = next(x for x in chosen if x.name == args.workload)
        if w.exchange == "resolve":
            w = dataclasses.replace(w, grant=obtain_grant(w, inproc.request_sender(kms),
                                                          time.time()))
        handler = Measured(kms)
        watch = GcWatch()
        in_process(handler, kms, w, 100, False, watch)  # warm
        server = KmsServer(handler, "127.0.0.1:0", slots=CoreSlots(1))  # type: ignore[arg-type]
        server.start()
        print(f"{w.name}: tracked objects {len(gc.get_objects())}, threads "
              f"{threading.active_count()}, gc {args.gc}", flush=True)
        if args.gc == "freeze":
            gc.collect()
            gc.freeze()
        elif args.gc == "off":
            gc.disable()
        gc.callbacks.append(watch)
        try:
            for rnd in range(1, args.rounds + 1):
                for cid in (False, True):
                    t = in_process(handler, kms, w, args.calls, cid, watch)
                    print(f"round {rnd} in-process{' + correlation id' if cid else ''}: "
                          f"{t.line()}", flush=True)
                for clients in (1, 8):
                    t = Tally()
                    handler.tally = watch.tally = t
                    try:
                        res = run_load(f"127.0.0.1:{server.port}", w, clients=clients,
                                       per_client_msgs=4000, warmup=0.5,
                                       duration=args.seconds, server_pid=os.getpid())
                    finally:
                        handler.tally = watch.tally = None
                    print(f"round {rnd} server, {clients} client(s), {res.completed} ok in the "
                          f"window: {t.line()}", flush=True)
        finally:
            gc.callbacks.remove(watch)
            gc.enable()
            server.drain(1.0)
            home.close()


if __name__ == "__main__":
    main()
