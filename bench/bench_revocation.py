#!/usr/bin/env python3
"""Cost of revocation and PSK rotation on the in-process Ticket Resolve (no gRPC).

One run, side by side, on one bench home (embedded SoftHSM2 token, SQLite registry): the
core called straight (``build_handler``), one thread, RESOLVE_INIT_PSK messages for one
reusable (J = 1) ticket made before each timed window, for

* a plain Responder PSK (Bob) with 0, 1,000 and 100,000 ticket revocations in the registry
  (random ticket ids, none matching: every resolve checks its ticket against the list);
* a rotated Responder PSK (Carol, named in the same ticket): her new phone names version 2
  in IDRpsk, her old phone still uses version 1; no revocations.

The cases run interleaved, ``--rounds`` times each (the machine may be shared: a case
measured once can be off by 2x), and the median rate of each is reported with its ratio to
the plain case without revocations. Also the cost of re-reading the revocation list after a
registry change (the serving side caches it until the registry's data version moves), at
the largest row count.

    .venv/bin/python bench/bench_revocation.py [--seconds 2] [--rounds 3] [--rows 0,1000,100000]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.inproc import request_sender
from bench.messages import SESSIONS
from bench.world import ALICE, BOB, KMS_ID, PSKS, create_home, open_bench_home
from hsm.software import SoftwareKeyStore
from kms.core.service import Kms
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DEFAULT_FLAGS, DesiredPolicy, Initiator, TicketGrant
from kms.endpoint.responder import Responder
from kms.mikey.constants import IdType
from kms.mikey.ticket import TpFlag
from kms.server.compose import build_handler
from kms.server.psk_rotation import rotate_psk
from kms.store.registry import REGISTRY_FILE

CAROL = b"sip:carol@bench.example"  # a second Responder, whose PSK gets rotated
CAROL_PSK = bytes.fromhex("ca" * 16)


def messages(grant: TicketGrant, responder: Credentials, count: int) -> list[bytes]:
    """``count`` RESOLVE_INIT_PSK for the same reusable (J = 1) ticket, each in a fresh
    TRANSFER_INIT to ``responder``."""
    ks = SoftwareKeyStore()
    now = time.time()
    ini = Initiator(Credentials(ALICE, PSKS[ALICE], KMS_ID.encode(), IdType.URI), ks)
    res = Responder(responder, ks)
    out = []
    for _ in range(count):
        ti, _ = ini.transfer_init(grant, now, responder.identity, SESSIONS)
        out.append(res.receive_transfer_init(ti, now)[0])
    return out


def measure(kms: Kms, make: Callable[[int], list[bytes]], seconds: float) -> tuple[float, float]:
    """(resolves per second, median ms), back to back on one thread."""
    warm = make(20)
    t0 = time.perf_counter()
    for wire in warm:
        _ok(kms, wire)
    per = (time.perf_counter() - t0) / len(warm)
    msgs = make(max(50, int(seconds / per * 1.3)))
    lat: list[float] = []
    start = time.perf_counter()
    for wire in msgs:
        c0 = time.perf_counter()
        _ok(kms, wire)
        c1 = time.perf_counter()
        lat.append(c1 - c0)
        if c1 - start >= seconds:
            break
    return len(lat) / (time.perf_counter() - start), statistics.median(lat) * 1e3


def _ok(kms: Kms, wire: bytes) -> None:
    reply = kms.resolve_ticket(wire, time.time())
    if not reply.ok:
        raise RuntimeError(f"resolve refused: {reply.outcome} {reply.detail} {reply.audit}")


def set_revocations(registry: Path, rows: int) -> None:
    """Exactly ``rows`` ticket revocations with random ids (straight into the registry
    file: the CLI would write them one transaction each)."""
    now = int(time.time())
    with sqlite3.connect(registry) as conn:
        conn.execute("DELETE FROM revocations")
        conn.executemany(
            "INSERT INTO revocations (kind, subject, not_before, created_at, reason) "
            "VALUES ('ticket', ?, 0, ?, '')",
            ((os.urandom(16), now) for _ in range(rows)),
        )
    conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="timed window per case")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--rows", default="0,1000,100000", help="revocation row counts")
    args = ap.parse_args()
    counts = [int(x) for x in args.rows.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "home"
        create_home(path)
        home = open_bench_home(path)
        try:
            home.add_endpoint(CAROL, IdType.URI, CAROL_PSK)
            kms = build_handler(home)
            registry = path / REGISTRY_FILE
            grant = two_responder_grant(kms)
            plain = Credentials(BOB, PSKS[BOB], KMS_ID.encode(), IdType.URI)
            old = Credentials(CAROL, CAROL_PSK, KMS_ID.encode(), IdType.URI)
            new_psk = os.urandom(16)
            version = rotate_psk(home, CAROL, new_psk, None)
            new = Credentials(CAROL, new_psk, KMS_ID.encode(), IdType.URI,
                              psk_name=version.name)  # fmt: skip
            cases: list[tuple[str, int, Credentials]] = [
                *((f"plain PSK, {n:,} revocations", n, plain) for n in counts),
                ("rotated PSK, new phone (IDRpsk v2)", 0, new),
                ("rotated PSK, old phone (IDRpsk v1)", 0, old),
            ]
            rates: dict[str, list[float]] = {name: [] for name, _, _ in cases}
            p50s: dict[str, list[float]] = {name: [] for name, _, _ in cases}
            for r in range(args.rounds):
                for name, rows, creds in cases:
                    set_revocations(registry, rows)

                    def make(n: int, c: Credentials = creds) -> list[bytes]:
                        return messages(grant, c, n)

                    rate, p50 = measure(kms, make, args.seconds)
                    rates[name].append(rate)
                    p50s[name].append(p50)
                    print(f"  round {r + 1}: {name:<36} {rate:6.0f}/s", flush=True)
            set_revocations(registry, counts[-1])
            directory = kms.deps.directory
            reads = []
            for _ in range(5):
                t0 = time.perf_counter()
                directory._revocation_list()  # type: ignore[attr-defined]
                reads.append(time.perf_counter() - t0)
        finally:
            home.close()

    base = statistics.median(rates[cases[0][0]])
    base_p50 = statistics.median(p50s[cases[0][0]])
    print(f"\nin-process Ticket Resolve (PSK, J = 1), median of {args.rounds} rounds of "
          f"{args.seconds:g} s; ratios to the first case (rate: higher is faster; p50: lower)")
    print(f"  {'case':<36} {'rate':>8} {'ratio':>6} {'p50':>9} {'ratio':>6}")
    for name, _, _ in cases:
        rate, p50 = statistics.median(rates[name]), statistics.median(p50s[name])
        print(f"  {name:<36} {rate:6.0f}/s {rate / base:6.2f} {p50:6.2f} ms "
              f"{p50 / base_p50:6.2f}")
    print(f"\nrevocation list re-read at {counts[-1]:,} rows (after a registry change): "
          f"{statistics.median(reads) * 1e3:.0f} ms (median of 5)")


def two_responder_grant(kms: Kms) -> TicketGrant:
    """A reusable (J = 1) ticket naming Bob and Carol, from Alice's Ticket Request."""
    ini = Initiator(Credentials(ALICE, PSKS[ALICE], KMS_ID.encode(), IdType.URI),
                    SoftwareKeyStore())  # fmt: skip
    desired = DesiredPolicy(responders=(BOB, CAROL), flags=DEFAULT_FLAGS | TpFlag.J)
    wire, pending = ini.request_ticket(desired, time.time())
    return ini.accept_ticket(pending, request_sender(kms)(wire), time.time())


if __name__ == "__main__":
    main()
