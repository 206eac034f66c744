"""What a KMS configuration needs from its PKCS#11 module (checked when the token opens).

Names are :class:`hsm.pkcs11.mechanisms.Operation` values; the module's mechanism plan must have a
way for each, or the token is refused at start with one line naming the missing mechanism
(never at the first call that happens to need it).
"""

from __future__ import annotations

from kms.server.config import KmsConfig

# Every KMS: MIKEY's two protection suites (RFC 3830 4.1.4 / RFC 6043 6.1: HMAC-SHA-1 with
# AES-CM-128, PRF-HMAC-SHA-256 with AES-CM-256) may arrive from endpoints whatever [policy]
# prf says for new tickets; random numbers for keys, nonces and RAND; TPK rotation; the KMS's
# RSA keys (init) and its certificates and federation envelopes (PKCS#1 v1.5 with SHA-256).
BASE_OPERATIONS: tuple[str, ...] = (
    "hmac-sha1",
    "hmac-sha256",
    "aes-cm-128",
    "aes-cm-256",
    "random",
    "generate-secret",
    "generate-rsa-2048",
    "sign-rsa-pkcs1v15-sha256",
)

_PKE_DECRYPT = {
    "pkcs1v15": "rsa-decrypt-pkcs1v15",
    "oaep-sha1": "rsa-decrypt-oaep-sha1",
}


def required_operations(config: KmsConfig) -> tuple[str, ...]:
    """The token operations ``config`` will use."""
    # REQUEST_INIT_PK / RESOLVE_INIT_PK (RFC 6043 4.2.1.1, 4.2.3.1) unseal the envelope key in
    # the token with [pk] pke_padding. Required even without [pk] ca_bundle: `kms peer add
    # --cert` enables PK for certificate peers at any time, without touching kms.toml.
    return (*BASE_OPERATIONS, _PKE_DECRYPT[config.pk.pke_padding])


__all__ = ["BASE_OPERATIONS", "required_operations"]
