"""Helpers shared by the PKCS#11 and software key stores (no python-pkcs11 here)."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from kms.keystore import KeyStoreError, SignScheme

MAX_SECRET_BYTES = 32
"""Long-term secrets are <= 256 bits: one PRF in-key slice (RFC 3830 4.1.2 splits longer
in-keys in 256-bit slices, which a token would have to hold as separate objects)."""

MIN_RSA_BITS = 2048

SEALED_DATA_MESSAGE = "decryption failed"
"""The one message of InvalidSealedData from rsa_decrypt: no oracle detail (Bleichenbacher)."""

# Curve names accepted by generate_ec -> canonical name.
CURVE_ALIASES = {
    "secp256r1": "secp256r1",
    "prime256v1": "secp256r1",
    "p-256": "secp256r1",
    "p256": "secp256r1",
    "secp384r1": "secp384r1",
    "p-384": "secp384r1",
    "p384": "secp384r1",
}
CURVE_BITS = {"secp256r1": 256, "secp384r1": 384}


def check_label(label: str) -> None:
    if not isinstance(label, str) or not label:
        raise ValueError("key label must be a non-empty string")
    if len(label.encode("utf-8")) > 255:
        raise ValueError("key label must be at most 255 bytes")


def check_secret_length(length: int) -> None:
    if not 1 <= length <= MAX_SECRET_BYTES:
        raise ValueError(f"secret length must be 1..{MAX_SECRET_BYTES} bytes, got {length}")


def check_rsa_bits(bits: int) -> None:
    if bits < MIN_RSA_BITS or bits % 8:
        raise ValueError(f"RSA modulus must be a multiple of 8 and >= {MIN_RSA_BITS} bits")


def canonical_curve(curve: str) -> str:
    try:
        return CURVE_ALIASES[curve.lower()]
    except KeyError:
        raise ValueError(
            f"unsupported EC curve {curve!r} (supported: secp256r1, secp384r1)"
        ) from None


def check_aes_cm(key: bytes, iv: bytes) -> None:
    if len(key) not in (16, 24, 32):
        raise ValueError("AES-CM key must be 16, 24 or 32 bytes")
    if len(iv) != 16:
        raise ValueError("AES-CM IV must be 16 bytes")


def scheme_hash(scheme: SignScheme) -> hashes.HashAlgorithm:
    if scheme in (
        SignScheme.RSA_PKCS1V15_SHA1,
        SignScheme.RSA_PSS_SHA1,
    ):
        return hashes.SHA1()  # noqa: S303 - SHA-1 only where a MIKEY profile asks for it
    return hashes.SHA256()


def scheme_digest(scheme: SignScheme, data: bytes) -> bytes:
    name = "sha1" if isinstance(scheme_hash(scheme), hashes.SHA1) else "sha256"
    return hashlib.new(name, data).digest()


def raw_ecdsa_to_der(sig: bytes) -> bytes:
    """PKCS#11 CKM_ECDSA returns r || s (each the order length); cryptography uses DER."""
    if len(sig) % 2 or not sig:
        raise KeyStoreError("malformed ECDSA signature from token")
    half = len(sig) // 2
    r = int.from_bytes(sig[:half], "big")
    s = int.from_bytes(sig[half:], "big")
    return encode_dss_signature(r, s)
