"""Composition root: builds the KMS core for a KMS home (the only place that chooses the
key store, registry, replay cache and audit sink implementations)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kms.core.api import KmsHandler
    from kms.server.home import Home


def build_handler(home: Home) -> KmsHandler:
    """The KMS core wired to this home's token, registry and stores."""
    raise NotImplementedError("the KMS core is being written (issue 4)")
