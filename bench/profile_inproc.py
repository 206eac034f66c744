"""Where the in-process time of one exchange goes, per part, in milliseconds.

    .venv/bin/python -m bench.profile_inproc [--only "request psk"] [--calls 600] [--rounds 3]
    .venv/bin/python -m bench.profile_inproc --plain    # CPU / wall per exchange, floor only
    .venv/bin/python -m bench.profile_inproc --plain --batches 30 --calls 60 --only psk

Each exchange runs on the KMS core in-process (no gRPC, one thread, the PKCS#11 key store on
the bench home's SoftHSM2 token) with light timing wrappers around the functions that mark
each part: the MIKEY codec (decode, views, encode and MAC coverage, KEMAC), the policy, the
ports (registry lookups, replay cache, rate limit, audit record), the key store's Python
(``hsm.pkcs11``: sessions, working copies, PRF framing) and the PKCS#11 calls themselves
(python-pkcs11 and the token). Time is *exclusive*: a part's nested parts are subtracted, so
the rows add up to the exchange. What no wrapper claims is "other core" (the service's
gather/check/issue steps, audit dictionaries, dataclasses). The cost of the wrappers
themselves is measured (the same messages without wrappers, alternating) and shown as its
own row; it is spread over the parts in proportion to their call counts.

Compare with the token floor (``bench.inproc``: the same PKCS#11 operations replayed alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import inproc
from bench.messages import WORKLOADS, Workload, generate, obtain_grant

_clock = time.perf_counter


class Probe:
    """Exclusive time per part: a stack of running parts; a nested part's time is taken
    off its parent."""

    def __init__(self) -> None:
        self.own: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list[float]] = []  # [child time] per running part
        self.on = False

    def wrap(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        probe = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not probe.on:
                return fn(*args, **kwargs)
            frame = [0.0]
            probe._stack.append(frame)
            t0 = _clock()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = _clock() - t0
                probe._stack.pop()
                probe.own[part] = probe.own.get(part, 0.0) + dt - frame[0]
                probe.calls[part] = probe.calls.get(part, 0) + 1
                if probe._stack:
                    probe._stack[-1][0] += dt

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed

    def reset(self) -> None:
        self.own.clear()
        self.calls.clear()


def _patch_function(probe: Probe, part: str, module: str, name: str) -> None:
    """Wrap a module-level function everywhere it was imported by name (if the tree being
    measured has it: the profile runs against older trees too)."""
    mod_obj = sys.modules.get(module)
    if mod_obj is None:
        try:
            mod_obj = importlib.import_module(module)
        except ImportError:
            return
    original = getattr(mod_obj, name, None)
    if original is None:
        return
    wrapped = probe.wrap(part, original)
    for mod in list(sys.modules.values()):
        mname = getattr(mod, "__name__", "")
        if not mname.startswith(("kms", "hsm", "bench")):
            continue
        for attr, value in list(vars(mod).items()):
            if value is original:
                setattr(mod, attr, wrapped)


def _patch_method(probe: Probe, part: str, cls: type, name: str) -> None:
    original = cls.__dict__[name]
    if isinstance(original, classmethod | staticmethod):
        inner = probe.wrap(part, original.__func__)
        setattr(cls, name, type(original)(inner))
    else:
        setattr(cls, name, probe.wrap(part, original))


def _patch_instance(probe: Probe, part: str, obj: Any, names: tuple[str, ...]) -> None:
    if obj is None:
        return
    for name in names:
        fn = getattr(obj, name, None)
        if callable(fn):
            setattr(obj, name, probe.wrap(part, fn))


def instrument(kms: Any) -> Probe:
    import hsm.pkcs11.store as hstore
    import hsm.pkcs11.working as hwork
    from kms.mikey.message import Message

    probe = Probe()
    # PKCS#11 calls (the token, and the binding's own code around each call): C_Sign per
    # HMAC, C_Encrypt per AES-CM, object creation and destruction (hsm.pkcs11.raw), random,
    # RSA decryption (python-pkcs11, with its key lookup). Only hsm.pkcs11 imports
    # python-pkcs11 (tests/test_layering.py), so the probe wraps our calls into it. (The
    # "before" table below was taken with python-pkcs11's SignMixin.sign / EncryptMixin.encrypt
    # and SessionObjects.create_* / destroy wrapped instead: the branch point had no raw.py.)
    import hsm.pkcs11.raw as hraw

    for name in ("create_session_key", "destroy", "sign", "encrypt"):
        _patch_method(probe, "PKCS#11 calls", hraw.RawCalls, name)
    for name in ("create_secret", "create_aes", "destroy"):
        _patch_method(probe, "PKCS#11 calls", hwork.SessionObjects, name)
    _patch_method(probe, "PKCS#11 calls", hstore.Pkcs11KeyStore, "random")
    _patch_method(probe, "PKCS#11 calls", hstore.Pkcs11KeyStore, "_rsa_decrypt")
    # The key store's own Python around them.
    for name in ("prf_many", "aes_cm", "rsa_decrypt", "hmac", "sign"):
        _patch_method(probe, "hsm.pkcs11 (our wrapper)", hstore.Pkcs11KeyStore, name)
    # The codec.
    _patch_method(probe, "codec: decode", Message, "decode")
    _patch_method(probe, "codec: encode", Message, "encode")
    _patch_function(probe, "codec: views (compose)", "kms.mikey.compose", "compose")
    _patch_function(probe, "codec: MAC coverage (check)", "kms.mikey.protect", "check_mac")
    _patch_function(probe, "codec: MAC coverage (seal)", "kms.mikey.protect", "seal_mac")
    _patch_function(probe, "codec: KEMAC", "kms.mikey.protect", "seal_kemac")
    _patch_function(probe, "codec: KEMAC", "kms.mikey.protect", "open_kemac")
    _patch_function(probe, "key derivation (labels, PRF framing)", "kms.mikey.protect",
                    "message_keys")
    _patch_function(probe, "key derivation (labels, PRF framing)", "kms.mikey.base_ticket",
                    "derive_mpk_pair")
    _patch_function(probe, "ticket (issue / open, encode)", "kms.mikey.base_ticket",
                    "issue_base_ticket")
    # One-pass responses (kms.mikey.writer, where the tree has it): the response's encoding
    # and V MAC, the KEMAC's Key data and encryption, the ticket; and both message-key sets
    # from one PSK in one key-store operation.
    _patch_function(probe, "codec: encode", "kms.mikey.writer", "sealed_response")
    _patch_function(probe, "codec: KEMAC", "kms.mikey.protect", "encrypt_key_data")
    _patch_function(probe, "ticket (issue / open, encode)", "kms.mikey.base_ticket",
                    "issue_ticket")
    _patch_function(probe, "key derivation (labels, PRF framing)", "kms.mikey.protect",
                    "exchange_keys")
    if "kms.mikey.base_ticket" in sys.modules and hasattr(sys.modules["kms.mikey.base_ticket"],
                                                          "open_base_ticket"):
        _patch_function(probe, "ticket (issue / open, encode)", "kms.mikey.base_ticket",
                        "open_base_ticket")
    _patch_function(probe, "policy", "kms.core.policy", "grant_policy")
    # The ports.
    d = kms.deps
    _patch_instance(probe, "registry lookups", d.directory, (
        "psk_for", "is_member", "is_known", "current_tpk", "tpk", "peer", "applications",
        "psk_version", "revocation_list"))
    _patch_instance(probe, "replay cache / rate / ledger", d.replay, ("check_and_store",))
    _patch_instance(probe, "replay cache / rate / ledger", d.rate, ("allow",))
    _patch_instance(probe, "replay cache / rate / ledger", d.admission, ("admit",))
    _patch_instance(probe, "replay cache / rate / ledger", d.ledger, ("first_resolve",))
    _patch_instance(probe, "audit record", d.audit, ("emit",))
    import logging

    _patch_method(probe, "logging", logging.Logger, "_log")
    return probe


@dataclasses.dataclass
class Breakdown:
    name: str
    total_ms: float  # per exchange, without wrappers
    parts_ms: dict[str, float]  # per exchange, wrapper cost spread out
    calls: dict[str, float]  # per exchange
    wrapper_ms: float
    floor_ms: float


def run(kms: Any, w: Workload, probe: Probe, calls: int, rounds: int) -> Breakdown:
    def batch(on: bool) -> float:
        msgs = generate(w, calls, time.time())
        probe.on = on
        t0 = _clock()
        for wire in msgs:
            inproc.call(kms, w, wire)
        probe.on = False
        return (_clock() - t0) / calls

    batch(False)  # warm
    plain, wrapped = [], []
    probe.reset()
    for _ in range(rounds):
        plain.append(batch(False))
        wrapped.append(batch(True))
    n = calls * rounds
    total = statistics.median(plain)
    wtotal = statistics.median(wrapped)
    own = {k: v / n for k, v in probe.own.items()}
    counts = {k: c / n for k, c in probe.calls.items()}
    measured = sum(own.values())
    wrapper_cost = max(0.0, wtotal - total)
    ncalls = sum(counts.values()) or 1.0
    parts = {k: max(0.0, v - wrapper_cost * counts[k] / ncalls) for k, v in own.items()}
    parts["other core (service steps, audit dicts, dataclasses)"] = max(
        0.0, wtotal - measured)
    inner = kms.deps.keystore
    floor = inproc.token_floor(inner, inproc.record_ops(kms, w, generate(w, 1, time.time())[0]))
    return Breakdown(w.name, total * 1e3, {k: v * 1e3 for k, v in parts.items()}, counts,
                     wrapper_cost * 1e3, floor.seconds * 1e3)


def show(b: Breakdown) -> None:
    print(f"\n{b.name}: {b.total_ms:.3f} ms per exchange in-process (token floor "
          f"{b.floor_ms:.3f} ms, ours = exchange - floor = {b.total_ms - b.floor_ms:.3f} ms; "
          f"wrappers added {b.wrapper_ms:.3f} ms, spread below)")
    print(f"  {'part':<52} {'ms':>7} {'calls':>6}")
    for k, v in sorted(b.parts_ms.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<52} {v:>7.3f} {b.calls.get(k, 0):>6.1f}")


def plain(kms: Any, w: Workload, calls: int, rounds: int) -> tuple[float, float, float]:
    """(CPU ms, wall ms, token floor ms) per exchange, no wrappers: medians of ``rounds``
    batches. CPU (this process, the token's C code included) moves less than wall time on a
    shared machine."""
    cpu, wall = [], []
    inproc.call(kms, w, generate(w, 1, time.time())[0])  # warm
    for _ in range(rounds):
        msgs = generate(w, calls, time.time())
        c0, t0 = time.process_time(), _clock()
        for wire in msgs:
            inproc.call(kms, w, wire)
        wall.append((_clock() - t0) / calls)
        cpu.append((time.process_time() - c0) / calls)
    inner = kms.deps.keystore
    floor = inproc.token_floor(inner, inproc.record_ops(kms, w, generate(w, 1, time.time())[0]))
    return statistics.median(cpu) * 1e3, statistics.median(wall) * 1e3, floor.seconds * 1e3


def interleaved(kms: Any, ws: list[Workload], calls: int, batches: int) -> None:
    """Many short batches, the workloads interleaved (every one sees the same drift): the
    median, first quartile and minimum of the per-batch CPU per exchange. Two trees measured
    by two such processes run *at the same time* share the machine's load (see
    docs/performance.md, "Second pass, part C")."""
    cpu: dict[str, list[float]] = {w.name: [] for w in ws}
    for w in ws:
        for wire in generate(w, 20, time.time()):  # warm
            inproc.call(kms, w, wire)
    for _ in range(batches):
        for w in ws:
            msgs = generate(w, calls, time.time())
            c0 = time.process_time()
            for wire in msgs:
                inproc.call(kms, w, wire)
            cpu[w.name].append((time.process_time() - c0) / calls * 1e3)
    for w in ws:
        v = sorted(cpu[w.name])
        inner = kms.deps.keystore
        floor = inproc.token_floor(inner, inproc.record_ops(kms, w,
                                                            generate(w, 1, time.time())[0]))
        print(f"{w.name:<18} cpu median {statistics.median(v):.3f} p25 {v[len(v) // 4]:.3f} "
              f"min {v[0]:.3f} ms  floor {floor.seconds * 1e3:.3f} ms", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="substring of the workload name, e.g. 'psk'")
    ap.add_argument("--calls", type=int, default=500, help="exchanges per batch")
    ap.add_argument("--rounds", type=int, default=3, help="alternating plain/wrapped batches")
    ap.add_argument("--plain", action="store_true",
                    help="no breakdown: CPU and wall ms per exchange and the token floor only "
                         "(for before/after runs of two trees, alternating)")
    ap.add_argument("--batches", type=int, default=0,
                    help="with --plain: this many short batches of --calls exchanges, the "
                         "workloads interleaved; median / p25 / min of the batches")
    args = ap.parse_args()
    from bench.world import create_home
    from kms.home import open_home
    from kms.server.compose import build_handler

    with tempfile.TemporaryDirectory(prefix="kms-bench-") as tmp:
        setup = create_home(Path(tmp) / "home")
        home = open_home(setup.home)
        kms: Any = build_handler(home)
        probe = None if args.plain else instrument(kms)
        chosen: list[Workload] = []
        for ex, auth, fork in WORKLOADS:
            w = Workload(ex, auth, fork, setup.kms_cert_der, setup.pk)
            if args.only and args.only not in w.name:
                continue
            if ex == "resolve":
                w = dataclasses.replace(w, grant=obtain_grant(w, inproc.request_sender(kms),
                                                              time.time()))
            if probe is None and args.batches:
                chosen.append(w)
                continue
            if probe is None:
                cpu, wall, floor = plain(kms, w, args.calls, args.rounds)
                print(f"{w.name:<18} cpu {cpu:.3f} ms  wall {wall:.3f} ms  floor {floor:.3f} ms"
                      f"  cpu-floor {cpu - floor:.3f} ms", flush=True)
                continue
            show(run(kms, w, probe, args.calls, args.rounds))
        if chosen:
            interleaved(kms, chosen, args.calls, args.batches)
        home.close()


if __name__ == "__main__":
    main()
