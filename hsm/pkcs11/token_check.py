"""``kms token check``: can the KMS run on this PKCS#11 module and token, and how fast?

For an operator evaluating an HSM: the module's identity, every operation the KMS needs with
the mechanism it will use (or what is missing), the key-size ranges, probes of the token
behaviour the KMS relies on (session objects, C_CopyObject, non-extractable secrets and RSA
keys, several threads at once), and the median time of each operation. Every probe computes
a result that is checked against independent code (hashlib, ``cryptography``), so a module
that answers wrongly fails the check rather than being timed.

Everything runs on session objects (CKA_TOKEN false): the check leaves nothing on the token.
"""

from __future__ import annotations

import hashlib
import hmac as std_hmac
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import pkcs11.exceptions as p11e
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from pkcs11 import MGF, Attribute, Mechanism, ObjectClass
from pkcs11 import KeyType as P11KeyType

from hsm.config import TokenConfig
from hsm.pkcs11.catalogue import public_der as _public_der
from hsm.pkcs11.mechanisms import MechanismPlan, MechInfo, Operation
from hsm.pkcs11.store import Pkcs11KeyStore
from hsm.pkcs11.token_ops import rsa_sign
from kms.keystore import Digest, KeyStoreError, SignScheme

DATA = bytes(range(64))
"""What each operation is timed on: 64 bytes, the size of a MIKEY MAC input or KEMAC."""


@dataclass
class OperationRow:
    operation: str
    needed: bool
    uses: str | None  # mechanism and way, None when missing
    missing: str | None
    key_sizes: str | None
    median_us: float | None = None
    error: str | None = None


@dataclass
class Probe:
    name: str
    needed: bool
    ok: bool
    detail: str


@dataclass
class CheckReport:
    module: str
    library: str = ""
    token: str = ""
    operations: list[OperationRow] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    error: str | None = None

    @property
    def can_run(self) -> bool:
        if self.error is not None:
            return False
        return all(r.uses is not None and r.error is None for r in self.operations if r.needed) \
            and all(p.ok for p in self.probes if p.needed)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["can_run"] = self.can_run
        return d


def _median_us(fn: Callable[[], object], iterations: int) -> float:
    fn()  # warm-up (first use may set up caches in the module)
    samples = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def _key_sizes(plan: MechanismPlan, table: dict[int, MechInfo], op: Operation) -> str | None:
    if not plan.has(op) or op is Operation.RANDOM:
        return None
    info = table.get(plan.method(op).mechanism)
    if info is None:
        return None
    return f"{info.min_key}..{info.max_key if info.max_key else 'any'}"


def _secret_template() -> dict[Attribute, Any]:
    return {
        Attribute.TOKEN: False, Attribute.PRIVATE: False, Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False, Attribute.SIGN: True, Attribute.VERIFY: True,
    }


def _refused(fn: Callable[[], object]) -> bool:
    try:
        fn()
    except p11e.PKCS11Error:
        return True
    return False


def run_check(config: TokenConfig, *, required: Iterable[str], iterations: int = 200,
              threads: int = 8) -> CheckReport:
    """Open the token, probe it, time it. Never raises for what the token does wrong: that
    goes into the report (``can_run`` false)."""
    needed = {Operation(op) for op in required}
    report = CheckReport(module=config.module)
    try:
        store = Pkcs11KeyStore(config)
    except KeyStoreError as exc:
        report.error = f"cannot open the token: {exc}"
        return report
    try:
        _check(store, report, needed, iterations, threads)
    except KeyStoreError as exc:
        report.error = f"token failed during the check: {exc}"
    finally:
        store.close()
    return report


def _check(store: Pkcs11KeyStore, report: CheckReport, needed: set[Operation],
           iterations: int, threads: int) -> None:
    plan = store.mechanisms
    with store.probe() as (lib, token, session, table):
        report.library = (f"{lib.library_description.strip()} "
                          f"{lib.library_version[0]}.{lib.library_version[1]} "
                          f"({lib.manufacturer_id.strip()}), "
                          f"Cryptoki {lib.cryptoki_version[0]}.{lib.cryptoki_version[1]}")
        serial = token.serial.decode(errors="replace") if isinstance(token.serial, bytes) \
            else str(token.serial)
        report.token = (f"{token.label.strip()!r} ({token.model.strip()}, "
                        f"{token.manufacturer_id.strip()}, serial {serial.strip()})")
        for op in Operation:
            method = plan.methods.get(op)
            report.operations.append(OperationRow(
                op.value, op in needed,
                None if method is None else method.describe(),
                plan.missing.get(op), _key_sizes(plan, table, op),
            ))
        rows = {r.operation: r for r in report.operations}
        keys = _probe_objects(session, plan, report)
        _time_session_ops(session, plan, rows, keys, iterations)
    _time_store_ops(store, report, rows, iterations)
    _probe_threads(store, report, threads)


