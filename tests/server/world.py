"""A real KMS for in-process exchange tests: a KMS home with an embedded SoftHSM2 token,
registered endpoints and a group, the core built by the composition root, and endpoints
(Initiator / Responder) using the software key store.

Each test gets its own home (init takes well under a second), so tests cannot leak state
(replay cache, ledger, rate buckets, TPK versions) into each other.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hsm.software import SoftwareKeyStore
from kms.home import Home, init_home
from kms.mikey.constants import IdType
from kms.server.compose import build_handler
from tests.core.exchange import (  # noqa: F401 (the identities, as the tests import them)
    ALICE,
    BOB,
    CAROL,
    DAVE,
    KMS_ID,
    PSKS,
    TEAM,
    Exchanges,
)


@dataclass
class World(Exchanges):
    home: Home
    kms: object
    now: float
    sw: SoftwareKeyStore = field(default_factory=SoftwareKeyStore)

    def audit_log_bytes(self) -> bytes:
        return (self.home.path / "audit.log").read_bytes()

    def rotate_tpk(self) -> None:
        self.home.rotate_tpk()

    def retire_tpk(self, version: int) -> None:
        self.home.retire_tpk(version)

    def remove_group_members(self, group: bytes, members: list[bytes]) -> None:
        self.home.registry.remove_group_members(group, members)


def make_world(path: Path) -> Iterator[World]:
    home = init_home(path, KMS_ID.decode())
    for ident, psk in PSKS.items():
        home.add_endpoint(ident, IdType.URI, psk)
    home.registry.add_group(TEAM, [BOB, CAROL])
    try:
        yield World(home, build_handler(home), float(int(time.time())))
    finally:
        home.close()
