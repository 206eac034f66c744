"""KEMAC encryption and MACs (RFC 3830 4.2.3 / 4.2.4 / 6.2, RFC 6043 6.2, RFC 3394, RFC 3711 4.1.1).

AES-CM can be delegated to a token through an :data:`AesCmFn` (e.g. ``KeyOps.aes_cm``).
Error messages never contain key material.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from kms.mikey.constants import MAC_LENGTH, EncrAlg, MacAlg

AesCmFn = Callable[[bytes, bytes, bytes], bytes]
"""(key, iv16, data) -> AES-CM keystream XOR data (RFC 3711 4.1.1); its own inverse."""

AES_CM_SALT_LENGTH = 14  # RFC 3830 4.2.3: 112-bit salt_key
AES_KW_IV_LENGTH = 8  # RFC 3394 2.2.3: 64-bit initial value
T64_LENGTH = 8
IV_LENGTH = 16
KW_BLOCK = 8  # RFC 3394: 64-bit semiblocks
KW_DEFAULT_IV = bytes.fromhex("A6A6A6A6A6A6A6A6")  # RFC 3394 2.2.3.1

_AES_CM_KEY_LENGTH = {EncrAlg.AES_CM_128: 16, EncrAlg.AES_CM_256: 32}
_AES_KW_KEY_LENGTH = 16
_MAC_DIGEST = {MacAlg.HMAC_SHA_1_160: "sha1", MacAlg.HMAC_SHA_256_256: "sha256"}


class CryptoError(Exception):
    """Decryption / unwrap / length failures. Messages never contain key material."""


# --- AES-CM (RFC 3830 4.2.3, RFC 3711 4.1.1) ---------------------------------------------


def aes_cm_iv(salt_key: bytes, csb_id: int, t64: bytes) -> bytes:
    """IV = (S XOR (0x0000 || CSB ID || T64)) || 0x0000 (RFC 3830 4.2.3; which T and CSB ID:
    docs/rfc-readings.md R1)."""
    if len(salt_key) != AES_CM_SALT_LENGTH:
        raise ValueError("AES-CM salt_key must be 14 bytes")
    if len(t64) != T64_LENGTH:
        raise ValueError("timestamp must be 8 bytes")
    if not 0 <= csb_id <= 0xFFFF_FFFF:
        raise ValueError("CSB ID must fit in 32 bits")
    mask = int.from_bytes(csb_id.to_bytes(4, "big") + t64, "big")  # 0x0000 || CSB ID || T64
    return (int.from_bytes(salt_key, "big") ^ mask).to_bytes(14, "big") + b"\x00\x00"


def software_aes_cm(key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES-CTR with the 16-byte IV as initial counter block, +1 mod 2^128 (RFC 3711 4.1.1)."""
    if len(key) not in (16, 32):
        raise ValueError("AES-CM key must be 16 or 32 bytes")
    if len(iv) != IV_LENGTH:
        raise ValueError("AES-CM IV must be 16 bytes")
    enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return enc.update(data) + enc.finalize()


# --- AES key wrap (RFC 3394 2.2) -----------------------------------------------------------


def _aes_ecb(key: bytes, decrypt: bool) -> Callable[[bytes], bytes]:
    # RFC 3394 2.2 is defined over the raw AES block function, i.e. single-block ECB.
    cipher = Cipher(algorithms.AES(key), modes.ECB())  # noqa: S305
    ctx = cipher.decryptor() if decrypt else cipher.encryptor()
    return ctx.update


def aes_key_wrap(kek: bytes, iv: bytes, plaintext: bytes) -> bytes:
    """RFC 3394 2.2.1 key wrap with an explicit 64-bit initial value, no padding."""
    if len(iv) != AES_KW_IV_LENGTH:
        raise ValueError("AES-KW IV must be 8 bytes")
    if len(plaintext) % KW_BLOCK or len(plaintext) < 2 * KW_BLOCK:
        raise CryptoError("AES-KW plaintext must be a multiple of 8 bytes and at least 16 bytes")
    encrypt = _aes_ecb(kek, decrypt=False)
    n = len(plaintext) // KW_BLOCK
    a = iv
    r = [plaintext[i * KW_BLOCK : (i + 1) * KW_BLOCK] for i in range(n)]
    for j in range(6):
        for i in range(n):
            b = encrypt(a + r[i])  # B = AES(K, A | R[i])
            t = n * j + i + 1
            a = (int.from_bytes(b[:KW_BLOCK], "big") ^ t).to_bytes(KW_BLOCK, "big")
            r[i] = b[KW_BLOCK:]
    return a + b"".join(r)