def _probe_objects(session: Any, plan: MechanismPlan, report: CheckReport) -> dict[str, Any]:
    """Session objects, copies, non-extractability; returns the objects the timings use."""
    keys: dict[str, Any] = {}
    value = os.urandom(32)
    # Session objects through C_CreateObject: every per-message key of the KMS is one.
    try:
        obj = session.create_object({
            **_secret_template(), Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: P11KeyType.GENERIC_SECRET, Attribute.VALUE: value,
        })
        good = bytes(obj.sign(DATA, mechanism=Mechanism.SHA256_HMAC)) == std_hmac.new(
            value, DATA, hashlib.sha256).digest()
        keys["secret"] = (obj, value)
        report.probes.append(Probe("session objects (C_CreateObject)", True, good,
                                   "HMAC under an imported session key equals hashlib"
                                   if good else "HMAC result differs from hashlib"))
    except p11e.PKCS11Error as exc:
        report.probes.append(Probe("session objects (C_CreateObject)", True, False,
                                   f"refused ({type(exc).__name__})"))
    # Non-extractable generated secrets (TPKs are made like this).
    try:
        gen = session.generate_key(P11KeyType.GENERIC_SECRET, 256, store=False,
                                   template=_secret_template())
        unreadable = _refused(lambda: gen[Attribute.VALUE])

        def weaken() -> None:
            gen[Attribute.EXTRACTABLE] = True

        unweakenable = _refused(weaken)
        flags = bool(gen[Attribute.ALWAYS_SENSITIVE]) and bool(gen[Attribute.NEVER_EXTRACTABLE])
        ok = unreadable and unweakenable and flags
        report.probes.append(Probe(
            "non-extractable secrets", True, ok,
            "value unreadable, EXTRACTABLE cannot be set, ALWAYS_SENSITIVE and "
            "NEVER_EXTRACTABLE set" if ok else
            f"value unreadable={unreadable}, weakening refused={unweakenable}, flags={flags}"))
        # C_CopyObject: the KMS's fast path (working copies); optional, it falls back.
        try:
            copy = gen.copy({Attribute.TOKEN: False, Attribute.LABEL: ""})
            still = bool(copy[Attribute.SENSITIVE]) and not bool(copy[Attribute.EXTRACTABLE])
            loosen = _refused(lambda: gen.copy({Attribute.TOKEN: False,
                                                Attribute.EXTRACTABLE: True}))
            ok = still and loosen
            report.probes.append(Probe(
                "copies (C_CopyObject)", False, ok,
                "copy stays sensitive, an extractable copy is refused" if ok else
                f"copy sensitive and non-extractable={still}, extractable copy refused={loosen}"))
            copy.destroy()
        except p11e.PKCS11Error as exc:
            report.probes.append(Probe("copies (C_CopyObject)", False, False,
                                       f"refused ({type(exc).__name__}): the KMS uses the "
                                       "stored objects directly (slower)"))
        gen.destroy()
    except p11e.PKCS11Error as exc:
        report.probes.append(Probe("non-extractable secrets", True, False,
                                   f"generation refused ({type(exc).__name__})"))
    # RSA private keys: sensitive, non-extractable, the private exponent unreadable.
    if plan.has(Operation.GENERATE_RSA):
        try:
            pub, priv = session.generate_keypair(
                P11KeyType.RSA, 2048, store=False,
                public_template={Attribute.TOKEN: False, Attribute.ENCRYPT: True,
                                 Attribute.VERIFY: True},
                private_template={Attribute.TOKEN: False, Attribute.PRIVATE: True,
                                  Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                                  Attribute.DECRYPT: True, Attribute.SIGN: True},
            )
            ok = _refused(lambda: priv[Attribute.PRIVATE_EXPONENT]) and _refused(
                lambda: priv[Attribute.PRIME_1])
            report.probes.append(Probe("non-extractable RSA keys", True, ok,
                                       "private exponent and primes unreadable" if ok else
                                       "private key material readable"))
            der = _public_der(pub)
            if der is not None:
                keys["rsa"] = (priv, serialization.load_der_public_key(der))
        except p11e.PKCS11Error as exc:
            report.probes.append(Probe("non-extractable RSA keys", True, False,
                                       f"RSA-2048 generation refused ({type(exc).__name__})"))
    return keys


