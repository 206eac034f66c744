"""The same token properties on two independent PKCS#11 modules: SoftHSM2 and openCryptoki's
soft token. Long-term keys stay sensitive and non-extractable on each (checked from outside
the store: python-pkcs11 in another process, pkcs11-tool, attempts to weaken or wrap them),
the mechanism plan picks the direct mechanism where the module has it and a token-side
fallback where not, threads share the module safely, and a lost token comes back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac as std_hmac
import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hsm import open_keystore
from hsm.pkcs11 import RECONNECT_INTERVAL, Pkcs11KeyStore
from hsm.pkcs11.mechanisms import Operation, Way
from kms.keystore import Digest, KeyRef, TokenUnavailable
from kms.mikey.prf import prf
from tests.hsm.conftest import SoftToken, token_on
from tests.token_modules import MODULES, OckToken, opencryptoki_token_lost

PSK16 = bytes(range(16))
PSK32 = bytes(range(32, 64))
_n = itertools.count()


@pytest.fixture(scope="module", params=MODULES)
def token(request: pytest.FixtureRequest) -> SoftToken | OckToken:
    return token_on(request.param, request, "kms-modules")


@pytest.fixture(scope="module")
def store(token: SoftToken | OckToken) -> Iterator[tuple[Pkcs11KeyStore, dict[str, str]]]:
    ks = open_keystore(token.config())
    tag = os.urandom(3).hex()  # the openCryptoki token lives for the whole session
    labels = {k: f"{k}-{tag}" for k in ("psk16", "psk32", "gen32")}
    ks.import_secret(labels["psk16"], PSK16)
    ks.import_secret(labels["psk32"], PSK32)
    ks.generate_secret(labels["gen32"], 32)
    yield ks, labels
    for label in labels.values():
        with contextlib.suppress(Exception):
            ks.delete(label)
    ks.close()


def _module_name(token: SoftToken | OckToken) -> str:
    return "opencryptoki" if isinstance(token, OckToken) else "softhsm2"


# --- long-term keys cannot leave the token, seen from outside the store ---------------------

_PROBE = textwrap.dedent(
    """
    import sys, pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11.exceptions import PKCS11Error
    module, label, pin, key_label = sys.argv[1:5]
    tok = pkcs11.lib(module).get_token(token_label=label)
    with tok.open(rw=True, user_pin=pin) as s:
        objs = list(s.get_objects({Attribute.LABEL: key_label,
                                   Attribute.CLASS: ObjectClass.SECRET_KEY}))
        assert len(objs) == 1, len(objs)
        o = objs[0]
        print("flags", o[Attribute.SENSITIVE], o[Attribute.EXTRACTABLE], o[Attribute.TOKEN])
        def attempt(name, fn):
            try:
                fn()
            except PKCS11Error as exc:
                print(name, "refused", type(exc).__name__)
            else:
                print(name, "ALLOWED")
        attempt("read", lambda: o[Attribute.VALUE])
        def weaken_extractable():
            o[Attribute.EXTRACTABLE] = True
        def weaken_sensitive():
            o[Attribute.SENSITIVE] = False
        attempt("extractable", weaken_extractable)
        attempt("sensitive", weaken_sensitive)
        def copy_out():
            c = o.copy({Attribute.TOKEN: False, Attribute.EXTRACTABLE: True,
                        Attribute.SENSITIVE: False})
            c[Attribute.VALUE]
        attempt("copy", copy_out)
        wrapper = s.generate_key(KeyType.AES, 128, store=False,
                                 template={Attribute.WRAP: True, Attribute.ENCRYPT: True})
        attempt("wrap", lambda: wrapper.wrap_key(o, mechanism=Mechanism.AES_ECB))
    """
)


def test_values_cannot_be_read_weakened_copied_out_or_wrapped(
        store: tuple[Pkcs11KeyStore, dict[str, str]], token: Any) -> None:
    _ks, labels = store
    for label in labels.values():
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, token.module, token.label, token.user_pin, label],
            env=token.env(), capture_output=True, text=True, timeout=60, check=False,
        )
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0] == "flags True False True", lines
        results = dict(line.split(" ", 1) for line in lines[1:])
        assert set(results) == {"read", "extractable", "sensitive", "copy", "wrap"}
        for what, outcome in results.items():
            assert outcome.startswith("refused"), f"{_module_name(token)}: {what} {outcome}"
        for value in (PSK16, PSK32):
            assert value.hex() not in proc.stdout + proc.stderr


def test_value_unreadable_through_pkcs11_tool(store: tuple[Pkcs11KeyStore, dict[str, str]],
                                              token: Any, tmp_path: Path) -> None:
    _ks, labels = store
    assert shutil.which("pkcs11-tool"), "pkcs11-tool is required (opensc)"
    for key, value in (("psk16", PSK16), ("psk32", PSK32)):
        out = tmp_path / f"{key}.bin"
        proc = subprocess.run(
            ["pkcs11-tool", "--module", token.module, "--login", "--pin", token.user_pin,
             "--token-label", token.label, "--read-object", "--type", "secrkey",
             "--label", labels[key], "--output-file", str(out)],
            env=token.env(), capture_output=True, timeout=60, check=False,
        )
        assert proc.returncode != 0
        assert b"CKR_ATTRIBUTE_SENSITIVE" in proc.stderr, proc.stderr
        assert not out.exists() or value not in out.read_bytes()
        assert value not in proc.stdout
        assert value.hex().encode() not in proc.stdout


def test_key_info_flags(store: tuple[Pkcs11KeyStore, dict[str, str]]) -> None:
    ks, labels = store
    for label in labels.values():
        info = ks.key_info(label)
        assert info.sensitive
        assert not info.extractable
    assert ks.key_info(labels["gen32"]).always_sensitive
    assert ks.key_info(labels["gen32"]).never_extractable
    assert ks.key_info(labels["psk16"]).length_bits == 128
    assert ks.key_info(labels["psk32"]).length_bits == 256


def test_long_term_hmac_and_prf(store: tuple[Pkcs11KeyStore, dict[str, str]]) -> None:
    ks, labels = store
    for key, value in (("psk16", PSK16), ("psk32", PSK32)):
        for func in Digest:
            assert ks.prf(KeyRef(labels[key]), b"lbl", 48, func) == prf(value, b"lbl", 48, func)


def test_per_message_keys_by_handle(store: tuple[Pkcs11KeyStore, dict[str, str]]) -> None:
    """Per-message keys go through hsm.pkcs11.raw (bare handles, C_CreateObject / C_Sign /
    C_Encrypt / C_DestroyObject on the function list): the same answers as the software
    computation on each module (AES-CM directly on SoftHSM, over ECB on openCryptoki), for
    HMAC keys of one and two PRF slices and both digests, and no session object left over."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from pkcs11 import Attribute

    ks, labels = store
    for n in (16, 20, 32, 48):
        key = os.urandom(n)
        for func in Digest:
            assert ks.prf(key, b"lbl", 40, func) == prf(key, b"lbl", 40, func)
            assert ks.hmac(key, b"data", func) == std_hmac.new(key, b"data", str(func)).digest()
    for size in (16, 32):
        key, iv = os.urandom(size), os.urandom(16)
        for length in (1, 16, 50):
            data = os.urandom(length)
            enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
            assert ks.aes_cm(key, iv, data) == enc.update(data) + enc.finalize()
    ks.hmac(KeyRef(labels["psk16"]), b"x", Digest.SHA1)  # a working copy exists: it stays
    conn = ks._token._conn
    assert conn is not None
    # Session objects are visible from every session of the process: all of them, less the
    # working copies of long-term keys (hsm.pkcs11.working).
    copies = {w[0].wrapper.handle for ps in conn.sessions for w in ps.working.values()}
    assert copies
    objs = conn.sessions[0].session.get_objects({Attribute.TOKEN: False})
    assert [o for o in objs if o.wrapper.handle not in copies] == []


