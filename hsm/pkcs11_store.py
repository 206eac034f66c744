"""PKCS#11 key store (work in progress: full implementation follows)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hsm import TokenConfig


class Pkcs11KeyStore:
    """KeyStore over a PKCS#11 token."""

    def __init__(self, config: TokenConfig) -> None:
        raise NotImplementedError("Pkcs11KeyStore is being implemented")