def aes_key_unwrap(kek: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    """RFC 3394 2.2.2 key unwrap; raises CryptoError if the integrity check (2.2.3) fails."""
    if len(iv) != AES_KW_IV_LENGTH:
        raise ValueError("AES-KW IV must be 8 bytes")
    if len(ciphertext) % KW_BLOCK or len(ciphertext) < 3 * KW_BLOCK:
        raise CryptoError("AES-KW ciphertext must be a multiple of 8 bytes and at least 24 bytes")
    decrypt = _aes_ecb(kek, decrypt=True)
    n = len(ciphertext) // KW_BLOCK - 1
    a = ciphertext[:KW_BLOCK]
    r = [ciphertext[(i + 1) * KW_BLOCK : (i + 2) * KW_BLOCK] for i in range(n)]
    for j in range(5, -1, -1):
        for i in range(n - 1, -1, -1):
            t = n * j + i + 1
            a_xor_t = (int.from_bytes(a, "big") ^ t).to_bytes(KW_BLOCK, "big")
            b = decrypt(a_xor_t + r[i])  # B = AES-1(K, (A ^ t) | R[i])
            a = b[:KW_BLOCK]
            r[i] = b[KW_BLOCK:]
    if not hmac.compare_digest(a, iv):
        raise CryptoError("AES-KW integrity check failed")
    return b"".join(r)


# --- KEMAC Encr data (RFC 3830 4.2.3, 6.2; RFC 6043 6.2) ----------------------------------


def _check_cm(encr_alg: EncrAlg, encr_key: bytes) -> None:
    if len(encr_key) != _AES_CM_KEY_LENGTH[encr_alg]:
        raise ValueError(f"encr_key has the wrong length for encr alg {int(encr_alg)}")


def _check_kw(encr_key: bytes, salt_key: bytes) -> None:
    if len(encr_key) != _AES_KW_KEY_LENGTH:
        raise ValueError("AES-KW-128 encr_key must be 16 bytes")
    if len(salt_key) != AES_KW_IV_LENGTH:
        raise ValueError("AES-KW-128 salt_key must be 8 bytes")


def encrypt_kemac_data(
    encr_alg: EncrAlg,
    encr_key: bytes,
    salt_key: bytes,
    csb_id: int,
    t64: bytes,
    plaintext: bytes,
    aes_cm: AesCmFn = software_aes_cm,
) -> bytes:
    """Encr data of a KEMAC from its plaintext sub-payload chain (RFC 3830 4.2.3, 6.2).

    NULL: identity. AES-CM-128/256: ``aes_cm`` under the IV of :func:`aes_cm_iv`. AES-KW-128:
    RFC 3394 with salt_key as IV, no padding (docs/rfc-readings.md R6); ``csb_id``/``t64`` unused.
    """
    encr_alg = EncrAlg(encr_alg)
    if encr_alg == EncrAlg.NULL:
        return bytes(plaintext)
    if encr_alg == EncrAlg.AES_KW_128:
        _check_kw(encr_key, salt_key)
        return aes_key_wrap(encr_key, salt_key, plaintext)
    _check_cm(encr_alg, encr_key)
    return aes_cm(encr_key, aes_cm_iv(salt_key, csb_id, t64), plaintext)


def decrypt_kemac_data(
    encr_alg: EncrAlg,
    encr_key: bytes,
    salt_key: bytes,
    csb_id: int,
    t64: bytes,
    ciphertext: bytes,
    aes_cm: AesCmFn = software_aes_cm,
) -> bytes:
    """Plaintext of a KEMAC's Encr data; inverse of :func:`encrypt_kemac_data`.

    AES-KW-128 raises CryptoError on a bad length or a failed integrity check.
    """
    encr_alg = EncrAlg(encr_alg)
    if encr_alg == EncrAlg.NULL:
        return bytes(ciphertext)
    if encr_alg == EncrAlg.AES_KW_128:
        _check_kw(encr_key, salt_key)
        return aes_key_unwrap(encr_key, salt_key, ciphertext)
    _check_cm(encr_alg, encr_key)
    return aes_cm(encr_key, aes_cm_iv(salt_key, csb_id, t64), ciphertext)


# --- MACs (RFC 3830 4.2.4, RFC 6043 6.2) ---------------------------------------------------


def compute_mac(mac_alg: MacAlg, auth_key: bytes, data: bytes) -> bytes:
    """HMAC-SHA-1 (20 bytes) / HMAC-SHA-256 (32 bytes), untruncated; NULL gives b""."""
    mac_alg = MacAlg(mac_alg)
    if mac_alg == MacAlg.NULL:
        return b""
    if not auth_key:
        raise ValueError("auth_key must not be empty")
    return hmac.new(auth_key, data, _MAC_DIGEST[mac_alg]).digest()


def verify_mac(mac_alg: MacAlg, auth_key: bytes, data: bytes, tag: bytes) -> bool:
    """Constant-time check of a KEMAC / V MAC; a tag of the wrong length is False."""
    mac_alg = MacAlg(mac_alg)
    if len(tag) != MAC_LENGTH[mac_alg]:
        return False
    return hmac.compare_digest(compute_mac(mac_alg, auth_key, data), tag)


__all__ = [
    "AES_CM_SALT_LENGTH",
    "AES_KW_IV_LENGTH",
    "KW_DEFAULT_IV",
    "AesCmFn",
    "CryptoError",
    "aes_cm_iv",
    "aes_key_unwrap",
    "aes_key_wrap",
    "compute_mac",
    "decrypt_kemac_data",
    "encrypt_kemac_data",
    "software_aes_cm",
    "verify_mac",
]