def test_raw_call_errors_are_python_pkcs11_errors_mapped_as_before() -> None:
    import pkcs11.exceptions as p11e

    from hsm.pkcs11.errors import convert, is_not_initialized
    from hsm.pkcs11.raw import error_for
    from kms.keystore import KeyStoreError

    assert isinstance(error_for(0xB3), p11e.SessionHandleInvalid)
    assert isinstance(error_for(0x82), p11e.ObjectHandleInvalid)
    assert isinstance(error_for(0x21), p11e.DataLenRange)
    assert is_not_initialized(error_for(0x190))
    assert type(error_for(0x7FFF)) is p11e.PKCS11Error
    lost = convert(error_for(0xE0), what="prf", sealed=False, cached_handle=True)
    assert lost.broken and isinstance(lost.error, TokenUnavailable)
    bad = convert(error_for(0x21), what="aes_cm", sealed=False, cached_handle=False)
    assert not bad.broken and type(bad.error) is KeyStoreError


# --- the mechanism plan ---------------------------------------------------------------------


def test_plan_uses_direct_mechanisms_where_present_and_token_fallbacks_where_not(
        store: tuple[Pkcs11KeyStore, dict[str, str]], token: Any) -> None:
    ks, _labels = store
    plan = ks.mechanisms
    for op in (Operation.HMAC_SHA1, Operation.HMAC_SHA256, Operation.RANDOM,
               Operation.GENERATE_SECRET, Operation.GENERATE_RSA,
               Operation.RSA_DECRYPT_PKCS1V15, Operation.RSA_DECRYPT_OAEP_SHA1):
        assert plan.method(op).way is Way.DIRECT, op
    aes = plan.method(Operation.AES_CM_128)
    sign = plan.method(Operation.SIGN_RSA_PKCS1V15_SHA256)
    if _module_name(token) == "softhsm2":
        # The request path keeps its speed: the combined mechanisms where the module has them.
        assert (aes.mechanism_name, aes.way) == ("CKM_AES_CTR", Way.DIRECT)
        assert (sign.mechanism_name, sign.way) == ("CKM_SHA256_RSA_PKCS", Way.DIRECT)
        assert plan.has(Operation.GENERATE_EC)
    else:
        # openCryptoki 3.8's soft token: no CKM_AES_CTR, no CKM_SHA256_RSA_PKCS, no EC.
        assert (aes.mechanism_name, aes.way) == ("CKM_AES_ECB", Way.ECB_COUNTER_BLOCKS)
        assert (sign.mechanism_name, sign.way) == ("CKM_RSA_PKCS", Way.DIGEST_INFO)
        assert not plan.has(Operation.GENERATE_EC)
        assert "CKM_EC_KEY_PAIR_GEN" in plan.missing[Operation.GENERATE_EC]


