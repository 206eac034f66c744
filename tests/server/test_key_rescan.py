"""RescanOnFirstMiss: a key the registry names but the handle catalogue lacks is rescanned
for on its first miss, whatever the store's own rate-limited rescan did, and never again
for the same label (a caller cannot make the KMS rescan the token per request). The real
token case is tests/e2e/test_nodes.py (a node's rotated PSK used right after another
miss)."""

from __future__ import annotations

import hmac

import pytest

from hsm.software import SoftwareKeyStore
from kms.keystore import Digest, KeyNotFound, KeyRef
from kms.server.key_rescan import RescanOnFirstMiss


class LateToken(SoftwareKeyStore):
    """A software store standing in for a token whose catalogue only learns of keys made
    by another process (``made_elsewhere``) when ``refresh()`` rescans; its own rescan on a
    miss is always rate-limited away, the case the decorator is for."""

    def __init__(self) -> None:
        super().__init__()
        self.elsewhere: dict[str, bytes] = {}
        self.refreshes = 0

    def made_elsewhere(self, label: str, value: bytes) -> None:
        self.elsewhere[label] = value

    def refresh(self) -> None:
        self.refreshes += 1
        for label, value in self.elsewhere.items():
            self.import_secret(label, value)
        self.elsewhere.clear()


def test_first_miss_of_a_label_rescans_once() -> None:
    token = LateToken()
    ks = RescanOnFirstMiss(token)
    with pytest.raises(KeyNotFound):  # another key's miss just before
        ks.hmac(KeyRef("node/gone"), b"x", Digest.SHA1)
    assert token.refreshes == 1
    value = bytes(range(32))
    token.made_elsewhere("node/new", value)  # `kms node add` while serving
    assert ks.hmac(KeyRef("node/new"), b"x", Digest.SHA1) == hmac.digest(value, b"x", "sha1")
    assert token.refreshes == ks.rescans == 2
    # The same missing label again: no rescan, however often it is named.
    for _ in range(5):
        with pytest.raises(KeyNotFound):
            ks.prf(KeyRef("node/gone"), b"label", 16, Digest.SHA256)
    assert token.refreshes == 2
    # Raw key bytes are never looked up, so never rescanned for.
    assert len(ks.prf(bytes(16), b"label", 16, Digest.SHA256)) == 16
    assert ks.random(8) != ks.random(8) and token.refreshes == 2


def test_other_operations_pass_through() -> None:
    token = LateToken()
    ks = RescanOnFirstMiss(token)
    token.generate_secret("kms/own", 32)
    assert ks.key_info("kms/own").length_bits == 256  # KeyAdmin via __getattr__
    assert len(ks.hmac(KeyRef("kms/own"), b"d", Digest.SHA256)) == 32
    assert token.refreshes == 0