def _timed(row: OperationRow, fn: Callable[[], bool], iterations: int) -> None:
    """Check one result, then time it; a wrong result or a token error goes into the row."""
    try:
        if not fn():
            row.error = "wrong result (differs from independent code)"
            return
        row.median_us = _median_us(fn, iterations)
    except p11e.PKCS11Error as exc:
        row.error = f"failed ({type(exc).__name__})"
    except KeyStoreError as exc:
        row.error = str(exc)


def _time_session_ops(session: Any, plan: MechanismPlan, rows: dict[str, OperationRow],
                      keys: dict[str, Any], iterations: int) -> None:
    if "secret" in keys:
        obj, value = keys["secret"]
        for op, mech, name in ((Operation.HMAC_SHA1, Mechanism.SHA_1_HMAC, "sha1"),
                               (Operation.HMAC_SHA256, Mechanism.SHA256_HMAC, "sha256")):
            if plan.has(op):
                _timed(rows[op.value], _hmac_probe(obj, mech, std_hmac.new(
                    value, DATA, name).digest()), iterations)
        obj.destroy()
    if "rsa" in keys:
        priv, pub = keys["rsa"]
        assert isinstance(pub, rsa.RSAPublicKey)
        rsa_iter = max(5, iterations // 10)
        ct_v15 = pub.encrypt(DATA[:32], padding.PKCS1v15())
        ct_oaep = pub.encrypt(DATA[:32], padding.OAEP(padding.MGF1(hashes.SHA1()),  # noqa: S303
                                                      hashes.SHA1(), None))  # noqa: S303
        if plan.has(Operation.RSA_DECRYPT_PKCS1V15):
            _timed(rows[Operation.RSA_DECRYPT_PKCS1V15.value],
                   lambda: bytes(priv.decrypt(ct_v15, mechanism=Mechanism.RSA_PKCS)) == DATA[:32],
                   rsa_iter)
        if plan.has(Operation.RSA_DECRYPT_OAEP_SHA1):
            _timed(rows[Operation.RSA_DECRYPT_OAEP_SHA1.value],
                   lambda: bytes(priv.decrypt(ct_oaep, mechanism=Mechanism.RSA_PKCS_OAEP,
                                              mechanism_param=(Mechanism.SHA_1, MGF.SHA1, None)))
                   == DATA[:32], rsa_iter)
        for scheme, op in ((SignScheme.RSA_PKCS1V15_SHA256, Operation.SIGN_RSA_PKCS1V15_SHA256),
                           (SignScheme.RSA_PKCS1V15_SHA1, Operation.SIGN_RSA_PKCS1V15_SHA1),
                           (SignScheme.RSA_PSS_SHA256, Operation.SIGN_RSA_PSS_SHA256),
                           (SignScheme.RSA_PSS_SHA1, Operation.SIGN_RSA_PSS_SHA1)):
            if plan.has(op):
                _timed(rows[op.value], _sign_probe(priv, pub, plan, scheme), rsa_iter)


def _hmac_probe(obj: Any, mech: Mechanism, want: bytes) -> Callable[[], bool]:
    return lambda: bytes(obj.sign(DATA, mechanism=mech)) == want


def _sign_probe(priv: Any, pub: rsa.RSAPublicKey, plan: MechanismPlan,
                scheme: SignScheme) -> Callable[[], bool]:
    return lambda: _verifies(pub, scheme, rsa_sign(priv, plan, scheme, DATA))


def _aes_probe(store: Pkcs11KeyStore, n: int) -> Callable[[], bool]:
    key, iv = os.urandom(n), os.urandom(16)
    enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    want = enc.update(DATA) + enc.finalize()
    return lambda: store.aes_cm(key, iv, DATA) == want


def _verifies(pub: rsa.RSAPublicKey, scheme: SignScheme, sig: bytes) -> bool:
    h: hashes.HashAlgorithm = hashes.SHA1() if scheme.name.endswith("SHA1") else hashes.SHA256()  # noqa: S303
    pad: padding.AsymmetricPadding = padding.PKCS1v15() if "PKCS1V15" in scheme.name else \
        padding.PSS(mgf=padding.MGF1(h), salt_length=padding.PSS.DIGEST_LENGTH)
    try:
        pub.verify(sig, DATA, pad, h)
    except InvalidSignature:
        return False
    return True


def _time_store_ops(store: Pkcs11KeyStore, report: CheckReport,
                    rows: dict[str, OperationRow], iterations: int) -> None:
    """Operations timed through the key store itself, per-message key creation included."""
    for op, n in ((Operation.AES_CM_128, 16), (Operation.AES_CM_256, 32)):
        if rows[op.value].uses is None:
            continue
        _timed(rows[op.value], _aes_probe(store, n), iterations)
    if rows[Operation.RANDOM.value].uses is not None:
        _timed(rows[Operation.RANDOM.value], lambda: len(store.random(32)) == 32, iterations)
    ephemeral = os.urandom(16)
    row = OperationRow("hmac-sha1-per-message-key", False,
                       rows[Operation.HMAC_SHA1.value].uses, None, None)
    if row.uses is not None:
        _timed(row, lambda: store.hmac(ephemeral, DATA, Digest.SHA1)
               == std_hmac.new(ephemeral, DATA, "sha1").digest(), iterations)
        report.operations.append(row)


def _probe_threads(store: Pkcs11KeyStore, report: CheckReport, threads: int) -> None:
    """``threads`` threads of HMACs at once (the store's sessions, the module's locking)."""
    errors: list[str] = []
    done = [0]
    lock = threading.Lock()

    def work(i: int) -> None:
        for j in range(50):
            key = os.urandom(16) + bytes([i, j])
            data = f"{i}/{j}".encode()
            try:
                if store.hmac(key, data, Digest.SHA256) != std_hmac.new(
                        key, data, "sha256").digest():
                    errors.append("wrong HMAC")
                    return
            except KeyStoreError as exc:
                errors.append(str(exc))
                return
            with lock:
                done[0] += 1

    t0 = time.perf_counter()
    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    ok = not errors and done[0] == threads * 50
    report.probes.append(Probe(
        f"{threads} threads at once", True, ok,
        f"{done[0]} HMACs correct, {done[0] / elapsed:,.0f}/s" if ok else
        f"{len(errors)} thread(s) failed: {errors[0] if errors else 'incomplete'}"))


def render_text(report: CheckReport) -> str:
    lines = [f"module:  {report.module}"]
    if report.library:
        lines.append(f"library: {report.library}")
    if report.token:
        lines.append(f"token:   {report.token}")
    if report.error:
        lines += ["", f"error: {report.error}"]
    if report.operations:
        lines += ["", f"{'operation':<52} {'needed':<6}  {'median':>9}  uses / missing"]
        for r in report.operations:
            t = "-" if r.median_us is None else f"{r.median_us:7.1f} us"
            what = r.uses if r.uses is not None else f"MISSING: {r.missing}"
            if r.key_sizes:
                what += f" [key sizes {r.key_sizes}]"
            if r.error:
                what += f" ERROR: {r.error}"
            lines.append(f"{r.operation:<52} {'yes' if r.needed else 'no':<6}  {t:>9}  {what}")
    if report.probes:
        lines += ["", f"{'capability':<34} {'needed':<6}  result"]
        for p in report.probes:
            lines.append(f"{p.name:<34} {'yes' if p.needed else 'no':<6}  "
                         f"{'ok' if p.ok else 'FAILED'}: {p.detail}")
    if report.operations:
        lines += [
            "",
            "Timings: medians of single calls on 64 bytes. aes-cm and hmac-sha1-per-message-key go",
            "through the key store, creating and destroying the session key each time (as the",
            "KMS does per message); the HMAC and RSA rows use a key already in the token.",
        ]
    lines += ["", "verdict: the KMS can run on this token" if report.can_run else
              "verdict: the KMS CANNOT run on this token (see MISSING / FAILED / ERROR above)"]
    return "\n".join(lines)


__all__ = ["CheckReport", "OperationRow", "Probe", "render_text", "run_check"]
