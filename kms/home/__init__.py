"""The KMS home folder: configuration, registry and (by default) the SoftHSM2 token.

``layout``: file names and token labels; ``identity``: identity rules; ``home``: the opened
home and its all-or-nothing registry + token operations; ``init``: ``kms init``.
"""

from __future__ import annotations

from kms.home.errors import HomeError, HomeExists, HomeNotInitialised
from kms.home.home import Home, KeyEntry, open_home
from kms.home.identity import guess_id_type, validate_identity
from kms.home.init import init_home
from kms.home.layout import (
    CERT_FILE,
    DUMMY_PSK_LABEL,
    ENVELOPE_LABEL,
    FORK_MODIFIER_BYTES,
    FORK_MODIFIER_LABEL,
    PIN_FILE,
    PSK_MAX_BYTES,
    PSK_MIN_BYTES,
    SIGNING_CERT_FILE,
    SIGNING_LABEL,
    SOFTHSM_CONF,
    node_label,
    peer_label,
    psk_label,
    tpk_label,
)

__all__ = [
    "CERT_FILE",
    "ENVELOPE_LABEL",
    "FORK_MODIFIER_BYTES",
    "DUMMY_PSK_LABEL",
    "FORK_MODIFIER_LABEL",
    "PIN_FILE",
    "PSK_MAX_BYTES",
    "PSK_MIN_BYTES",
    "SIGNING_CERT_FILE",
    "SIGNING_LABEL",
    "SOFTHSM_CONF",
    "Home",
    "HomeError",
    "HomeExists",
    "HomeNotInitialised",
    "KeyEntry",
    "guess_id_type",
    "init_home",
    "node_label",
    "open_home",
    "peer_label",
    "psk_label",
    "tpk_label",
    "validate_identity",
]
