#!/usr/bin/env python3
"""Token PRF throughput against software PRF, measured side by side in one run.

Creates a throwaway SoftHSM2 token in a temporary directory (or uses --module/--conf/--label
with the PIN in $KMS_BENCH_PIN), then runs the MIKEY PRF with
  * a long-term key held in the token (KeyRef -> CKM_SHA_1_HMAC / CKM_SHA256_HMAC), through
    the store's working copy (a session object) and through the stored object itself,
  * an ephemeral key (one session object per 256-bit slice, created and destroyed per PRF),
  * the same key in host memory through kms.mikey.prf (hashlib HMAC),
and prints ops/s and the software/token ratio. Rounds alternate token and software so that
machine noise hits both (throughput moves 25-40 % between runs on small CI machines).

    .venv/bin/python bench/bench_prf.py [--seconds 1.0] [--threads 1] [--out-len 48]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hsm import TokenConfig, open_keystore, read_pin
from hsm.provision import DEFAULT_SOFTHSM_MODULE, create_softhsm_token
from kms.keystore import Digest, KeyRef
from kms.mikey.prf import PrfFunc, hmac_digest, prf


def rate(fn: Callable[[int], object], seconds: float, threads: int) -> float:
    """Operations per second of ``fn`` run by ``threads`` threads for ``seconds``."""
    counts = [0] * threads
    stop = time.perf_counter() + seconds

    def worker(slot: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            fn(i)
            i += 1
        counts[slot] = i

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="per measurement round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (median kept)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-len", type=int, default=48, help="PRF output bytes")
    ap.add_argument("--module", default=DEFAULT_SOFTHSM_MODULE)
    ap.add_argument("--conf", help="existing softhsm2.conf (default: throwaway token)")
    ap.add_argument("--label", help="existing token label (with --conf)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-prf-") as tmp:
        if args.conf:
            cfg = TokenConfig(args.module, args.label, None, read_pin("KMS_BENCH_PIN", None),
                              args.conf)
        else:
            pin = os.urandom(8).hex()
            conf = create_softhsm_token(Path(tmp), "bench-prf", os.urandom(8).hex(), pin)
            cfg = TokenConfig(args.module, "bench-prf", None, pin, str(conf))
        ks = open_keystore(cfg)
        try:
            key = os.urandom(16)
            label = f"bench-psk-{os.getpid()}"
            ks.import_secret(label, key)
            ref = KeyRef(label)
            # The same key under a second label that the store may not copy into a session
            # object: the stored token object is used for every HMAC (side by side with the
            # working copy the store normally uses; docs/design.md "Working copies").
            stored_label = label + "-stored"
            ks.import_secret(stored_label, key)
            conn = ks._token._conn
            assert conn is not None
            conn.no_copy.add(stored_label)
            stored = KeyRef(stored_label)
            eph = os.urandom(32)
            n = args.out_len
            cases: list[tuple[str, Callable[[int], object], Callable[[int], object]]] = []
            for func in PrfFunc:
                digest = hmac_digest(func)

                def tok_lt(i: int, f: Digest = digest) -> object:
                    return ks.prf(ref, i.to_bytes(8, "big"), n, f)

                def tok_stored(i: int, f: Digest = digest) -> object:
                    return ks.prf(stored, i.to_bytes(8, "big"), n, f)

                def tok_eph(i: int, f: Digest = digest) -> object:
                    return ks.prf(eph, i.to_bytes(8, "big"), n, f)

                def sw_lt(i: int, f: PrfFunc = func) -> object:
                    return prf(key, i.to_bytes(8, "big"), n, f)

                def sw_eph(i: int, f: PrfFunc = func) -> object:
                    return prf(eph, i.to_bytes(8, "big"), n, f)

                # Correctness first: a fast wrong answer is worthless.
                assert tok_lt(7) == sw_lt(7) == tok_stored(7) and tok_eph(7) == sw_eph(7)
                cases.append((f"{func.name} long-term key (16 B)", tok_lt, sw_lt))
                cases.append((f"{func.name} long-term, stored object", tok_stored, sw_lt))
                cases.append((f"{func.name} ephemeral key (32 B)", tok_eph, sw_eph))

            # Batching: the encr/auth/salt keys of one message under one per-message key, as
            # one prf_many (one session object) against three prf calls (three objects).
            labels = [(b"encr", 16), (b"auth", 20), (b"salt", 14)]

            def tok_many(i: int) -> object:
                return ks.prf_many(eph, labels, Digest.SHA1)

            def tok_three(i: int) -> object:
                return [ks.prf(eph, lbl, k, Digest.SHA1) for lbl, k in labels]

            assert tok_many(0) == tok_three(0)
            cases.append(("msg keys on token: prf_many | 3 x prf", tok_many, tok_three))

            print(f"PRF, {n}-byte output, {args.threads} thread(s), "
                  f"{args.rounds} x {args.seconds:.1f} s per side (median)")
            print(f"{'case':<44} {'token ops/s':>12} {'software ops/s':>15} {'sw/token':>9}")
            for name, tok_fn, sw_fn in cases:
                tok_r: list[float] = []
                sw_r: list[float] = []
                for _ in range(args.rounds):
                    tok_r.append(rate(tok_fn, args.seconds, args.threads))
                    sw_r.append(rate(sw_fn, args.seconds, args.threads))
                t = sorted(tok_r)[len(tok_r) // 2]
                s = sorted(sw_r)[len(sw_r) // 2]
                print(f"{name:<44} {t:>12,.0f} {s:>15,.0f} {s / t:>8.1f}x")
            print("(last row: both columns on the token, left one prf_many call, right three "
                  "prf calls)")
            ks.delete(label)
            ks.delete(stored_label)
        finally:
            ks.close()


if __name__ == "__main__":
    main()
