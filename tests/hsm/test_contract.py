"""One key-store contract, run against the PKCS#11 store (real SoftHSM2 token) and the
software store. Expected values come from independent code: kms.mikey.prf (hashlib HMAC),
the stdlib hmac module and `cryptography`.
"""

from __future__ import annotations

import contextlib
import hmac as std_hmac
import itertools
import os
from collections.abc import Callable, Iterator
from typing import cast

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hsm import open_keystore
from hsm.pkcs11.mechanisms import Operation
from hsm.software import SoftwareKeyStore
from kms.keystore import (
    Digest,
    InvalidSealedData,
    KeyAdmin,
    KeyExists,
    KeyNotFound,
    KeyOps,
    KeyRef,
    KeyStore,
    KeyStoreError,
    KeyType,
    RsaPadding,
    SignScheme,
    UnsupportedOperation,
)
from kms.mikey.constants import EncrAlg
from kms.mikey.derive import derive_exchange_keys
from kms.mikey.prf import PrfFunc, digest_name, prf, software_prf
from kms.mikey.protect import keyed_prf, suite_for
from tests.hsm.conftest import token_on

_labels = itertools.count()


def fresh(prefix: str = "k") -> str:
    return f"{prefix}-{next(_labels)}"


@pytest.fixture(scope="module", params=["softhsm2", "opencryptoki", "software"])
def store(request: pytest.FixtureRequest) -> Iterator[KeyStore]:
    ks: KeyStore
    if request.param == "software":
        ks = SoftwareKeyStore()
    else:
        ks = open_keystore(token_on(request.param, request, "contract").config())
    # Asymmetric keys are slow to make: once per store.
    ks.generate_rsa("kms-rsa", 2048)
    if has_ec(ks):
        ks.generate_ec("kms-ec", "secp256r1")
    yield ks
    with contextlib.suppress(KeyStoreError):  # the openCryptoki token is shared per session
        ks.delete("kms-rsa")
        if has_ec(ks):
            ks.delete("kms-ec")
    ks.close()


def has_ec(store: KeyStore) -> bool:
    """EC keys are optional: openCryptoki's soft token (3.8) has no EC mechanisms at all, and
    the KMS needs none; the tests then check that EC is refused cleanly instead."""
    plan = getattr(store, "mechanisms", None)
    return plan is None or bool(plan.has(Operation.GENERATE_EC))


def test_without_ec_generate_ec_is_refused_naming_the_mechanism(store: KeyStore) -> None:
    if has_ec(store):
        info = store.generate_ec(fresh("ec"), "P-256")
        assert info.key_type == KeyType.EC
        store.delete(info.label)
        return
    with pytest.raises(UnsupportedOperation, match="CKM_EC_KEY_PAIR_GEN"):
        store.generate_ec(fresh("ec"), "P-256")


def test_is_a_keystore(store: KeyStore) -> None:
    assert isinstance(store, KeyStore)
    assert isinstance(store, KeyOps) and isinstance(store, KeyAdmin)
    # The request path's interface holds no administration (the split of kms.keystore).
    assert not {"generate_secret", "import_secret", "delete", "list_keys"} & set(dir(KeyOps))
    assert not {"hmac", "prf", "sign", "rsa_decrypt"} & set(dir(KeyAdmin))


# --- HMAC / PRF with long-term keys ---------------------------------------------------------


@pytest.mark.parametrize("key_len", [16, 20, 32])
def test_long_term_hmac_and_prf_equal_software(store: KeyStore, key_len: int) -> None:
    value = os.urandom(key_len)
    label = fresh("psk")
    info = store.import_secret(label, value)
    assert info.length_bits == key_len * 8  # the TRUE length, not the padded one
    ref = KeyRef(label)
    for func in Digest:
        for data in (b"", b"x", os.urandom(100)):
            assert store.hmac(ref, data, func) == std_hmac.new(
                value, data, digest_name(func)
            ).digest()
        for out_len in (14, 16, 20, 32, 48):
            lbl = os.urandom(27)
            assert store.prf(ref, lbl, out_len, func) == prf(value, lbl, out_len, func)


