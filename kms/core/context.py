"""What every exchange handler needs: the ports, the policy, and per-request state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from kms.core.policy import KmsPolicy
from kms.core.ports import (
    Admission,
    AuditSink,
    Directory,
    PeerResolver,
    QuotaLimiter,
    RateLimiter,
    ReplayCache,
    ResolveLedger,
)
from kms.core.psk_versions import PskVersions
from kms.core.revocation import Revocations
from kms.keystore import Key, KeyRef, KeyStore
from kms.mikey.derive import MessageKeys
from kms.mikey.message import Message
from kms.mikey.protect import Suite
from kms.mikey.ticket import Idr
from kms.mikey.views import RequestInitPk, ResolveInitPk


@dataclass(frozen=True)
class Authenticated:
    """An initial message whose sender the KMS has authenticated.

    ``response_key`` protects the response: the PSK (by reference) or the envelope key.
    """

    identity: Idr
    response_key: Key = field(repr=False)
    suite: Suite
    rand_i: bytes | None
    rand_r: bytes | None
    kms_identity: bytes
    method: str  # "psk", "pk", or "peer" (a peer KMS resolving on behalf of ``identity``)
    peer: bytes | None = None


class PkAuthenticator(Protocol):
    """Authenticates REQUEST_INIT_PK / RESOLVE_INIT_PK (certificate, SIGN, PKE)."""

    def authenticate(
        self, v: RequestInitPk | ResolveInitPk, now: float, role: int
    ) -> Authenticated: ...


@dataclass
class Deps:
    keystore: KeyStore
    directory: Directory
    replay: ReplayCache
    ledger: ResolveLedger
    rate: RateLimiter
    audit: AuditSink
    policy: KmsPolicy
    pk: PkAuthenticator | None = None
    peers: PeerResolver | None = None  # federation: reaching the KMS that issued a ticket
    peer_quota: QuotaLimiter | None = None  # per-peer quotas, keyed by peer KMS id
    # A secret in the key store that no endpoint knows: the MAC of a message from an
    # unregistered identity is verified against it, so that registered and unknown
    # identities cost the same token work and get the same answer (threat model: probing).
    dummy_psk: KeyRef | None = None
    admission: Admission | None = None  # rate + replay in one step (shared stores)
    # Suspended endpoints and revoked tickets (None: nothing is ever revoked).
    revocations: Revocations | None = None
    # Rotated endpoint PSKs, named by IDRpsk (None: every endpoint has its one PSK).
    psk_versions: PskVersions | None = None


@dataclass
class Exchange:
    """Per-request state: filled as the request is processed, read by the error path."""

    msg: Message | None = None
    auth: Authenticated | None = None
    response_keys: MessageKeys | None = field(default=None, repr=False)
    audit: dict[str, object] = field(default_factory=dict)
    correlation_id: str = ""
    hops: int = 0  # how many KMSs this request has already crossed (gRPC metadata)
