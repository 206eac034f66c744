"""A real KMS for in-process exchange tests: a KMS home with an embedded SoftHSM2 token,
registered endpoints and a group, the core built by the composition root, and endpoints
(Initiator / Responder) using the software key store.

Each test gets its own home (init takes well under a second), so tests cannot leak state
(replay cache, ledger, rate buckets, TPK versions) into each other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hsm.software import SoftwareKeyStore
from kms.core.api import KmsReply
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DesiredPolicy, Initiator, PendingTransfer, TicketGrant
from kms.endpoint.responder import ResolvedCall, Responder
from kms.endpoint.session import CryptoSession, SrtpKeys
from kms.home import Home, init_home
from kms.mikey.constants import IdType
from kms.server.compose import build_handler

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


@dataclass
class World:
    home: Home
    kms: object
    now: float
    sw: SoftwareKeyStore = field(default_factory=SoftwareKeyStore)

    def creds(self, who: bytes) -> Credentials:
        return Credentials(who, PSKS[who], KMS_ID, IdType.URI)

    def initiator(self, who: bytes = ALICE) -> Initiator:
        return Initiator(self.creds(who), self.sw)

    def responder(self, who: bytes = BOB) -> Responder:
        return Responder(self.creds(who), self.sw)

    def request(self, who: bytes, wire: bytes, now: float | None = None) -> KmsReply:
        return self.kms.request_ticket(wire, self.now if now is None else now)  # type: ignore[attr-defined,no-any-return]

    def resolve(self, wire: bytes, now: float | None = None) -> KmsReply:
        return self.kms.resolve_ticket(wire, self.now if now is None else now)  # type: ignore[attr-defined,no-any-return]

    def grant(self, desired: DesiredPolicy, who: bytes = ALICE) -> TicketGrant:
        ini = self.initiator(who)
        wire, pending = ini.request_ticket(desired, self.now)
        reply = self.kms.request_ticket(wire, self.now)  # type: ignore[attr-defined]
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
        return (self.home.path / "audit.log").read_bytes()

    def rotate_tpk(self) -> None:
        self.home.rotate_tpk()

    def retire_tpk(self, version: int) -> None:
        self.home.retire_tpk(version)

    def remove_group_members(self, group: bytes, members: list[bytes]) -> None:
        self.home.registry.remove_group_members(group, members)

    def audit(self) -> list[dict[str, object]]:
        path = self.home.path / "audit.log"
        return [json.loads(line) for line in path.read_text().splitlines()]


def make_world(path: Path) -> Iterator[World]:
    home = init_home(path, KMS_ID.decode())
    for ident, psk in PSKS.items():
        home.add_endpoint(ident, IdType.URI, psk)
    home.registry.add_group(TEAM, [BOB, CAROL])
    try:
        yield World(home, build_handler(home), float(int(time.time())))
    finally:
        home.close()
