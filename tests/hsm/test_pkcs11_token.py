"""PKCS#11-specific properties on a real SoftHSM2 token: key protection seen from outside the
store (python-pkcs11 in another process, pkcs11-tool), persistence, handle caching, sharing,
and concurrency (threads x forked processes).
"""

from __future__ import annotations

import hmac as std_hmac
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import load_der_public_key

from hsm import open_keystore
from hsm.pkcs11 import MISSING_KEY_RESCAN_S, Pkcs11KeyStore, TokenConfigError, raw
from kms.keystore import (
    Digest,
    InvalidSealedData,
    KeyNotFound,
    KeyRef,
    RsaPadding,
    TokenUnavailable,
)
from kms.mikey.prf import prf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PSK16 = bytes(range(16))
PSK32 = bytes(range(32, 64))


@pytest.fixture(scope="module")
def token(new_softhsm_token: Callable[[str], Any]) -> Any:
    return new_softhsm_token("kms-props")


@pytest.fixture(scope="module")
def store(token: Any) -> Iterator[Pkcs11KeyStore]:
    ks = open_keystore(token.config())
    ks.import_secret("psk16", PSK16)
    ks.import_secret("psk32", PSK32)
    ks.generate_secret("gen32", 32)
    yield ks
    ks.close()


# --- key protection, checked independently of the store -------------------------------------

_READ_VALUE = textwrap.dedent(
    """
    import sys, pkcs11
    from pkcs11 import Attribute, ObjectClass
    from pkcs11.exceptions import AttributeSensitive
    module, label, pin, key_label = sys.argv[1:5]
    tok = pkcs11.lib(module).get_token(token_label=label)
    with tok.open(user_pin=pin) as s:
        objs = list(s.get_objects({Attribute.LABEL: key_label,
                                   Attribute.CLASS: ObjectClass.SECRET_KEY}))
        assert len(objs) == 1, len(objs)
        o = objs[0]
        flags = (o[Attribute.SENSITIVE], o[Attribute.EXTRACTABLE], o[Attribute.TOKEN])
        try:
            o[Attribute.VALUE]
        except AttributeSensitive:
            print("SENSITIVE", *flags)
        else:
            print("READABLE", *flags)
    """
)


_CREATE_SECRET = textwrap.dedent(
    """
    import sys, pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass
    module, label, pin, key_label, hexvalue = sys.argv[1:6]
    tok = pkcs11.lib(module).get_token(token_label=label)
    with tok.open(rw=True, user_pin=pin) as s:
        s.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY,
                         Attribute.KEY_TYPE: KeyType.GENERIC_SECRET, Attribute.TOKEN: True,
                         Attribute.LABEL: key_label, Attribute.SIGN: True,
                         Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                         Attribute.VALUE: bytes.fromhex(hexvalue)})
    """
)


@pytest.mark.parametrize("label", ["psk16", "psk32", "gen32"])
def test_value_unreadable_through_python_pkcs11(store: Pkcs11KeyStore, token: Any,
                                                label: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _READ_VALUE, token.module, token.label, token.user_pin, label],
        env=token.env(), capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["SENSITIVE", "True", "False", "True"]


@pytest.mark.parametrize(("label", "value"), [("psk16", PSK16), ("psk32", PSK32)])
def test_value_unreadable_through_pkcs11_tool(store: Pkcs11KeyStore, token: Any, tmp_path: Any,
                                              label: str, value: bytes) -> None:
    out = tmp_path / "value.bin"
    proc = subprocess.run(
        ["pkcs11-tool", "--module", token.module, "--login", "--pin", token.user_pin,
         "--read-object", "--type", "secrkey", "--label", label, "--output-file", str(out)],
        env=token.env(), capture_output=True, timeout=60, check=False,
    )
    assert proc.returncode != 0
    assert b"CKR_ATTRIBUTE_SENSITIVE" in proc.stderr
    assert not out.exists() or value not in out.read_bytes()
    assert value not in proc.stdout
    assert value.hex().encode() not in proc.stdout


