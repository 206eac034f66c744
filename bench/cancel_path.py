"""What a call costs in threads mode now that the core thread drives the handler's steps
(:meth:`kms.server.adapter.CoreRunner._held_steps`, which can tell the core of a
cancellation) instead of the handler's one-call method, and what recording a cancelled
call costs (:func:`kms.core.steps.cancel` at the PKE's RSA step: one audit record).

In process, one thread, the KMS on a SoftHSM2 token in a temporary home, with the metrics
decorator around it as ``kms serve`` has it; no gRPC. Rounds alternate the two drivers.

    .venv/bin/python -m bench.cancel_path [--calls 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from bench.messages import Workload, generate
from bench.world import create_home
from kms.core.api import KmsReply, Outcome
from kms.core.steps import cancel
from kms.home import open_home
from kms.server.adapter import CoreRunner
from kms.server.compose import build_handler
from kms.server.metrics import ServerMetrics
from kms.server.observed import ObservedHandler
from kms.server.slots import CoreSlots


def _per_call_us(fn: Callable[[bytes], KmsReply], wires: list[bytes]) -> float:
    t0 = time.perf_counter()
    for wire in wires:
        reply = fn(wire)
        if not reply.ok:
            raise RuntimeError(f"{reply.outcome} {reply.detail}")
    return (time.perf_counter() - t0) / len(wires) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kms-bench-") as tmp:
        setup = create_home(Path(tmp) / "home")
        home = open_home(setup.home)
        handler: Any = ObservedHandler(build_handler(home), ServerMetrics(CollectorRegistry()))
        slots = CoreSlots(1)
        runner = CoreRunner(slots, threads=1)

        def one_call(wire: bytes) -> KmsReply:  # threads mode before: the plain method
            with slots.held():
                reply: KmsReply = handler.request_ticket(wire, time.time())
                return reply

        def stepped(wire: bytes) -> KmsReply:  # threads mode now
            return runner._held_steps(handler.request_steps, None, (wire, time.time()), {},
                                      threading.Event())

        print(f"{'exchange':<12} {'one-call us':>11} {'steps us':>9} {'steps/one':>9}")
        for auth in ("psk", "pk"):
            w = Workload("request", auth, False, setup.kms_cert_der, setup.pk)
            a, b = [], []
            for _ in range(args.rounds):
                a.append(_per_call_us(one_call, generate(w, args.calls, time.time())))
                b.append(_per_call_us(stepped, generate(w, args.calls, time.time())))
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"request {auth:<4} {ma:>11.1f} {mb:>9.1f} {mb / ma:>9.3f}")
        w = Workload("request", "pk", False, setup.kms_cert_der, setup.pk)
        costs = []
        for wire in generate(w, args.calls, time.time()):
            steps = handler.request_steps(wire, time.time())
            next(steps)  # waiting for the PKE's RSA decryption
            t0 = time.perf_counter()
            reply = cancel(steps)
            costs.append(time.perf_counter() - t0)
            assert reply.outcome is Outcome.CANCELLED
        costs.sort()
        print(f"cancel at the RSA step (record written): median "
              f"{statistics.median(costs) * 1e6:.1f} us, p99 "
              f"{costs[int(0.99 * (len(costs) - 1))] * 1e6:.1f} us")
        runner.close()
        home.close()


if __name__ == "__main__":
    main()