# --- threads --------------------------------------------------------------------------------


def test_eight_threads_of_hmacs(store: tuple[Pkcs11KeyStore, dict[str, str]]) -> None:
    ks, labels = store
    errors: list[str] = []
    ref = KeyRef(labels["psk16"])

    def work(i: int) -> None:
        try:
            for j in range(40):
                data = f"{i}-{j}".encode()
                want = std_hmac.new(PSK16, data, "sha1").digest()
                if ks.hmac(ref, data, Digest.SHA1) != want:
                    errors.append(f"thread {i}: wrong HMAC")
                key = os.urandom(16)
                if ks.hmac(key, data, Digest.SHA256) != std_hmac.new(
                        key, data, "sha256").digest():
                    errors.append(f"thread {i}: wrong ephemeral HMAC")
        except Exception as exc:
            errors.append(f"thread {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:5]


# --- the module leaves the process's other descriptors alone ------------------------------

_DESCRIPTORS = textwrap.dedent(
    """
    import dataclasses, json, os, sys
    from hsm import TokenConfig
    from hsm.pkcs11 import Pkcs11KeyStore
    config = TokenConfig(**json.loads(sys.argv[1]))
    for round_ in range(3):
        # Low numbers held by the process, as a server's sockets and epoll descriptors are.
        ours = os.pipe()
        ids = [os.fstat(fd).st_ino for fd in ours]
        ks = Pkcs11KeyStore(config)
        ks.random(8)
        ks.close()
        for fd, ino in zip(ours, ids):
            try:
                same = os.fstat(fd).st_ino == ino
            except OSError:
                same = False
            print(round_, fd, "kept" if same else "LOST")
    """
)


def test_opening_and_closing_the_module_closes_no_descriptor_of_ours(token: Any) -> None:
    """Every connect finalises and initialises the module again (hsm.pkcs11.module); a module
    that reuses a stale descriptor number there (openCryptoki's process lock file) must not
    close or lock a descriptor the process opened meanwhile."""
    config = dataclasses.asdict(token.config())
    proc = subprocess.run(
        [sys.executable, "-c", _DESCRIPTORS, json.dumps(config)],
        env=token.env(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 6, lines
    assert all(line.endswith(" kept") for line in lines), (_module_name(token), lines)


# --- token loss and recovery ----------------------------------------------------------------


@contextlib.contextmanager
def _lost(token: SoftToken | OckToken, tmp: Path) -> Iterator[None]:
    if isinstance(token, OckToken):
        with opencryptoki_token_lost(token):
            yield
        return
    moved = tmp / "tokens-moved-away"
    shutil.move(token.tokens_dir, moved)
    try:
        yield
    finally:
        shutil.move(moved, token.tokens_dir)


def _until_ok(call: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except TokenUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.parametrize("module", MODULES)
def test_token_lost_and_restored(module: str, request: pytest.FixtureRequest,
                                 tmp_path: Path) -> None:
    tok = token_on(module, request, f"kms-loss{next(_n)}")
    ks = open_keystore(tok.config())
    label = f"loss-{os.urandom(3).hex()}"
    try:
        ks.import_secret(label, PSK16)
        ref = KeyRef(label)
        expected = prf(PSK16, b"label", 48, Digest.SHA1)
        assert ks.prf(ref, b"label", 48, Digest.SHA1) == expected
        with _lost(tok, tmp_path):
            # Every call fails with TokenUnavailable while the token is gone: never a wrong
            # result, never KeyNotFound; several rate-limited reconnect attempts fail.
            deadline = time.monotonic() + 3 * RECONNECT_INTERVAL
            calls = 0
            while time.monotonic() < deadline:
                with pytest.raises(TokenUnavailable, match="token unavailable"):
                    ks.prf(ref, b"label", 48, Digest.SHA1)
                with pytest.raises(TokenUnavailable):
                    ks.aes_cm(os.urandom(16), os.urandom(16), b"x" * 20)
                calls += 1
                time.sleep(0.05)
            assert calls >= 5
            assert not ks.connected
        # The same store reconnects by itself (initialise, log in, rescan).
        got = _until_ok(lambda: ks.prf(ref, b"label", 48, Digest.SHA1),
                        timeout=10 * RECONNECT_INTERVAL)
        assert got == expected
        assert ks.connected
        assert ks.key_info(label).length_bits == 128
    finally:
        with contextlib.suppress(Exception):
            ks.delete(label)
        ks.close()
