"""In-memory key store over `cryptography`: same contract as the PKCS#11 store.

For endpoints (which hold their own keys anyway) and fast unit tests. Values live in process
memory, so "sensitive / non-extractable" is a promise of this API (no method returns a
long-term value), not a hardware property.
"""

from __future__ import annotations

import hmac as _hmac
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hsm._common import (
    CURVE_BITS,
    SEALED_DATA_MESSAGE,
    canonical_curve,
    check_aes_cm,
    check_label,
    check_rsa_bits,
    check_secret_length,
    scheme_hash,
)
from kms.keystore import (
    Digest,
    InvalidSealedData,
    Key,
    KeyExists,
    KeyInfo,
    KeyNotFound,
    KeyRef,
    KeyStoreError,
    KeyType,
    RsaPadding,
    SignScheme,
    UnsupportedOperation,
)
from kms.mikey.prf import prf

_PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class _Entry:
    info: KeyInfo
    secret: bytes | None = field(default=None, repr=False)
    private: _PrivateKey | None = field(default=None, repr=False)


class SoftwareKeyStore:
    """Pure-software :class:`kms.keystore.KeyStore`. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, _Entry] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"<SoftwareKeyStore keys={len(self._keys)}>"

    # --- lookup ---------------------------------------------------------------------------
    def _entry(self, label: str) -> _Entry:
        with self._lock:
            if self._closed:
                raise KeyStoreError("key store is closed")
            try:
                return self._keys[label]
            except KeyError:
                raise KeyNotFound(f"no key labelled {label!r}") from None

    def _secret(self, key: Key) -> bytes:
        if isinstance(key, bytes | bytearray):
            return bytes(key)
        entry = self._entry(key.label)
        if entry.secret is None:
            raise UnsupportedOperation(f"key {key.label!r} is not a secret key")
        return entry.secret

    def _private(self, key: KeyRef, kind: type) -> _PrivateKey:
        entry = self._entry(key.label)
        if entry.private is None or not isinstance(entry.private, kind):
            raise UnsupportedOperation(f"key {key.label!r} is not a {kind.__name__}")
        return entry.private

    def _add(self, entry: _Entry) -> KeyInfo:
        with self._lock:
            if self._closed:
                raise KeyStoreError("key store is closed")
            if entry.info.label in self._keys:
                raise KeyExists(f"a key labelled {entry.info.label!r} already exists")
            self._keys[entry.info.label] = entry
        return entry.info

    # --- operations -----------------------------------------------------------------------
    def hmac(self, key: Key, data: bytes, func: Digest) -> bytes:
        return _hmac.new(self._secret(key), data, Digest(func).value).digest()

    def prf(self, key: Key, label: bytes, out_len: int, func: Digest) -> bytes:
        return prf(self._secret(key), label, out_len, Digest(func))

    def prf_many(
        self, key: Key, requests: Sequence[tuple[bytes, int]], func: Digest
    ) -> list[bytes]:
        secret, digest = self._secret(key), Digest(func)
        return [prf(secret, label, n, digest) for label, n in requests]

    def aes_cm(self, key: bytes, iv: bytes, data: bytes) -> bytes:
        check_aes_cm(key, iv)
        # cryptography's CTR increments the whole 128-bit block, exactly AES-CM (RFC 3711).
        enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
        return enc.update(data) + enc.finalize()

    def random(self, length: int) -> bytes:
        if length < 0:
            raise ValueError("random length must be >= 0")
        return secrets.token_bytes(length)

    def rsa_decrypt(self, key: KeyRef, data: bytes, padding: RsaPadding) -> bytes:
        priv = self._private(key, rsa.RSAPrivateKey)
        assert isinstance(priv, rsa.RSAPrivateKey)
        try:
            if padding == RsaPadding.PKCS1V15:
                return _pkcs1v15_decrypt(priv, data)
            if padding == RsaPadding.OAEP_SHA1:
                sha1 = scheme_hash(SignScheme.RSA_PSS_SHA1)
                oaep = asym_padding.OAEP(mgf=asym_padding.MGF1(sha1), algorithm=sha1, label=None)
                return priv.decrypt(data, oaep)
        except (ValueError, InvalidKey, TypeError):
            pass
        raise InvalidSealedData(SEALED_DATA_MESSAGE)

    def sign(self, key: KeyRef, data: bytes, scheme: SignScheme) -> bytes:
        h = scheme_hash(scheme)
        if scheme == SignScheme.ECDSA_SHA256:
            ec_key = self._private(key, ec.EllipticCurvePrivateKey)
            assert isinstance(ec_key, ec.EllipticCurvePrivateKey)
            return ec_key.sign(data, ec.ECDSA(h))
        rsa_key = self._private(key, rsa.RSAPrivateKey)
        assert isinstance(rsa_key, rsa.RSAPrivateKey)
        if scheme in (SignScheme.RSA_PKCS1V15_SHA256, SignScheme.RSA_PKCS1V15_SHA1):
            return rsa_key.sign(data, asym_padding.PKCS1v15(), h)
        # PSS with salt length = hash length: what the token mechanisms are given too.
        pss = asym_padding.PSS(mgf=asym_padding.MGF1(h), salt_length=asym_padding.PSS.DIGEST_LENGTH)
        return rsa_key.sign(data, pss, h)

    def public_key_der(self, key: KeyRef) -> bytes:
        entry = self._entry(key.label)
        if entry.private is None:
            raise UnsupportedOperation(f"key {key.label!r} has no public half")
        return entry.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    # --- management -----------------------------------------------------------------------
    def generate_secret(self, label: str, length: int) -> KeyInfo:
        check_label(label)
        check_secret_length(length)
        info = KeyInfo(label, KeyType.SECRET, length * 8, sensitive=True, extractable=False,
                       always_sensitive=True, never_extractable=True)
        return self._add(_Entry(info, secret=secrets.token_bytes(length)))

    def import_secret(self, label: str, value: bytes) -> KeyInfo:
        check_label(label)
        check_secret_length(len(value))
        # Like a token: an imported value was known outside, so not "always sensitive".
        info = KeyInfo(label, KeyType.SECRET, len(value) * 8, sensitive=True,
                       extractable=False, always_sensitive=False, never_extractable=False)
        return self._add(_Entry(info, secret=bytes(value)))

    def generate_rsa(self, label: str, bits: int) -> KeyInfo:
        check_label(label)
        check_rsa_bits(bits)
        priv = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        info = KeyInfo(label, KeyType.RSA, bits, sensitive=True, extractable=False,
                       always_sensitive=True, never_extractable=True)
        return self._add(_Entry(info, private=priv))

    def generate_ec(self, label: str, curve: str) -> KeyInfo:
        check_label(label)
        name = canonical_curve(curve)
        curve_obj: ec.EllipticCurve = ec.SECP256R1() if name == "secp256r1" else ec.SECP384R1()
        priv = ec.generate_private_key(curve_obj)
        info = KeyInfo(label, KeyType.EC, CURVE_BITS[name], sensitive=True, extractable=False,
                       always_sensitive=True, never_extractable=True)
        return self._add(_Entry(info, private=priv))

    def delete(self, label: str) -> None:
        with self._lock:
            if self._keys.pop(label, None) is None:
                raise KeyNotFound(f"no key labelled {label!r}")

    def list_keys(self) -> list[KeyInfo]:
        with self._lock:
            return [self._keys[k].info for k in sorted(self._keys)]

    def key_info(self, label: str) -> KeyInfo:
        return self._entry(label).info

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._keys.clear()


def _pkcs1v15_decrypt(priv: rsa.RSAPrivateKey, data: bytes) -> bytes:
    """RSAES-PKCS1-v1_5 decryption with explicit rejection (RFC 8017 7.2.2).

    cryptography (OpenSSL >= 3.2) uses implicit rejection: a bad ciphertext "decrypts" to a
    pseudo-random message. PKCS#11 tokens (SoftHSM) reject explicitly, and the contract says
    bad input raises InvalidSealedData, so unpad here. The exponentiation is blinded; the
    padding check runs over the whole block before deciding.
    """
    nums = priv.private_numbers()
    n, e = nums.public_numbers.n, nums.public_numbers.e
    k = (n.bit_length() + 7) // 8
    if len(data) != k:
        raise ValueError("bad ciphertext length")
    c = int.from_bytes(data, "big")
    if c >= n:
        raise ValueError("ciphertext out of range")
    while True:
        r = secrets.randbelow(n - 2) + 2
        try:
            r_inv = pow(r, -1, n)
            break
        except ValueError:  # r shares a factor with n: astronomically unlikely
            continue
    blinded = (c * pow(r, e, n)) % n
    # CRT exponentiation with the private factors.
    m1 = pow(blinded, nums.dmp1, nums.p)
    m2 = pow(blinded, nums.dmq1, nums.q)
    h = (nums.iqmp * (m1 - m2)) % nums.p
    em = ((m2 + h * nums.q) * r_inv % n).to_bytes(k, "big")
    # EM = 0x00 || 0x02 || PS (>= 8 non-zero bytes) || 0x00 || M
    sep = em.find(b"\x00", 2)
    ok = em[0] == 0 and em[1] == 2 and sep >= 10
    if not ok:
        raise ValueError("bad padding")
    return em[sep + 1 :]


__all__ = ["SoftwareKeyStore"]
