"""The HSM boundary: the key-store interfaces every component uses (interfaces only).

Two small interfaces: :class:`KeyOps`, the operations the request path needs (the KMS core,
the MIKEY layer and the endpoint library depend on this one only), and :class:`KeyAdmin`, the
administration the CLI and the KMS home need (create, import, delete, list keys).
:class:`KeyStore` is both plus ``close``: what an implementation provides.

Implementations live in ``hsm/`` (PKCS#11 and software). The KMS core talks to long-term
keys only through :class:`KeyOps`, by :class:`KeyRef`; it never sees their values.
Ephemeral per-message keys (MPK, TGK, derived encr/auth/salt keys) are passed as ``bytes``:
the PKCS#11 implementation turns them into session objects for the operation and destroys
them afterwards, so that PRF, forking and KEMAC wrapping all run on the token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable


class Digest(StrEnum):
    """The hash of an HMAC (RFC 2104) computed by the store; values are hashlib names.

    Which MIKEY PRF uses which digest (RFC 3830 4.1.2: SHA-1; RFC 6043 6.1: SHA-256) is the
    MIKEY layer's business (``kms.mikey.prf.hmac_digest``), not the store's.
    """

    SHA1 = "sha1"
    SHA256 = "sha256"


@dataclass(frozen=True, order=True)
class KeyRef:
    """Names a long-term key object in the key store (its CKA_LABEL in a token)."""

    label: str

    def __str__(self) -> str:
        return self.label


Key = KeyRef | bytes
"""A long-term key by reference, or an ephemeral key's bytes."""


class KeyType(StrEnum):
    """What kind of object a key is."""

    SECRET = "secret"  # noqa: S105 - a key type name. Generic secret used as HMAC / PRF in-key (PSK, TPK, peer PSK)
    AES = "aes"
    RSA = "rsa"  # RSA private key (public half alongside)
    EC = "ec"  # EC private key (public half alongside)


class RsaPadding(StrEnum):
    """RSA encryption of the PKE payload's envelope key (RFC 3830 3.2, 6.4): RSAES-PKCS1-v1_5
    (RFC 3830's mandatory scheme, the default) or RSAES-OAEP with SHA-1 (RFC 8017 7.1)."""

    PKCS1V15 = "pkcs1v15"
    OAEP_SHA1 = "oaep-sha1"


class SignScheme(StrEnum):
    """Signature schemes: the SIGN payload's S type (RFC 3830 6.5: 0 = RSASSA-PKCS1-v1_5,
    1 = RSASSA-PSS) over SHA-256 by default, SHA-1 where a deployment profile asks for it
    (docs/hsm.md); ECDSA for certificates."""

    RSA_PKCS1V15_SHA256 = "rsa-pkcs1v15-sha256"
    RSA_PKCS1V15_SHA1 = "rsa-pkcs1v15-sha1"
    RSA_PSS_SHA256 = "rsa-pss-sha256"
    RSA_PSS_SHA1 = "rsa-pss-sha1"
    ECDSA_SHA256 = "ecdsa-sha256"


@dataclass(frozen=True)
class KeyInfo:
    """What may be said about a key without its value."""

    label: str
    key_type: KeyType
    length_bits: int
    sensitive: bool
    extractable: bool
    always_sensitive: bool = False
    never_extractable: bool = False


class KeyStoreError(Exception):
    """Base of all key-store failures. Messages never contain key material."""


class KeyNotFound(KeyStoreError):
    """No key with that label (toward a peer: treat as an authentication failure)."""


class KeyExists(KeyStoreError):
    """A key with that label already exists."""


class InvalidSealedData(KeyStoreError):
    """Decryption or unwrapping failed (bad ciphertext, wrong key): never retried."""


class TokenUnavailable(KeyStoreError):
    """The token cannot be reached now (transient: the caller may retry later)."""


class UnsupportedOperation(KeyStoreError):
    """The key or token cannot perform the requested operation."""


@runtime_checkable
class KeyOps(Protocol):
    """The request path's cryptographic operations, with keys that never leave the store."""

    def hmac(self, key: Key, data: bytes, func: Digest) -> bytes:
        """HMAC (RFC 2104) of ``data`` under ``key`` with the hash ``func``."""
        ...

    def prf(self, key: Key, label: bytes, out_len: int, func: Digest) -> bytes:
        """The PRF of RFC 3830 4.1.2 built on HMAC with the hash ``func`` (HMAC-SHA-1 for
        MIKEY-1, HMAC-SHA-256 for PRF-HMAC-SHA-256 of RFC 6043 6.1), ``key`` as in-key."""
        ...

    def prf_many(
        self, key: Key, requests: Sequence[tuple[bytes, int]], func: Digest
    ) -> list[bytes]:
        """``[prf(key, label, out_len, func) for label, out_len in requests]`` as one
        operation: one token session, and for a key given by value one set of session
        objects (e.g. the encr/auth/salt keys of a message, or MPKi and MPKr)."""
        ...

    def aes_cm(self, key: bytes, iv: bytes, data: bytes) -> bytes:
        """AES in counter mode (RFC 3711 4.1.1) with the full 16-byte IV as initial block.

        Encryption and decryption are the same operation.
        """
        ...

    def random(self, length: int) -> bytes:
        """``length`` bytes from the store's random generator."""
        ...

    def rsa_decrypt(self, key: KeyRef, data: bytes, padding: RsaPadding) -> bytes:
        """Decrypt with a private RSA key. Any failure raises InvalidSealedData."""
        ...

    def sign(self, key: KeyRef, data: bytes, scheme: SignScheme) -> bytes:
        """Sign ``data`` (the store hashes it as the scheme says)."""
        ...

    def public_key_der(self, key: KeyRef) -> bytes:
        """DER SubjectPublicKeyInfo of an asymmetric key."""
        ...


@runtime_checkable
class KeyAdmin(Protocol):
    """Key administration for the CLI and the KMS home: never on the request path."""

    def generate_secret(self, label: str, length: int) -> KeyInfo:
        """Create a sensitive, non-extractable secret of ``length`` bytes (<= 32)."""
        ...

    def import_secret(self, label: str, value: bytes) -> KeyInfo:
        """Store a given secret (<= 32 bytes) as a sensitive, non-extractable object."""
        ...

    def generate_rsa(self, label: str, bits: int) -> KeyInfo:
        """Create an RSA key pair; the private half is sensitive and non-extractable."""
        ...

    def generate_ec(self, label: str, curve: str) -> KeyInfo:
        """Create an EC key pair (curve name, e.g. "secp256r1")."""
        ...

    def delete(self, label: str) -> None:
        """Destroy every object with this label. KeyNotFound if there is none."""
        ...

    def list_keys(self) -> list[KeyInfo]:
        """All keys, sorted by label; never values."""
        ...

    def key_info(self, label: str) -> KeyInfo:
        """One key's description; KeyNotFound if absent."""
        ...


@runtime_checkable
class KeyStore(KeyOps, KeyAdmin, Protocol):
    """Both interfaces and the store's lifetime: what an implementation in ``hsm/`` provides
    and what the process that opens it (``kms serve``, the admin CLI) holds."""

    def close(self) -> None:
        """Release sessions and the module."""
        ...