def test_generated_secret_is_usable(store: KeyStore) -> None:
    for length in (16, 32):
        label = fresh("gen")
        info = store.generate_secret(label, length)
        assert info.length_bits == length * 8
        assert info.key_type == KeyType.SECRET
        a = store.prf(KeyRef(label), b"label", 32, Digest.SHA256)
        assert a == store.prf(KeyRef(label), b"label", 32, Digest.SHA256)
        assert len(a) == 32


def test_hash_is_named_by_the_boundary_digest(store: KeyStore) -> None:
    # The store is told the HMAC hash (Digest); which MIKEY PRF func uses which hash is the
    # MIKEY layer's mapping (kms.mikey.prf.hmac_digest). A PRF func number is refused.
    key = os.urandom(16)
    assert store.hmac(key, b"d", Digest.SHA256) == std_hmac.new(key, b"d", "sha256").digest()
    assert store.prf(key, b"l", 20, Digest.SHA1) == prf(key, b"l", 20, PrfFunc.MIKEY_1)
    not_a_digest = cast(Digest, PrfFunc.MIKEY_1)
    with pytest.raises(ValueError, match="Digest"):
        store.hmac(key, b"d", not_a_digest)
    with pytest.raises(ValueError, match="Digest"):
        store.prf_many(key, [(b"l", 16)], not_a_digest)


# --- HMAC / PRF with ephemeral keys ---------------------------------------------------------


@pytest.mark.parametrize("key_len", [0, 16, 20, 32, 48, 70])
def test_ephemeral_hmac_equals_software(store: KeyStore, key_len: int) -> None:
    key = os.urandom(key_len)
    for func in Digest:
        data = os.urandom(60)
        assert store.hmac(key, data, func) == std_hmac.new(key, data, digest_name(func)).digest()


@pytest.mark.parametrize("key_len", [16, 20, 32, 48, 64, 80])
@pytest.mark.parametrize("func", list(Digest))
def test_ephemeral_prf_equals_software(store: KeyStore, key_len: int, func: Digest) -> None:
    key = os.urandom(key_len)  # 48 / 64 / 80 bytes: two or three 256-bit slices
    for out_len in (14, 16, 20, 32, 48):
        lbl = os.urandom(31)
        assert store.prf(key, lbl, out_len, func) == prf(key, lbl, out_len, func)


@pytest.mark.parametrize("func", list(Digest))
@pytest.mark.parametrize("key_len", [16, 32, 48])
def test_prf_many_equals_one_at_a_time(store: KeyStore, func: Digest, key_len: int) -> None:
    value = os.urandom(key_len)
    requests = [(os.urandom(43), n) for n in (16, 20, 14, 48)]
    expected = [prf(value, lbl, n, func) for lbl, n in requests]
    assert store.prf_many(value, requests, func) == expected  # ephemeral in-key
    if key_len <= 32:  # a long-term key is one PRF slice at most
        label = fresh("many")
        store.import_secret(label, value)
        assert store.prf_many(KeyRef(label), requests, func) == expected
        assert store.prf_many(KeyRef(label), [], func) == []
        store.delete(label)
        with pytest.raises(KeyNotFound):
            store.prf_many(KeyRef(label), requests, func)


def test_prf_rejects_bad_arguments(store: KeyStore) -> None:
    with pytest.raises(ValueError, match="positive"):
        store.prf_many(os.urandom(16), [(b"l", 16), (b"m", 0)], Digest.SHA1)
    with pytest.raises(ValueError, match="empty"):
        store.prf(b"", b"l", 16, Digest.SHA1)
    with pytest.raises(ValueError, match="positive"):
        store.prf(os.urandom(16), b"l", 0, Digest.SHA1)


