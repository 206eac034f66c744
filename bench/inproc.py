"""In-process measurements (no gRPC): the token floor of each exchange, and the exchanges
called straight on the KMS core with the PKCS#11 key store and with the software one.

Token floor: one exchange is run through :class:`RecordingKeyStore`, which records every
key-store call (operation, key, arguments); each recorded call is then replayed alone on the
token, back to back, and its median time taken. The floor is the sum: the time the token
operations one exchange needs, with none of our code between them.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, load_der_public_key

from bench.messages import Workload, generate
from bench.world import PSKS, BenchSetup
from hsm.software import SoftwareKeyStore
from kms.core.api import KmsReply
from kms.core.service import Kms
from kms.home import ENVELOPE_LABEL
from kms.keystore import KeyRef, KeyStore, RsaPadding

_OPS = ("hmac", "prf", "prf_many", "aes_cm", "random", "rsa_decrypt", "sign")


class RecordingKeyStore:
    """Delegates to ``inner`` and records the calls of :data:`_OPS`."""

    def __init__(self, inner: KeyStore) -> None:
        self._inner = inner
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._inner, name)
        if name not in _OPS:
            return fn

        def rec(*args: Any) -> Any:
            self.calls.append((name, args))
            return fn(*args)

        return rec


def op_kind(name: str, args: tuple[Any, ...]) -> str:
    """E.g. ``prf[long-term]`` (a KeyRef: a token key object), ``prf[session]`` (a key
    given by value: a session object created, used and destroyed in the token),
    ``aes_cm[session]``, ``random``."""
    if name in ("hmac", "prf", "prf_many"):
        return f"{name}[{'long-term' if isinstance(args[0], KeyRef) else 'session'}]"
    if name in ("rsa_decrypt", "sign"):
        return f"{name}[long-term]"
    if name == "aes_cm":
        return "aes_cm[session]"
    return name


def is_token_op(kind: str) -> bool:
    """Whether the PKCS#11 key store sends this operation to the token: all of them (session
    keys too are used as token session objects, destroyed after use: docs/hsm.md)."""
    return True


@dataclass
class TokenFloor:
    seconds: float  # sum of the medians of each recorded token call, replayed alone
    ops: Counter[str] = field(default_factory=Counter)
    by_kind_s: dict[str, float] = field(default_factory=dict)


def record_ops(kms: Kms, w: Workload, wire: bytes) -> list[tuple[str, tuple[Any, ...]]]:
    deps = kms.deps
    inner = deps.keystore
    rec = RecordingKeyStore(inner)
    deps.keystore = rec
    try:
        reply = call(kms, w, wire)
    finally:
        deps.keystore = inner
    if not reply.ok:
        raise RuntimeError(f"{w.name}: {reply.outcome} {reply.detail}")
    return rec.calls


def token_floor(ks: KeyStore, calls: list[tuple[str, tuple[Any, ...]]],
                budget_s: float = 0.4) -> TokenFloor:
    total = 0.0
    ops: Counter[str] = Counter()
    by_kind: dict[str, float] = {}
    per_call = budget_s / max(len(calls), 1)
    for name, args in calls:
        fn = getattr(ks, name)
        fn(*args)  # warm
        samples: list[float] = []
        stop = time.perf_counter() + per_call
        while len(samples) < 5 or (time.perf_counter() < stop and len(samples) < 500):
            t0 = time.perf_counter()
            fn(*args)
            samples.append(time.perf_counter() - t0)
        med = statistics.median(samples)
        kind = op_kind(name, args)
        ops[kind] += 1
        by_kind[kind] = by_kind.get(kind, 0.0) + med
        if is_token_op(kind):
            total += med
    return TokenFloor(total, ops, by_kind)


def call(kms: Kms, w: Workload, wire: bytes) -> KmsReply:
    if w.exchange == "resolve":
        return kms.resolve_ticket(wire, time.time())
    return kms.request_ticket(wire, time.time())


def software_kms(token_kms: Kms, setup: BenchSetup) -> tuple[Kms, bytes]:
    """The same core (registry, SQLite state, audit log, policy, PK checks) over a
    :class:`SoftwareKeyStore` holding the same PSKs and a TPK and envelope key of its own.
    Returns the KMS and the envelope certificate endpoints must encrypt to."""
    from kms.core.pk import CertificateAuthenticator, EnvelopeKey

    sw = SoftwareKeyStore()
    for ident, psk in PSKS.items():
        ref = token_kms.deps.directory.psk_for(ident)
        assert ref is not None
        sw.import_secret(ref.label, psk)
    _, tpk = token_kms.deps.directory.current_tpk()
    sw.generate_secret(tpk.label, 32)
    if token_kms.deps.fork_modifier is not None:  # RANDRkms key (kms.core.forking)
        sw.generate_secret(token_kms.deps.fork_modifier.label, 32)
    sw.generate_rsa(ENVELOPE_LABEL, 2048)
    public = load_der_public_key(sw.public_key_der(KeyRef(ENVELOPE_LABEL)))
    assert isinstance(public, rsa.RSAPublicKey)
    signer = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "bench software kms")])
    now = time.time()
    import datetime as dt

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.fromtimestamp(now - 86400, dt.UTC))
        .not_valid_after(dt.datetime.fromtimestamp(now + 86400 * 30, dt.UTC))
        .sign(signer, hashes.SHA256())
    )
    cert_der = cert.public_bytes(Encoding.DER)
    deps = dataclasses.replace(token_kms.deps, keystore=sw, pk=None)
    roots = [x509.load_der_x509_certificate(setup.ca_der)]
    token_pk: Any = token_kms.deps.pk
    deps.pk = CertificateAuthenticator(
        deps, roots, [EnvelopeKey(KeyRef(ENVELOPE_LABEL), cert_der)],
        pke_padding=token_pk.pke_padding if token_pk is not None else RsaPadding.PKCS1V15,
    )
    return Kms(deps), cert_der


@dataclass
class InprocResult:
    rate: float
    calls: int
    p50_ms: float
    p99_ms: float
    gen_s: float


def measure_inproc(kms: Kms, w: Workload, seconds: float) -> InprocResult:
    """Back-to-back calls on one thread for about ``seconds`` (messages generated first,
    sized from a short calibration)."""
    cal = generate(w, 10, time.time())
    t0 = time.perf_counter()
    for wire in cal:
        _check(call(kms, w, wire), w)
    per = (time.perf_counter() - t0) / len(cal)
    n = max(20, int(seconds / per * 1.2))
    g0 = time.perf_counter()
    msgs = generate(w, n, time.time())
    gen_s = time.perf_counter() - g0
    lat: list[float] = []
    t0 = time.perf_counter()
    stop = t0 + seconds
    for wire in msgs:
        c0 = time.perf_counter()
        _check(call(kms, w, wire), w)
        c1 = time.perf_counter()
        lat.append(c1 - c0)
        if c1 >= stop:
            break
    elapsed = time.perf_counter() - t0
    lat.sort()
    return InprocResult(
        len(lat) / elapsed, len(lat), lat[len(lat) // 2] * 1e3,
        lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3, gen_s,
    )


def _check(reply: KmsReply, w: Workload) -> None:
    if not reply.ok:
        raise RuntimeError(f"{w.name}: {reply.outcome} {reply.detail}")


def request_sender(kms: Kms) -> Callable[[bytes], bytes]:
    def send(wire: bytes) -> bytes:
        reply = kms.request_ticket(wire, time.time())
        if not reply.ok:
            raise RuntimeError(f"ticket request refused: {reply.outcome} {reply.detail}")
        return reply.data

    return send


class TimingKeyStore:
    """Delegates to ``inner`` and adds up the time spent in each kind of operation (the
    token's cost *inside* an exchange, as opposed to the floor replayed alone)."""

    def __init__(self, inner: KeyStore) -> None:
        self._inner = inner
        self.by_kind: dict[str, float] = {}

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._inner, name)
        if name not in _OPS:
            return fn

        def timed(*args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                kind = op_kind(name, args)
                self.by_kind[kind] = self.by_kind.get(kind, 0.0) + time.perf_counter() - t0

        return timed


def main() -> None:
    """``python -m bench.inproc [--seconds S] [--rounds N] [--profile]``: the in-process
    exchanges alone, token and software rounds alternating (for before/after comparisons
    of a fix), with the token time spent inside the exchange and the replayed floor."""
    import argparse
    import tempfile
    from pathlib import Path

    from bench.messages import WORKLOADS, obtain_grant
    from bench.world import create_home
    from kms.home import open_home
    from kms.server.compose import build_handler

    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", help="substring of the workload name, e.g. 'request psk'")
    ap.add_argument("--threads", type=int, nargs="*", default=[],
                    help="also run the token KMS with these thread counts (contention)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kms-bench-") as tmp:
        setup = create_home(Path(tmp) / "home")
        home = open_home(setup.home)
        token: Any = build_handler(home)
        sw, sw_cert = software_kms(token, setup)
        print(f"{'exchange':<18} {'token/s':>8} {'sw/s':>8} {'tok/sw':>6} {'in-token ms':>11} "
              f"{'floor ms':>8}")
        for ex, auth, fork in WORKLOADS:
            wt = Workload(ex, auth, fork, setup.kms_cert_der, setup.pk)
            ws = Workload(ex, auth, fork, sw_cert, setup.pk)
            if args.only and args.only not in wt.name:
                continue
            if ex == "resolve":
                wt = dataclasses.replace(wt, grant=obtain_grant(wt, request_sender(token),
                                                                time.time()))
                ws = dataclasses.replace(ws, grant=obtain_grant(ws, request_sender(sw),
                                                                time.time()))
            tr, sr = [], []
            for _ in range(args.rounds):
                tr.append(measure_inproc(token, wt, args.seconds).rate)
                sr.append(measure_inproc(sw, ws, args.seconds).rate)
            inner = token.deps.keystore
            timing = TimingKeyStore(inner)
            token.deps.keystore = timing
            n = 200
            try:
                for wire in generate(wt, n, time.time()):
                    _check(call(token, wt, wire), wt)
            finally:
                token.deps.keystore = inner
            floor = token_floor(inner, record_ops(token, wt, generate(wt, 1, time.time())[0]))
            t, s = statistics.median(tr), statistics.median(sr)
            print(f"{wt.name:<18} {t:>8,.0f} {s:>8,.0f} {s / t:>6.2f} "
                  f"{sum(timing.by_kind.values()) / n * 1e3:>11.3f} {floor.seconds * 1e3:>8.3f}"
                  f"   in token: " + ", ".join(f"{k} {v / n * 1e3:.3f}"
                                               for k, v in sorted(timing.by_kind.items())))
            for n in args.threads:
                threaded(token, wt, n, 1500)
        home.close()


def threaded(kms: Kms, w: Workload, threads: int, count: int) -> None:
    """``count`` calls from ``threads`` threads: rate and CPU per call (GIL contention)."""
    import threading

    it = iter(generate(w, count, time.time()))
    lock = threading.Lock()

    def run() -> None:
        while True:
            with lock:
                wire = next(it, None)
            if wire is None:
                return
            _check(call(kms, w, wire), w)

    c0, t0 = time.process_time(), time.perf_counter()
    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    el, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"  {w.name}, token, {threads} thread(s): {count / el:,.0f}/s, "
          f"{cpu / count * 1e3:.3f} ms CPU per call")


if __name__ == "__main__":
    main()
