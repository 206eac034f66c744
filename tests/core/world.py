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
from kms.core.api import KmsReply
from kms.core.context import Deps
from kms.core.policy import KmsPolicy
from kms.core.ports import IntermediateNode, PeerKms
from kms.core.service import Kms
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DesiredPolicy, Initiator, PendingTransfer, TicketGrant
from kms.endpoint.responder import ResolvedCall, Responder
from kms.endpoint.session import CryptoSession, SrtpKeys
from kms.keystore import KeyRef
from kms.mikey.constants import IdType
from kms.store.memory import (
    ListAuditSink,
    MemoryReplayCache,
    MemoryResolveLedger,
    TokenBucketRateLimiter,
)

KMS_ID = b"sip:kms.example.org"
ALICE = b"sip:alice@example.org"
BOB = b"sip:bob@example.org"
CAROL = b"sip:carol@example.org"
DAVE = b"sip:dave@example.org"
TEAM = b"sip:team@example.org"
PSKS = {
    ALICE: bytes.fromhex("a1" * 16),
    BOB: bytes.fromhex("b0b0" * 8),
    CAROL: bytes.fromhex("ca" * 20),
    DAVE: bytes.fromhex("da" * 32),
}
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
class World:
    directory: MemoryDirectory
    sink: ListAuditSink
    kms: Kms
    now: float
    sw: SoftwareKeyStore = field(default_factory=SoftwareKeyStore)

    def creds(self, who: bytes) -> Credentials:
        return Credentials(who, PSKS[who], KMS_ID, IdType.URI)

    def initiator(self, who: bytes = ALICE) -> Initiator:
        return Initiator(self.creds(who), self.sw)

    def responder(self, who: bytes = BOB) -> Responder:
        return Responder(self.creds(who), self.sw)

    def request(self, who: bytes, wire: bytes, now: float | None = None) -> KmsReply:
        return self.kms.request_ticket(wire, self.now if now is None else now)

    def resolve(self, wire: bytes, now: float | None = None) -> KmsReply:
        return self.kms.resolve_ticket(wire, self.now if now is None else now)

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

    def grant(self, desired: DesiredPolicy, who: bytes = ALICE) -> TicketGrant:
        ini = self.initiator(who)
        wire, pending = ini.request_ticket(desired, self.now)
        reply = self.kms.request_ticket(wire, self.now)
        assert reply.ok, reply.audit
        return ini.accept_ticket(pending, reply.data, self.now)

    def call(
        self,
        grant: TicketGrant,
        responder: bytes,
        resolver: bytes | None = None,
        sessions: tuple[CryptoSession, ...] = (CryptoSession(1, 0x11223344),),
        who: bytes = ALICE,
    ) -> tuple[list[SrtpKeys], ResolvedCall, PendingTransfer]:
        """Transfer the ticket to ``responder`` (an identity or group), resolved by
        ``resolver``; returns the Initiator's keys, the Responder's result and state."""
        ini = self.initiator(who)
        ti, pt = ini.transfer_init(grant, self.now, responder, sessions)
        res = self.responder(resolver or responder)
        ri, pr = res.receive_transfer_init(ti, self.now)
        reply = self.resolve(ri)
        assert reply.ok, reply.audit
        call = res.accept_resolve(pr, reply.data, self.now)
        keys = (
            ini.accept_transfer_resp(pt, call.transfer_resp, self.now)
            if call.transfer_resp is not None
            else ini.keys_without_response(pt)
        )
        return keys, call, pt

    def audit_log_bytes(self) -> bytes:
        """The audit records as JSON lines, as the KMS's audit log would hold them."""
        return "".join(json.dumps(r, default=str) + "\n" for r in self.sink.records).encode()

    def audit(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.audit_log_bytes().splitlines()]


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
