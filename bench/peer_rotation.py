"""Cross-domain resolves (RFC 6043 9) before, during and after rotating the key two KMSs
share (`kms peer rotate-psk`, `use-psk`, `retire-psk` on both sides, docs/federation.md),
under a steady load of calls both ways. Prints per phase: calls, failures, calls/s, and
the forwarded resolve's latency (p50 / p99, the Responder's call to its own KMS, which asks
the issuer). A control phase runs as many CLI processes that change nothing (`peer
psk-list`): on 2 cores the CLI's own start-up competes with the servers. Not a test: no
assertion on times.

    .venv/bin/python -m bench.peer_rotation [--clients 4] [--seconds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from kms.endpoint.client import KmsClient, obtain_ticket
from kms.endpoint.initiator import DesiredPolicy, Initiator
from kms.endpoint.responder import Responder
from tests.e2e.harness import run_kms
from tests.federation.test_peer_rotation import (
    A_ID,
    ALICE,
    B_ID,
    BOB,
    HOME_OF,
    KEY_V2,
    SESSIONS,
    Two,
    two_domains,
)


class Load:
    """``clients`` threads, each calling both ways in a loop; samples go to the phase set
    by :meth:`phase`."""

    def __init__(self, two: Two, clients: int) -> None:
        self.two = two
        self.samples: dict[str, list[float]] = {}
        self.failures: dict[str, int] = {}
        self.current = "warm-up"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def phase(self, name: str) -> None:
        with self._lock:
            self.current = name
            self.samples.setdefault(name, [])
            self.failures.setdefault(name, 0)

    def _run(self) -> None:
        clients = {"A": self.two.client("A"), "B": self.two.client("B")}
        while not self._stop.is_set():
            for caller, callee in ((ALICE, BOB), (BOB, ALICE)):
                try:
                    took = self._call(clients, caller, callee)
                except Exception:
                    with self._lock:
                        self.failures[self.current] = self.failures.get(self.current, 0) + 1
                else:
                    with self._lock:
                        self.samples.setdefault(self.current, []).append(took)

    def _call(self, clients: dict[str, KmsClient], caller: bytes, callee: bytes) -> float:
        two = self.two
        ini = Initiator(two.creds(caller), two.ks)
        grant = obtain_ticket(clients[HOME_OF[caller]], ini, DesiredPolicy(responders=(callee,)))
        ti, pending = ini.transfer_init(grant, time.time(), callee, SESSIONS)
        res = Responder(two.creds(callee), two.ks)
        wire, pr = res.receive_transfer_init(ti, time.time())
        t0 = time.perf_counter()
        reply = clients[HOME_OF[callee]].resolve_ticket(wire)
        took = time.perf_counter() - t0
        call = res.accept_resolve(pr, reply, time.time())
        assert call.transfer_resp is not None
        ini.establish(pending, call.transfer_resp, time.time())
        return took

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def _row(name: str, samples: list[float], failures: int, seconds: float) -> str:
    if not samples:
        return f"{name:<22} {0:>7} {failures:>9}"
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return (f"{name:<22} {len(ms):>7} {failures:>9} {len(ms) / seconds:>9.1f} "
            f"{statistics.median(ms):>8.2f} {p99:>8.2f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=4, help="client threads (default 4)")
    ap.add_argument("--seconds", type=float, default=5.0, help="window before and after")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, two_domains(Path(tmp)) as two:
        a, b = two["A"], two["B"]
        durations: dict[str, float] = {}
        with Load(two, args.clients) as load:
            time.sleep(1.0)
            for name, action in (
                ("v1 (before)", lambda: time.sleep(args.seconds)),
                # The same number of CLI processes, changing nothing: what they cost alone.
                ("6 x psk-list (control)", lambda: [
                    run_kms(d.home, "peer", "psk-list", peer)
                    for d, peer in ((a, B_ID), (b, A_ID)) * 3
                ]),
                ("rotate + use + retire", lambda: [
                    run_kms(a.home, "peer", "rotate-psk", B_ID, "--psk-hex", KEY_V2.hex()),
                    run_kms(b.home, "peer", "rotate-psk", A_ID, "--psk-hex", KEY_V2.hex()),
                    run_kms(a.home, "peer", "use-psk", B_ID, "2"),
                    run_kms(b.home, "peer", "use-psk", A_ID, "2"),
                    run_kms(a.home, "peer", "retire-psk", B_ID, "1"),
                    run_kms(b.home, "peer", "retire-psk", A_ID, "1"),
                ]),
                ("v2 (after)", lambda: time.sleep(args.seconds)),
            ):  # fmt: skip
                load.phase(name)
                t0 = time.monotonic()
                action()
                durations[name] = time.monotonic() - t0
            load.phase("done")
        print(f"{args.clients} client threads, each calling A->B then B->A in a loop")
        print(f"{'phase':<22} {'calls':>7} {'failures':>9} {'calls/s':>9} {'p50 ms':>8} "
              f"{'p99 ms':>8}")  # fmt: skip
        for name, seconds in durations.items():
            print(_row(name, load.samples.get(name, []), load.failures.get(name, 0), seconds))


if __name__ == "__main__":
    main()
