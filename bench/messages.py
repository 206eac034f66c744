"""Pre-generated initial messages (REQUEST_INIT / RESOLVE_INIT, PSK or PK), built with the
endpoint library and the software key store, as real endpoints would build them.

Every message is distinct (fresh RANDR, CSB ID, and for PK a fresh env_key and signature),
so the KMS's replay cache accepts each exactly once. Generation costs client CPU on the same
cores as the server: it is always done before a timed window starts.

Resolve: the Initiator gets one reusable (J = 1) ticket naming the Responder, then for every
message builds a TRANSFER_INIT and the Responder turns it into a RESOLVE_INIT. J = 1 keeps
ticket issuance out of the resolve measurement; the resolve ledger (J = 0 only) is then not
written, which is one SQLite INSERT less than a J = 0 resolve.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization

from bench.world import ALICE, BOB, KMS_ID, PSKS, PkEndpoint
from hsm.software import SoftwareKeyStore
from kms.endpoint.common import Credentials
from kms.endpoint.initiator import DEFAULT_FLAGS, DesiredPolicy, Initiator, TicketGrant
from kms.endpoint.responder import Responder
from kms.endpoint.session import CryptoSession
from kms.mikey.constants import IdType
from kms.mikey.ticket import TpFlag

SESSIONS = (CryptoSession(1, 0x11223344),)


@dataclass(frozen=True)
class Workload:
    """One exchange kind: what to send and how the messages are made (picklable)."""

    exchange: str  # "request" | "resolve" | "echo"
    auth: str = "psk"  # "psk" | "pk"
    fork: bool = False
    kms_cert_der: bytes = field(default=b"", repr=False)
    pk: dict[bytes, PkEndpoint] | None = field(default=None, repr=False)
    grant: TicketGrant | None = field(default=None, repr=False)
    echo_size: int = 200

    @property
    def name(self) -> str:
        if self.exchange == "echo":
            return "echo"
        return f"{self.exchange} {self.auth}{' fork' if self.fork else ''}"

    @property
    def method(self) -> str:
        return "ResolveTicket" if self.exchange == "resolve" else "RequestTicket"

    def desired(self) -> DesiredPolicy:
        flags = DEFAULT_FLAGS | TpFlag.J | (TpFlag.I if self.fork else TpFlag(0))
        return DesiredPolicy(responders=(BOB,), flags=flags)


def _creds(who: bytes) -> Credentials:
    return Credentials(who, PSKS[who], KMS_ID.encode(), IdType.URI)


def _pk_creds(w: Workload, who: bytes) -> Any:
    from kms.endpoint.pk import PkCredentials

    assert w.pk is not None
    ep = w.pk[who]
    key = serialization.load_pem_private_key(ep.key_pem, None)
    return PkCredentials(
        identity=who,
        cert_chain_der=ep.chain_der,
        private_key=key,  # type: ignore[arg-type]
        kms_id=KMS_ID.encode(),
        kms_cert_der=w.kms_cert_der,
    )


def initiator(w: Workload, ks: SoftwareKeyStore) -> Initiator:
    if w.auth == "pk" and w.exchange == "request":
        from kms.endpoint.pk import PkInitiator

        return PkInitiator(_pk_creds(w, ALICE), ks)
    return Initiator(_creds(ALICE), ks)


def responder(w: Workload, ks: SoftwareKeyStore) -> Responder:
    if w.auth == "pk":
        from kms.endpoint.pk import PkResponder

        return PkResponder(_pk_creds(w, BOB), ks)
    return Responder(_creds(BOB), ks)


def obtain_grant(w: Workload, send_request: Callable[[bytes], bytes], now: float) -> TicketGrant:
    """A reusable ticket for ``w`` (PSK Ticket Request by the Initiator)."""
    ks = SoftwareKeyStore()
    ini = Initiator(_creds(ALICE), ks)
    wire, pending = ini.request_ticket(w.desired(), now)
    return ini.accept_ticket(pending, send_request(wire), now)


def generate(w: Workload, count: int, now: float) -> list[bytes]:
    """``count`` distinct initial messages for ``w`` (timestamped ``now``)."""
    ks = SoftwareKeyStore()
    if w.exchange == "echo":
        return [bytes(w.echo_size)] * count
    if w.exchange == "request":
        ini = initiator(w, ks)
        desired = w.desired()
        return [ini.request_ticket(desired, now)[0] for _ in range(count)]
    assert w.grant is not None, "resolve workloads need a grant"
    ini = Initiator(_creds(ALICE), ks)
    res = responder(w, ks)
    out = []
    for _ in range(count):
        ti, _pt = ini.transfer_init(w.grant, now, BOB, SESSIONS)
        out.append(res.receive_transfer_init(ti, now)[0])
    return out


WORKLOADS: tuple[tuple[str, str, bool], ...] = (
    ("request", "psk", False),
    ("request", "psk", True),
    ("request", "pk", False),
    ("request", "pk", True),
    ("resolve", "psk", False),
    ("resolve", "psk", True),
    ("resolve", "pk", False),
    ("resolve", "pk", True),
)
