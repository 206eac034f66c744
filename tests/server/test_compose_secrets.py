"""ensure_secret: a KMS-wide token secret (dummy PSK, forking modifier) made at start must be
found by a rescan before the lock is released, so that every worker uses the same one;
SoftHSM 2.6.1 can lose the label of an object created while another process uses the token
(docs/design.md), and the secret is then made again, or start-up fails with a clear error."""

from __future__ import annotations

import contextlib

import pytest

from hsm.software import SoftwareKeyStore
from kms.home import HomeError
from kms.keystore import KeyInfo, KeyRef
from kms.server.compose import SECRET_CREATE_TRIES, ensure_secret


class LosingStore(SoftwareKeyStore):
    """The first ``losses`` creations end up under no usable label, as on a raced token."""

    def __init__(self, losses: int) -> None:
        super().__init__()
        self.losses = losses
        self.created = 0
        self.rescans = 0

    def generate_secret(self, label: str, length: int) -> KeyInfo:
        self.created += 1
        if self.created <= self.losses:
            return super().generate_secret(f"lost/{self.created}", length)
        return super().generate_secret(label, length)

    def refresh(self) -> None:
        self.rescans += 1


def test_a_secret_that_lost_its_label_is_made_again() -> None:
    ks = LosingStore(losses=1)
    assert ensure_secret(ks, "kms/fork-modifier", 32, contextlib.nullcontext) == KeyRef(
        "kms/fork-modifier"
    )
    assert ks.created == 2 and ks.rescans == 3  # before, after each creation
    assert ks.key_info("kms/fork-modifier").length_bits == 256
    # Found at once the next time (another worker): nothing created.
    assert ensure_secret(ks, "kms/fork-modifier", 32, contextlib.nullcontext)
    assert ks.created == 2


def test_start_up_fails_clearly_when_the_label_keeps_getting_lost() -> None:
    ks = LosingStore(losses=SECRET_CREATE_TRIES)
    with pytest.raises(HomeError, match="'authn/dummy' was created but is not found under its "
                       "label"):  # fmt: skip
        ensure_secret(ks, "authn/dummy", 32, contextlib.nullcontext)
    assert ks.created == SECRET_CREATE_TRIES
