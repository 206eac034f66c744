#!/usr/bin/env python3
"""The token thread's GIL convoy, measured side by side in one run.

In the inline server the PKE's RSA decryption (RFC 3830 4.2.5) runs in a thread of its own
while the event loop runs Python. Every foreign call releases the GIL; on return the token
thread must take it back from the loop, which keeps it up to a switch interval (5 ms) while it
computes. This prints, for the key store's RSA decryption and for one HMAC under a long-term
key (the loop's kind of token call), the rate alone and next to a thread that only runs
Python, and the ratio, at each switch interval asked for (sys.setswitchinterval: how long a
thread computing in Python keeps the GIL while another waits for it). Rounds alternate.
The key store's RSA decryption asks for the GIL back after ``hsm.pkcs11.raw.GIL_BACK_S``
whatever the interval (``gil_back_soon``): its row shows that, the HMAC's the plain convoy.

    .venv/bin/python -m bench.gil_convoy [--seconds 1.0] [--rounds 3] [--intervals-ms 5,0.5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding

from bench.world import create_home
from kms.home import ENVELOPE_LABEL, open_home
from kms.keystore import Digest, KeyRef, RsaPadding


def _spin(stop: threading.Event, out: list[int]) -> None:
    n = 0
    while not stop.is_set():
        for _ in range(1000):
            n += 1
    out.append(n)


def rate(fn: Callable[[], object], seconds: float, beside_python: bool) -> tuple[float, int]:
    """Calls/s of ``fn`` in this thread, alone or with a pure-Python thread beside it; and
    that thread's progress (loop iterations)."""
    stop, out = threading.Event(), list[int]()
    spinner = threading.Thread(target=_spin, args=(stop, out))
    if beside_python:
        spinner.start()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    elapsed = time.perf_counter() - t0
    stop.set()
    if beside_python:
        spinner.join()
    return n / elapsed, (out[0] if out else 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--intervals-ms", default="5,1,0.5",
                    help="switch intervals to measure at (ms); 5 is CPython's default")
    args = ap.parse_args()
    intervals = [float(x) / 1e3 for x in args.intervals_ms.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="kms-gil-"))
    try:
        setup = create_home(tmp / "home")
        home = open_home(setup.home)
        ks = home.keystore()
        cert = x509.load_der_x509_certificate(setup.kms_cert_der)
        ct = cert.public_key().encrypt(b"k" * 32, padding.PKCS1v15())  # type: ignore[union-attr]
        tpk = next(t.key_label for t in home.registry.tpk_versions())
        ops: dict[str, Callable[[], object]] = {
            "rsa_decrypt (token thread)": lambda: ks.rsa_decrypt(
                KeyRef(ENVELOPE_LABEL), ct, RsaPadding.PKCS1V15),
            "hmac, long-term key (loop)": lambda: ks.hmac(KeyRef(tpk), b"x" * 64, Digest.SHA256),
        }
        alone: dict[tuple[str, float], list[float]] = {}
        beside: dict[tuple[str, float], list[float]] = {}
        default = sys.getswitchinterval()
        for _ in range(args.rounds):
            for si in intervals:
                sys.setswitchinterval(si)
                for name, fn in ops.items():
                    alone.setdefault((name, si), []).append(rate(fn, args.seconds, False)[0])
                    beside.setdefault((name, si), []).append(rate(fn, args.seconds, True)[0])
        sys.setswitchinterval(default)
        print(f"{'operation':<28} {'switch ms':>9} {'alone/s':>9} {'beside Python/s':>16} "
              f"{'ratio':>6}")
        for name in ops:
            for si in intervals:
                a = statistics.median(alone[(name, si)])
                b = statistics.median(beside[(name, si)])
                print(f"{name:<28} {si * 1e3:>9g} {a:>9,.0f} {b:>16,.0f} {b / a:>6.2f}")
        print(f"(medians of {args.rounds} alternating rounds of {args.seconds:g} s)")
        home.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