def test_key_info_flags(store: Pkcs11KeyStore) -> None:
    for label in ("psk16", "psk32", "gen32"):
        info = store.key_info(label)
        assert info.sensitive
        assert not info.extractable
    # Imported values were known outside the token; the token says so (PKCS#11 2.40 4.9).
    assert not store.key_info("psk16").always_sensitive
    assert store.key_info("gen32").always_sensitive
    assert store.key_info("gen32").never_extractable
    assert store.key_info("psk16").length_bits == 128


# --- persistence, cache, sharing ------------------------------------------------------------


def test_true_length_survives_reopen(store: Pkcs11KeyStore, token: Any) -> None:
    # A second store in this process shares the connection; a new process would rescan.
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(
            """
            import sys
            from hsm import TokenConfig, open_keystore
            from kms.keystore import Digest, KeyRef
            ks = open_keystore(TokenConfig(sys.argv[1], sys.argv[2], None, sys.argv[3],
                                           sys.argv[4]))
            print(ks.key_info("psk16").length_bits, ks.key_info("psk32").length_bits)
            print(ks.prf(KeyRef("psk16"), b"lbl", 48, Digest.SHA1).hex())
            ks.close()
            """
        ), token.module, token.label, token.user_pin, str(token.conf)],
        env={**token.env(), "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lengths, out = proc.stdout.split("\n")[:2]
    assert lengths == "128 256"
    assert bytes.fromhex(out) == prf(PSK16, b"lbl", 48, Digest.SHA1)


def test_handles_are_cached_not_searched(store: Pkcs11KeyStore, token: Any) -> None:
    # Requests use the start-up scan; a key created behind the store's back (another
    # process: `kms endpoint add` while `kms serve` runs) is found by one rate-limited rescan
    # on its first use, and a second miss inside the window does not rescan.
    value = os.urandom(32)
    proc = subprocess.run(
        [sys.executable, "-c", _CREATE_SECRET, token.module, token.label, token.user_pin,
         "outside", value.hex()],
        env=token.env(), capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    time.sleep(MISSING_KEY_RESCAN_S)  # other tests' misses may have just rescanned
    assert store.hmac(KeyRef("outside"), b"x", Digest.SHA1) == std_hmac.new(
        value, b"x", "sha1"
    ).digest()
    rescanned_at = store._token._last_rescan
    with pytest.raises(KeyNotFound):
        store.hmac(KeyRef("still-missing"), b"x", Digest.SHA1)
    assert store._token._last_rescan == rescanned_at  # rate-limited: no second scan
    assert store.key_info("outside").length_bits == 256  # no marker: the stored length
    store.delete("outside")


def test_stores_share_one_module(store: Pkcs11KeyStore, token: Any) -> None:
    second = open_keystore(token.config())
    try:
        assert second.hmac(KeyRef("psk16"), b"d", Digest.SHA1) == std_hmac.new(
            PSK16, b"d", "sha1"
        ).digest()
    finally:
        second.close()
    # Closing the second store leaves the first one working.
    assert store.prf(KeyRef("psk16"), b"l", 16, Digest.SHA1) == prf(PSK16, b"l", 16)
    with pytest.raises(TokenConfigError, match="another token configuration"):
        open_keystore(token.config(token_label="other"))


# --- concurrency ----------------------------------------------------------------------------

THREADS = 8
ROUNDS = 40


def _hammer(store: Pkcs11KeyStore, errors: list[str], counter: list[int], seed: int) -> None:
    """Mixed PRF load: long-term keys, ephemeral two-slice keys (session objects), AES-CM."""
    try:
        for i in range(ROUNDS):
            label = f"lbl-{seed}-{i}".encode()
            func = list(Digest)[i % 2]
            if store.prf(KeyRef("psk16"), label, 48, func) != prf(PSK16, label, 48, func):
                errors.append("prf psk16")
            if store.prf(KeyRef("psk32"), label, 20, func) != prf(PSK32, label, 20, func):
                errors.append("prf psk32")
            eph = os.urandom(48)
            if store.prf(eph, label, 32, func) != prf(eph, label, 32, func):
                errors.append("prf ephemeral")
            if i % 4 == 0:
                key, iv, data = os.urandom(16), os.urandom(16), os.urandom(40)
                enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
                if store.aes_cm(key, iv, data) != enc.update(data):
                    errors.append("aes_cm")
            counter[0] += 1
    except Exception as exc:  # report, do not hide: the test asserts on errors
        errors.append(f"{type(exc).__name__}: {exc}")


def _run_threads(store: Pkcs11KeyStore, seed: int) -> tuple[list[str], int]:
    errors: list[str] = []
    counters = [[0] for _ in range(THREADS)]
    threads = [
        threading.Thread(target=_hammer, args=(store, errors, counters[t], seed * 100 + t))
        for t in range(THREADS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return errors, sum(c[0] for c in counters)


def _child(store: Pkcs11KeyStore, seed: int, results: Any) -> None:
    # Runs in a forked child: the inherited store must re-initialise the module itself.
    errors, done = _run_threads(store, seed)
    results.put((seed, errors[:5], done, os.getpid()))


def test_threads_in_forked_processes(store: Pkcs11KeyStore) -> None:
    # Warm the parent so the children inherit a live, logged-in connection.
    assert store.prf(KeyRef("psk16"), b"x", 16, Digest.SHA1) == prf(PSK16, b"x", 16)
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(store, seed, results)) for seed in (1, 2)]
    for p in procs:
        p.start()
    # The parent hammers at the same time: its connection must survive the children.
    parent_errors, parent_done = _run_threads(store, 3)
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"child crashed with exit code {p.exitcode}"
    assert parent_errors == []
    assert parent_done == THREADS * ROUNDS
    for seed, errors, done, pid in got:
        assert errors == [], (seed, errors)
        assert done == THREADS * ROUNDS
        assert pid != os.getpid()
    # And the parent still works after the children are gone.
    assert store.hmac(KeyRef("psk32"), b"after", Digest.SHA256) == std_hmac.new(
        PSK32, b"after", "sha256"
    ).digest()


def test_rsa_decryptions_in_one_thread_while_another_computes(store: Pkcs11KeyStore) -> None:
    """The inline server's two token users at once: its token thread decrypting PKEs
    (RSA, the module's own locking: CKF_OS_LOCKING_OK) while the event loop's thread makes
    an exchange's HMAC / PRF / AES-CM calls on other pooled sessions. Every result right."""
    store.generate_rsa("envelope-threads", 2048)
    try:
        public = load_der_public_key(store.public_key_der(KeyRef("envelope-threads")))
        secrets_in = [os.urandom(32) for _ in range(40)]
        sealed = [public.encrypt(s, padding.PKCS1v15()) for s in secrets_in]  # type: ignore[union-attr]
        opened: list[bytes] = []
        failures: list[str] = []

        def decrypt_all() -> None:
            try:
                for ct in sealed:
                    opened.append(store.rsa_decrypt(KeyRef("envelope-threads"), ct,
                                                    RsaPadding.PKCS1V15))
            except Exception as exc:  # reported below
                failures.append(type(exc).__name__)

        token_thread = threading.Thread(target=decrypt_all, name="kms-token-test")
        token_thread.start()
        rounds = 0
        while token_thread.is_alive() or rounds < 50:
            data = rounds.to_bytes(4, "big")
            assert store.hmac(KeyRef("psk32"), data, Digest.SHA256) == std_hmac.new(
                PSK32, data, "sha256").digest()
            assert store.prf(KeyRef("psk16"), data, 16, Digest.SHA1) == prf(PSK16, data, 16)
            iv = bytes(16)
            want = Cipher(algorithms.AES(PSK16), modes.CTR(iv)).encryptor().update(data)
            assert store.aes_cm(PSK16, iv, data) == want
            rounds += 1
        token_thread.join(60)
        assert failures == []
        assert opened == secrets_in
    finally:
        store.delete("envelope-threads")


# --- working copies of long-term secrets (session objects inside the token) -----------------

_DELETE_AND_RECREATE = textwrap.dedent(
    """
    import sys, pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass
    module, label, pin, key_label, hexvalue = sys.argv[1:6]
    tok = pkcs11.lib(module).get_token(token_label=label)
    with tok.open(rw=True, user_pin=pin) as s:
        for o in s.get_objects({Attribute.LABEL: key_label}):
            o.destroy()
        s.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY,
                         Attribute.KEY_TYPE: KeyType.GENERIC_SECRET, Attribute.TOKEN: True,
                         Attribute.LABEL: key_label, Attribute.SIGN: True,
                         Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                         Attribute.VALUE: bytes.fromhex(hexvalue)})
    """
)


def _copies(store: Pkcs11KeyStore, label: str) -> list[Any]:
    conn = store._token._conn
    assert conn is not None
    return [ps.working[label][0] for ps in conn.sessions if label in ps.working]


def test_working_copies_are_sensitive_session_objects(store: Pkcs11KeyStore) -> None:
    from pkcs11 import Attribute
    from pkcs11.exceptions import AttributeSensitive

    for _ in range(8):  # several pooled sessions
        assert store.prf(KeyRef("psk32"), b"lbl", 20, Digest.SHA1) == prf(
            PSK32, b"lbl", 20, Digest.SHA1
        )
    copies = _copies(store, "psk32")
    assert copies
    for obj in copies:
        assert obj[Attribute.TOKEN] is False
        assert obj[Attribute.SENSITIVE] is True
        assert obj[Attribute.EXTRACTABLE] is False
        assert obj[Attribute.LABEL] == ""
        with pytest.raises(AttributeSensitive):
            obj[Attribute.VALUE]
    assert "" not in [k.label for k in store.list_keys()]  # copies are not keys of the store


def test_delete_destroys_working_copies(store: Pkcs11KeyStore) -> None:
    from pkcs11 import Mechanism
    from pkcs11.exceptions import KeyHandleInvalid, ObjectHandleInvalid

    store.import_secret("short-lived", PSK16)
    expected = prf(PSK16, b"x", 16, Digest.SHA1)
    assert store.prf(KeyRef("short-lived"), b"x", 16, Digest.SHA1) == expected
    copies = _copies(store, "short-lived")
    assert copies
    store.delete("short-lived")
    assert _copies(store, "short-lived") == []
    for obj in copies:
        with pytest.raises((ObjectHandleInvalid, KeyHandleInvalid)):
            obj.sign(b"x", mechanism=Mechanism.SHA_1_HMAC)
    with pytest.raises(KeyNotFound):
        store.prf(KeyRef("short-lived"), b"x", 16, Digest.SHA1)


def test_key_replaced_by_another_process_does_not_live_on_in_its_copy(
    store: Pkcs11KeyStore, token: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The KMS never reuses a label, but another tool may: the copy is checked against its
    # stored object (every WORKING_COPY_CHECK_S, 0 here), and a replaced key is picked up.
    import hsm.pkcs11.working as mod

    old, new = os.urandom(32), os.urandom(32)
    store.import_secret("replaced", old)
    ref = KeyRef("replaced")
    assert store.hmac(ref, b"x", Digest.SHA1) == std_hmac.new(old, b"x", "sha1").digest()
    proc = subprocess.run(
        [sys.executable, "-c", _DELETE_AND_RECREATE, token.module, token.label,
         token.user_pin, "replaced", new.hex()],
        env=token.env(), capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    monkeypatch.setattr(mod, "WORKING_COPY_CHECK_S", 0.0)
    seen: list[bytes] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            seen.append(store.hmac(ref, b"x", Digest.SHA1))
        except TokenUnavailable:
            time.sleep(0.2)  # the store reconnects and rescans
            continue
        if seen[-1] == std_hmac.new(new, b"x", "sha1").digest():
            break
    assert seen and seen[-1] == std_hmac.new(new, b"x", "sha1").digest()
    assert std_hmac.new(old, b"x", "sha1").digest() not in seen  # never the replaced key
    store.delete("replaced")


def test_ephemeral_keys_are_sensitive_and_destroyed_after_use(
    store: Pkcs11KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Per-message keys become session objects for one operation: sensitive, non-extractable,
    # and gone afterwards (no session object is left behind by aes_cm / prf / prf_many).
    from pkcs11 import Attribute
    from pkcs11.exceptions import AttributeSensitive

    tok = store._token
    conn = tok._conn
    assert conn is not None
    seen: list[tuple[bool, bool, bool, bool]] = []
    real_destroy = tok.objects.destroy_raw

    def inspecting_destroy(ps: Any, raw: Any, handle: int) -> None:
        # Per-message keys are bare handles (hsm.pkcs11.raw): find the object by handle.
        (obj,) = [o for o in ps.session.get_objects({Attribute.TOKEN: False})
                  if o.wrapper.handle == handle]
        try:
            obj[Attribute.VALUE]
            readable = True
        except AttributeSensitive:
            readable = False
        seen.append((obj[Attribute.TOKEN], obj[Attribute.SENSITIVE],
                     obj[Attribute.EXTRACTABLE], readable))
        real_destroy(ps, raw, handle)

    def session_objects() -> int:
        ps = conn.sessions[0]
        return len(list(ps.session.get_objects({Attribute.TOKEN: False})))

    before = session_objects()
    monkeypatch.setattr(tok.objects, "destroy_raw", inspecting_destroy)
    key, iv = os.urandom(16), os.urandom(16)
    enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    assert store.aes_cm(key, iv, b"m" * 50) == enc.update(b"m" * 50) + enc.finalize()
    assert store.prf(os.urandom(48), b"l", 16, Digest.SHA1)  # two slices
    assert len(store.prf_many(os.urandom(16), [(b"a", 16), (b"b", 16)], Digest.SHA1)) == 2
    assert seen == [(False, True, False, False)] * 4
    assert session_objects() == before


def test_working_copies_are_bounded(store: Pkcs11KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import hsm.pkcs11.working as mod

    monkeypatch.setattr(mod, "MAX_WORKING_COPIES", 3)
    values = {f"bounded-{i}": os.urandom(32) for i in range(6)}
    for label, value in values.items():
        store.import_secret(label, value)
    try:
        for _ in range(3):
            for label, value in values.items():
                assert store.prf(KeyRef(label), b"l", 16, Digest.SHA1) == prf(
                    value, b"l", 16, Digest.SHA1
                )
        conn = store._token._conn
        assert conn is not None
        assert all(len(ps.working) <= 3 for ps in conn.sessions)
    finally:
        for label in values:
            store.delete(label)


def test_rsa_decryption_asks_for_the_gil_back_soon_and_restores_the_interval(
    store: Pkcs11KeyStore,
) -> None:
    """While an RSA decryption is in the token, a thread waiting for the GIL asks for it
    after GIL_BACK_S (the decrypting thread must not wait a whole switch interval behind a
    thread that computes); concurrent decryptions restore the interval when the last one
    leaves, errors included."""
    store.generate_rsa("envelope-boost", 2048)
    before = sys.getswitchinterval()
    try:
        public = load_der_public_key(store.public_key_der(KeyRef("envelope-boost")))
        secret = os.urandom(32)
        ct = public.encrypt(secret, padding.PKCS1v15())  # type: ignore[union-attr]
        with raw.gil_back_soon():
            assert sys.getswitchinterval() == pytest.approx(raw.GIL_BACK_S)
            with raw.gil_back_soon():  # nested
                assert sys.getswitchinterval() == pytest.approx(raw.GIL_BACK_S)
            assert sys.getswitchinterval() == pytest.approx(raw.GIL_BACK_S)
        assert sys.getswitchinterval() == before
        results: list[bytes] = []

        def decrypt() -> None:
            for _ in range(10):
                results.append(store.rsa_decrypt(KeyRef("envelope-boost"), ct,
                                                 RsaPadding.PKCS1V15))

        threads = [threading.Thread(target=decrypt) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [secret] * 30
        assert sys.getswitchinterval() == before
        with pytest.raises(InvalidSealedData):  # a refused decryption restores it too
            store.rsa_decrypt(KeyRef("envelope-boost"), b"\x00" * 256, RsaPadding.PKCS1V15)
        assert sys.getswitchinterval() == before
    finally:
        sys.setswitchinterval(before)
        store.delete("envelope-boost")
