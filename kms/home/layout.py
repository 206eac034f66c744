"""The KMS home folder's layout: file names and token labels, and the PSK size bounds.

Layout::

    <home>/kms.toml              configuration (written last by init: its presence means
                                 "initialised")
    <home>/registry.sqlite3      endpoints, groups, TPK versions, peers (labels, no secrets)
    <home>/kms-cert.pem          self-signed certificate of the PKE envelope key
    <home>/kms-signing-cert.pem  self-signed certificate of the SIGNkms key
    <home>/token/                embedded SoftHSM2 token (only when init got no --module):
        softhsm2.conf, tokens/, pin (user PIN, 0600), so-pin (SO PIN, 0600)

Token labels (CKA_LABEL) are chosen so that no raw identity ends up in the token: identities
are arbitrary bytes up to 64 KiB, may be personal data, and labels are shown by every
PKCS#11 tool. So:

    psk/<first 32 hex digits of SHA-256(identity)>   endpoint PSK (128-bit prefix)
    peer/<first 32 hex digits of SHA-256(kms id)>    peer-KMS PSK (federation)
    tpk/<version>                                    Ticket Protection Key
    kms/envelope-rsa                                 RSA-2048 PKE envelope key
    kms/signing                                      RSA-2048 SIGNkms key

The registry maps identities to labels (the key_label columns are UNIQUE, so even a prefix
collision could not make two identities share a key). The signing key is RSA, not EC:
MIKEY's SIGN payload only defines RSA (PKCS#1 v1.5 and PSS, RFC 3830 6.5).
"""
from __future__ import annotations

import hashlib
import secrets

TOKEN_DIR = "token"  # noqa: S105 - a folder name, not a password
PIN_FILE = "token/pin"
SO_PIN_FILE = "token/so-pin"
SOFTHSM_CONF = "token/softhsm2.conf"
CERT_FILE = "kms-cert.pem"
SIGNING_CERT_FILE = "kms-signing-cert.pem"
INIT_MARKER = ".kms-init-incomplete"
EMBEDDED_TOKEN_LABEL = "kms"  # noqa: S105 - a token label, not a password

ENVELOPE_LABEL = "kms/envelope-rsa"
SIGNING_LABEL = "kms/signing"
# RANDRkms of key forking is a keyed function of (ticket id, IDRr) under this token secret
# (RFC 6043 5.1.1; kms.core.forking). Created by `kms init`, and by `kms serve` in a home
# made before it existed.
FORK_MODIFIER_LABEL = "kms/fork-modifier"
# The dummy PSK an unknown identity's MAC is checked against (no registration oracle); made
# in the token by `kms serve` on first use.
DUMMY_PSK_LABEL = "authn/dummy"
# The KMS's own token objects, with what `kms keys list` says they are.
KMS_OWN_KEYS = {
    ENVELOPE_LABEL: "KMS envelope key (PKE)",
    SIGNING_LABEL: "KMS signing key (SIGNkms)",
    FORK_MODIFIER_LABEL: "KMS key-forking modifier key (RANDRkms)",
    DUMMY_PSK_LABEL: "KMS dummy PSK (unknown identities' MACs)",
}
FORK_MODIFIER_BYTES = 32
RSA_BITS = 2048
TPK_BYTES = 32
PSK_MIN_BYTES = 16  # RFC 6043 12.1: long-term keys of at least 128 bits
PSK_MAX_BYTES = 32  # one PRF in-key slice; what the token stores



# Token labels of secrets are never reused: each import gets a fresh suffix, and the registry
# row records the label. A process that cached a key under a label (the token store keeps
# working copies in session objects) can then never use it for a different key, even when
# another process removes an endpoint and adds it again with a new PSK. Homes made before
# the suffix keep their labels (the registry holds them).


def _fresh_label(kind: str, identity: bytes) -> str:
    """``<kind>/<identity hash>.<fresh suffix>`` (no raw identity in token labels)."""
    return f"{kind}/{hashlib.sha256(identity).hexdigest()[:32]}.{secrets.token_hex(4)}"


def psk_label(identity: bytes) -> str:
    return _fresh_label("psk", identity)


def peer_label(kms_id: bytes) -> str:
    return _fresh_label("peer", kms_id)


def node_label(identity: bytes) -> str:
    return _fresh_label("node", identity)


def tpk_label(version: int) -> str:
    return f"tpk/{version}"


