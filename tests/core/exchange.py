"""What both test worlds share: the identities registered in them and whole exchanges driven
through a KMS from in-process endpoints (Initiator / Responder on the software key store).

:class:`Exchanges` is mixed into the token-free core world (tests/core/world.py) and the
composed world on a SoftHSM2 token (tests/server/world.py); each supplies ``kms`` (anything
with ``request_ticket`` / ``resolve_ticket``), ``now``, ``sw`` and its audit log bytes.
Token-free: the core tests import it.
"""

from __future__ import annotations

import json
from typing import Any

from hsm.software import SoftwareKeyStore
from kms.core.api import KmsReply
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DesiredPolicy, Initiator, PendingTransfer, TicketGrant
from kms.endpoint.responder import ResolvedCall, Responder
from kms.endpoint.session import CryptoSession, SrtpKeys
from kms.mikey.constants import IdType

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


class Exchanges:
    """Endpoints and whole exchanges against ``self.kms`` at ``self.now``."""

    kms: Any
    now: float
    sw: SoftwareKeyStore

    def audit_log_bytes(self) -> bytes:
        raise NotImplementedError

    def creds(self, who: bytes) -> Credentials:
        return Credentials(who, PSKS[who], KMS_ID, IdType.URI)

    def initiator(self, who: bytes = ALICE) -> Initiator:
        return Initiator(self.creds(who), self.sw)

    def responder(self, who: bytes = BOB) -> Responder:
        return Responder(self.creds(who), self.sw)

    def request(self, who: bytes, wire: bytes, now: float | None = None) -> KmsReply:
        reply: KmsReply = self.kms.request_ticket(wire, self.now if now is None else now)
        return reply

    def resolve(self, wire: bytes, now: float | None = None) -> KmsReply:
        reply: KmsReply = self.kms.resolve_ticket(wire, self.now if now is None else now)
        return reply

    def grant(self, desired: DesiredPolicy, who: bytes = ALICE) -> TicketGrant:
        ini = self.initiator(who)
        wire, pending = ini.request_ticket(desired, self.now)
        reply = self.request(who, wire)
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

    def audit(self) -> list[dict[str, object]]:
        """The audit records, parsed from the JSON lines of the audit log."""
        return [json.loads(line) for line in self.audit_log_bytes().splitlines()]