# --- AES-CM ---------------------------------------------------------------------------------


def _ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return enc.update(data) + enc.finalize()


@pytest.mark.parametrize(
    "iv",
    [
        bytes(16),
        bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"),  # low byte wraps in block 2
        os.urandom(14) + b"\xff\xfe",  # low 16 bits wrap after 2 blocks
        os.urandom(8) + b"\xff" * 8,  # carry into the upper 64 bits
        b"\xff" * 15 + b"\xfd",  # the full 128-bit counter wraps (mod 2^128)
        b"\xff" * 16,
    ],
    ids=["zero", "f0ff", "low16-wrap", "low64-wrap", "wrap128-3", "wrap128-1"],
)
@pytest.mark.parametrize("key_len", [16, 32])
def test_aes_cm_equals_cryptography(store: KeyStore, iv: bytes, key_len: int) -> None:
    key = os.urandom(key_len)
    for n in (1, 16, 47, 100):  # 47 and 100 bytes: more than two blocks, partial last block
        data = os.urandom(n)
        out = store.aes_cm(key, iv, data)
        assert out == _ctr(key, iv, data)
        assert store.aes_cm(key, iv, out) == data
    assert store.aes_cm(key, iv, b"") == b""


def test_aes_cm_rejects_bad_sizes(store: KeyStore) -> None:
    with pytest.raises(ValueError, match="IV"):
        store.aes_cm(os.urandom(16), os.urandom(12), b"x")
    with pytest.raises(ValueError, match="key"):
        store.aes_cm(os.urandom(15), os.urandom(16), b"x")


def test_random(store: KeyStore) -> None:
    assert store.random(0) == b""
    a, b = store.random(32), store.random(32)
    assert len(a) == 32
    assert a != b


# --- RSA / EC -------------------------------------------------------------------------------


def _rsa_pub(store: KeyStore) -> rsa.RSAPublicKey:
    pub = serialization.load_der_public_key(store.public_key_der(KeyRef("kms-rsa")))
    assert isinstance(pub, rsa.RSAPublicKey)
    return pub


@pytest.mark.parametrize("pad", list(RsaPadding))
def test_rsa_decrypt_round_trip(store: KeyStore, pad: RsaPadding) -> None:
    pub = _rsa_pub(store)
    assert pub.key_size == 2048
    msg = os.urandom(48)
    if pad == RsaPadding.PKCS1V15:
        ct = pub.encrypt(msg, padding.PKCS1v15())
    else:
        ct = pub.encrypt(
            msg, padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
        )
    assert store.rsa_decrypt(KeyRef("kms-rsa"), ct, pad) == msg


@pytest.mark.parametrize("pad", list(RsaPadding))
def test_rsa_decrypt_garbage_is_invalid_sealed_data(store: KeyStore, pad: RsaPadding) -> None:
    messages = set()
    for bad in (os.urandom(256), b"\x00" * 256, b"short", b""):
        with pytest.raises(InvalidSealedData) as ei:
            store.rsa_decrypt(KeyRef("kms-rsa"), bad, pad)
        messages.add(str(ei.value))
    assert len(messages) == 1  # one fixed message: no oracle


def test_rsa_decrypt_with_wrong_padding_fails_cleanly(store: KeyStore) -> None:
    ct = _rsa_pub(store).encrypt(b"secret", padding.PKCS1v15())
    with pytest.raises(InvalidSealedData):
        store.rsa_decrypt(KeyRef("kms-rsa"), ct, RsaPadding.OAEP_SHA1)


