#!/usr/bin/env python3
"""SoftHSM's file store and concurrent processes: how many token objects lose CKA_LABEL.

Reproduces the measurement behind the catalogue's re-labelling (docs/design.md, "Token
objects created while other processes use the token") with python-pkcs11 directly, not
through the KMS's key store (which now repairs what it finds): a fresh `kms init` home, then

* ``creators``: N processes each create M stored secret keys at once;
* ``scanner``: one process creates M keys while another logs in and lists the token's
  objects in a loop (what a second `kms serve` worker does at start);
* ``alone``: one process creates M keys (the control).

and counts the created objects whose CKA_LABEL is empty afterwards.

    .venv/bin/python bench/softhsm_labels.py [--keys 150] [--creators 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _session(home: Path) -> Any:
    import pkcs11

    from kms.home import open_home

    h = open_home(home)
    t = h.config.token
    if t.softhsm_conf is not None:
        os.environ["SOFTHSM2_CONF"] = str(t.softhsm_conf)
    lib = pkcs11.lib(t.module)
    pin = Path(t.pin_file).read_text().strip() if t.pin_file else ""
    for attempt in range(20):  # SoftHSM rewrites token.object while others create objects
        try:
            return lib.get_token(token_label=t.label).open(rw=True, user_pin=pin)
        except pkcs11.exceptions.GeneralError:
            if attempt == 19:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def _create(home: str, prefix: str, n: int, start: Any) -> None:
    from pkcs11 import KeyType

    with _session(Path(home)) as s:
        start.wait()
        for i in range(n):
            s.generate_key(KeyType.GENERIC_SECRET, 256, label=f"{prefix}/{i}", store=True)


def _scan(home: str, stop: Any, start: Any) -> None:
    from pkcs11 import Attribute, ObjectClass
    from pkcs11.exceptions import PKCS11Error

    start.wait()
    while not stop.is_set():
        with _session(Path(home)) as s:  # a login and a scan, as a worker at start
            try:
                for obj in s.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
                    _ = obj[Attribute.LABEL]
            except PKCS11Error:  # an object half-written by the creator: scan again
                continue


def _count(home: str, prefixes: list[str], out: Any) -> None:
    from pkcs11 import Attribute, ObjectClass

    with _session(Path(home)) as s:
        labels = [obj[Attribute.LABEL] for obj in
                  s.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})]
    ours = sum(1 for lb in labels if any(lb.startswith(p + "/") for p in prefixes))
    out.put((sum(1 for lb in labels if not lb), ours))


def _unlabelled(ctx: Any, home: Path, prefixes: list[str]) -> tuple[int, int]:
    """(unlabelled secret keys, keys labelled with one of ``prefixes``), counted in a process
    of its own (a process logs in once)."""
    out = ctx.Queue()
    p = ctx.Process(target=_count, args=(str(home), prefixes, out))
    p.start()
    counts: tuple[int, int] = out.get(timeout=60)
    p.join()
    return counts


def run(case: str, keys: int, creators: int) -> str:
    ctx = mp.get_context("spawn")  # each process initialises the module itself
    with tempfile.TemporaryDirectory(prefix="kms-labels-") as tmp:
        home = Path(tmp) / "home"
        subprocess.run([sys.executable, "-m", "kms.cli", "--home", str(home), "init",
                        "--kms-id", "kms:labels.example.org"], check=True,
                       capture_output=True)
        before, _ = _unlabelled(ctx, home, [])
        start, stop = ctx.Event(), ctx.Event()
        n = creators if case == "creators" else 1
        prefixes = [f"{case}{i}" for i in range(n)]
        procs = [ctx.Process(target=_create, args=(str(home), p, keys, start)) for p in prefixes]
        if case == "scanner":
            procs.append(ctx.Process(target=_scan, args=(str(home), stop, start)))
        for p in procs:
            p.start()
        time.sleep(1.0)  # all logged in
        t0 = time.monotonic()
        start.set()
        for p in procs[:n]:
            p.join()
        stop.set()
        for p in procs[n:]:
            p.join()
        took = time.monotonic() - t0
        unlabelled, labelled = _unlabelled(ctx, home, prefixes)
        return (f"{case:<9} {n} creator(s) x {keys} keys: {unlabelled - before} of "
                f"{n * keys} without CKA_LABEL ({labelled} labelled), {took:.1f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=150, help="keys per creating process")
    ap.add_argument("--creators", type=int, default=2, help="processes in the creators case")
    ap.add_argument("--cases", default="alone,scanner,creators")
    args = ap.parse_args()
    for case in args.cases.split(","):
        print(run(case, args.keys, args.creators), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
