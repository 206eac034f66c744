"""The KMS core on its own: :class:`kms.core.service.Kms` wired to the software key store
(hsm/software.py), the in-memory ports (kms/store/memory.py) and a directory held in a dict,
with endpoints (Initiator / Responder) on the same software key store. No token, no files:
a world is built in milliseconds, so every test gets a fresh one.

Exchanges that need the token or a KMS home (rotation through the registry, audit files,
token loss) use the composed world in tests/server/world.py instead.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from hsm.software import SoftwareKeyStore
from kms.core.context import Deps
from kms.core.policy import KmsPolicy
from kms.core.ports import IntermediateNode, PeerKms
from kms.core.service import Kms
from kms.keystore import KeyRef
from kms.store.memory import (
    ListAuditSink,
    MemoryReplayCache,
    MemoryResolveLedger,
    TokenBucketRateLimiter,
)
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

TPK_BYTES = 32
DUMMY_PSK_LABEL = "dummy-psk"
FORK_MODIFIER_LABEL = "fork/modifier"


class MemoryDirectory:
    """The core's Directory port over dicts. TPK ids are the key labels (``tpk/N``), as in
    the registry: IDRpsk of a base ticket names the TPK that protects it (RFC 6043 5.1)."""

    def __init__(self, keystore: SoftwareKeyStore) -> None:
        self.keystore = keystore
        self.psks: dict[bytes, str] = {}
        self.groups: dict[bytes, set[bytes]] = {}
        self.tpks: dict[int, str] = {}  # live versions: version -> key label
        self.current = 0
        self.apps: frozenset[bytes] = frozenset()
        self.peers: dict[bytes, PeerKms] = {}
        self.nodes: dict[bytes, IntermediateNode] = {}

    def add_endpoint(self, identity: bytes, psk: bytes) -> None:
        label = "psk/" + identity.hex()
        self.keystore.import_secret(label, psk)
        self.psks[identity] = label

    def rotate_tpk(self) -> int:
        self.current += 1
        label = f"tpk/{self.current}"
        self.keystore.generate_secret(label, TPK_BYTES)
        self.tpks[self.current] = label
        return self.current

    def psk_for(self, identity: bytes) -> KeyRef | None:
        label = self.psks.get(identity)
        return KeyRef(label) if label is not None else None

    def is_member(self, group: bytes, identity: bytes) -> bool:
        return identity in self.groups.get(group, set())

    def is_known(self, identity: bytes) -> bool:
        return identity in self.psks or identity in self.groups

    def current_tpk(self) -> tuple[bytes, KeyRef]:
        label = self.tpks[self.current]
        return label.encode("ascii"), KeyRef(label)

    def tpk(self, tpk_id: bytes) -> KeyRef | None:
        label = tpk_id.decode("ascii", "replace")
        return KeyRef(label) if label in self.tpks.values() else None

    def applications(self) -> frozenset[bytes]:
        return self.apps

    def peer(self, kms_id: bytes) -> PeerKms | None:
        return self.peers.get(kms_id)

    def node(self, identity: bytes) -> IntermediateNode | None:
        return self.nodes.get(identity)

    def add_node(
        self, identity: bytes, psk: bytes, role: str = "recorder", **scope: tuple[str, ...]
    ) -> None:
        label = "node/" + identity.hex()
        self.keystore.import_secret(label, psk)
        self.nodes[identity] = IntermediateNode(identity, role, KeyRef(label), **scope)


@dataclass
class World(Exchanges):
    directory: MemoryDirectory
    sink: ListAuditSink
    kms: Kms
    now: float
    sw: SoftwareKeyStore = field(default_factory=SoftwareKeyStore)

    def rotate_tpk(self) -> int:
        return self.directory.rotate_tpk()

    def add_current_tpk(self, version: int, value: bytes) -> None:
        """A TPK the KMS shares with someone else (mode 2, RFC 6043 4.1.1), made current."""
        label = f"tpk/{version}"
        self.directory.keystore.import_secret(label, value)
        self.directory.tpks[version] = label
        self.directory.current = version

    def retire_tpk(self, version: int) -> None:
        self.directory.keystore.delete(self.directory.tpks.pop(version))

    def remove_group_members(self, group: bytes, members: list[bytes]) -> None:
        self.directory.groups[group].difference_update(members)

    def audit_log_bytes(self) -> bytes:
        """The audit records as JSON lines, as the KMS's audit log would hold them."""
        return "".join(json.dumps(r, default=str) + "\n" for r in self.sink.records).encode()


def make_world(policy: KmsPolicy | None = None) -> World:
    """A KMS with Alice, Bob, Carol and Dave registered, group TEAM = {Bob, Carol} and one
    TPK, as tests/server/world.py registers them in a home."""
    keystore = SoftwareKeyStore()
    directory = MemoryDirectory(keystore)
    for ident, psk in PSKS.items():
        directory.add_endpoint(ident, psk)
    directory.groups[TEAM] = {BOB, CAROL}
    directory.rotate_tpk()
    keystore.generate_secret(DUMMY_PSK_LABEL, TPK_BYTES)
    keystore.generate_secret(FORK_MODIFIER_LABEL, TPK_BYTES)
    sink = ListAuditSink()
    deps = Deps(
        keystore=keystore,
        directory=directory,
        replay=MemoryReplayCache(),
        ledger=MemoryResolveLedger(),
        rate=TokenBucketRateLimiter(0),
        audit=sink,
        policy=policy or KmsPolicy(kms_id=KMS_ID),
        dummy_psk=KeyRef(DUMMY_PSK_LABEL),
        nodes=directory,
        fork_modifier=KeyRef(FORK_MODIFIER_LABEL),
    )
    return World(directory, sink, Kms(deps), float(int(time.time())))