@pytest.mark.parametrize("scheme", list(SignScheme))
def test_sign_verifies_with_cryptography(store: KeyStore, scheme: SignScheme) -> None:
    data = os.urandom(77)
    label = "kms-ec" if scheme == SignScheme.ECDSA_SHA256 else "kms-rsa"
    if label == "kms-ec" and not has_ec(store):
        with pytest.raises(KeyNotFound):  # no EC key could be made on this module
            store.sign(KeyRef(label), data, scheme)
        return
    sig = store.sign(KeyRef(label), data, scheme)
    pub = serialization.load_der_public_key(store.public_key_der(KeyRef(label)))
    h: hashes.HashAlgorithm = hashes.SHA1() if scheme.name.endswith("SHA1") else hashes.SHA256()
    if scheme == SignScheme.ECDSA_SHA256:
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        pub.verify(sig, data, ec.ECDSA(hashes.SHA256()))  # DER, as cryptography produces
    elif scheme in (SignScheme.RSA_PKCS1V15_SHA256, SignScheme.RSA_PKCS1V15_SHA1):
        assert isinstance(pub, rsa.RSAPublicKey)
        pub.verify(sig, data, padding.PKCS1v15(), h)
    else:
        assert isinstance(pub, rsa.RSAPublicKey)
        pub.verify(
            sig, data, padding.PSS(mgf=padding.MGF1(h), salt_length=padding.PSS.DIGEST_LENGTH), h
        )


def test_key_type_misuse(store: KeyStore) -> None:
    with pytest.raises(UnsupportedOperation):
        store.hmac(KeyRef("kms-rsa"), b"x", Digest.SHA1)
    if has_ec(store):
        with pytest.raises(UnsupportedOperation):
            store.sign(KeyRef("kms-ec"), b"x", SignScheme.RSA_PKCS1V15_SHA256)
    with pytest.raises(UnsupportedOperation):
        store.sign(KeyRef("kms-rsa"), b"x", SignScheme.ECDSA_SHA256)
    label = fresh("sec")
    store.import_secret(label, os.urandom(16))
    with pytest.raises(UnsupportedOperation):
        store.public_key_der(KeyRef(label))


# --- management -----------------------------------------------------------------------------


def test_generate_import_list_delete(store: KeyStore) -> None:
    a, b, c = fresh("a"), fresh("b"), fresh("c")
    ec_ok = has_ec(store)
    store.generate_secret(a, 20)
    store.import_secret(b, os.urandom(32))
    if ec_ok:
        store.generate_ec(c, "P-256")
    else:
        store.generate_rsa(c, 2048)
    labels = [k.label for k in store.list_keys()]
    assert labels == sorted(labels)
    assert {a, b, c, "kms-rsa"} <= set(labels)
    info = {k.label: k for k in store.list_keys()}
    assert info[a].key_type == KeyType.SECRET
    assert info[a].length_bits == 160
    assert info[b].length_bits == 256
    assert info[c].key_type == (KeyType.EC if ec_ok else KeyType.RSA)
    assert info[c].length_bits == (256 if ec_ok else 2048)
    assert info["kms-rsa"].key_type == KeyType.RSA
    assert info["kms-rsa"].length_bits == 2048
    assert store.key_info(a) == info[a]
    for k in info.values():  # long-term keys are sensitive and never extractable
        assert k.sensitive
        assert not k.extractable
    for label in (a, b, c):
        store.delete(label)
        with pytest.raises(KeyNotFound):
            store.key_info(label)
    assert not {a, b, c} & {k.label for k in store.list_keys()}
    # The label can be reused after delete.
    store.import_secret(a, b"\x01" * 16)
    assert store.hmac(KeyRef(a), b"d", Digest.SHA1) == std_hmac.new(
        b"\x01" * 16, b"d", "sha1"
    ).digest()
    store.delete(a)


def test_generated_keys_never_left_the_store(store: KeyStore) -> None:
    for label in ("kms-rsa", "kms-ec") if has_ec(store) else ("kms-rsa",):
        info = store.key_info(label)
        assert info.sensitive
        assert not info.extractable
        assert info.always_sensitive
        assert info.never_extractable
    label = fresh("g32")
    info = store.generate_secret(label, 32)
    assert info.always_sensitive
    assert info.never_extractable


def test_duplicate_label_is_key_exists(store: KeyStore) -> None:
    label = fresh("dup")
    store.import_secret(label, os.urandom(16))
    with pytest.raises(KeyExists):
        store.import_secret(label, os.urandom(16))
    with pytest.raises(KeyExists):
        store.generate_secret(label, 16)
    with pytest.raises(KeyExists):  # the label is checked first, on every module
        store.generate_ec(label, "secp256r1")
    with pytest.raises(KeyExists):
        store.generate_rsa("kms-rsa", 2048)


def test_unknown_label_is_key_not_found(store: KeyStore) -> None:
    ref = KeyRef("no-such-key")
    calls: list[Callable[[], object]] = [
        lambda: store.hmac(ref, b"x", Digest.SHA1),
        lambda: store.prf(ref, b"x", 16, Digest.SHA1),
        lambda: store.rsa_decrypt(ref, b"x" * 256, RsaPadding.PKCS1V15),
        lambda: store.sign(ref, b"x", SignScheme.ECDSA_SHA256),
        lambda: store.public_key_der(ref),
        lambda: store.key_info("no-such-key"),
        lambda: store.delete("no-such-key"),
    ]
    for call in calls:
        with pytest.raises(KeyNotFound):
            call()


@pytest.mark.parametrize("length", [0, 33, 64])
def test_secret_length_limits(store: KeyStore, length: int) -> None:
    with pytest.raises((ValueError, KeyStoreError)):
        store.import_secret(fresh("long"), os.urandom(length))
    with pytest.raises((ValueError, KeyStoreError)):
        store.generate_secret(fresh("long"), length)


def test_bad_curve_and_rsa_size(store: KeyStore) -> None:
    with pytest.raises(ValueError, match="curve"):
        store.generate_ec(fresh("ec"), "secp999k1")
    with pytest.raises(ValueError, match="RSA"):
        store.generate_rsa(fresh("rsa"), 1024)


def test_reprs_and_errors_carry_no_key_material(store: KeyStore) -> None:
    value = bytes(range(100, 132))
    label = fresh("quiet")
    store.import_secret(label, value)
    for text in (repr(store), str(store.key_info(label)), repr(store.list_keys())):
        assert value.hex() not in text
        assert repr(value) not in text
    with pytest.raises(InvalidSealedData) as ei:
        store.rsa_decrypt(KeyRef("kms-rsa"), value * 8, RsaPadding.PKCS1V15)
    assert value.hex() not in str(ei.value)


@pytest.mark.parametrize("prf_func", list(PrfFunc))
def test_an_exchanges_psk_keys_in_one_operation(store: KeyStore, prf_func: PrfFunc) -> None:
    """The 0x01 and 0x02 message keys of an exchange (RFC 6043 5.1.2) from a long-term PSK
    in one prf_many: the same keys as in host memory, one key-store operation."""
    value = os.urandom(16)
    label = fresh("xchg")
    store.import_secret(label, value)
    suite = suite_for(prf_func)
    mac_only = (EncrAlg.NULL, suite.mac_alg)
    full = (suite.encr_alg, suite.mac_alg)
    rand_i = os.urandom(16)
    calls: list[int] = []

    class Counted:
        def __getattr__(self, name: str) -> object:
            return getattr(store, name)

        def prf_many(self, key: object, requests: list[tuple[bytes, int]], func: Digest
                     ) -> list[bytes]:
            calls.append(len(requests))
            return store.prf_many(key, requests, func)  # type: ignore[arg-type]

    got = derive_exchange_keys(
        keyed_prf(cast(KeyStore, Counted()), KeyRef(label), prf_func),
        0x0BADCAFE, rand_i, None, mac_only, full,
    )
    want = derive_exchange_keys(
        software_prf(value, prf_func), 0x0BADCAFE, rand_i, None, mac_only, full
    )
    assert got == want and calls == [4]
    assert got[1].encr_key and got[1].salt_key and not got[0].encr_key
    store.delete(label)
