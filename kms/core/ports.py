"""The KMS core's ports: what it needs from the world, as small protocols.

Adapters in ``kms.server`` and ``kms.store`` implement them over the registry (SQLite), the
replay cache and the audit log; tests may use the in-memory ones in ``kms.store.memory``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from cryptography import x509

from kms.core.api import Outcome
from kms.keystore import KeyRef


class StoreUnavailable(Exception):
    """A store behind a port (registry, replay cache, resolve ledger) cannot answer now
    (database locked, missing, unreadable). ``what`` is one line without secrets; the core
    refuses the call as UNAVAILABLE and audits it."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class Directory(Protocol):
    """Identities, groups and key names (never key values)."""

    def psk_for(self, identity: bytes) -> KeyRef | None:
        """The PSK shared with an enabled endpoint (or peer KMS), None if there is none."""
        ...

    def is_member(self, group: bytes, identity: bytes) -> bool:
        """Whether ``identity`` is a member of group ``group`` now."""
        ...

    def is_known(self, identity: bytes) -> bool:
        """Whether ``identity`` is a registered endpoint or group."""
        ...

    def current_tpk(self) -> tuple[bytes, KeyRef]:
        """(TPK identifier for IDRpsk, key) of the current TPK version."""
        ...

    def tpk(self, tpk_id: bytes) -> KeyRef | None:
        """The TPK an IDRpsk names, if it is current or still active (not retired)."""
        ...

    def applications(self) -> frozenset[bytes]:
        """Authorised application identities (IDRapp); empty: no restriction."""
        ...

    def peer(self, kms_id: bytes) -> PeerKms | None:
        """A registered peer KMS, None if unknown."""
        ...


@dataclass(frozen=True)
class IntermediateNode:
    """An authorised intermediate node (RFC 6043 11.1: recorder, bridge, transcoder) as the
    core sees it: the PSK it authenticates with (in the token) and its scope, identity
    patterns as for peer trust (``PeerKms.resolve_for``); nothing is in scope by default."""

    identity: bytes
    role: str  # "recorder" | "bridge" | "transcoder"
    psk: KeyRef | None  # None: a certificate node (RESOLVE_INIT_PK)
    initiators: tuple[str, ...] = ()
    responders: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    # A certificate node's pinned signing certificate(s) (DER; `kms node add --cert`).
    signing_certs_der: tuple[bytes, ...] = field(default=(), repr=False)


class Nodes(Protocol):
    """The registered intermediate nodes."""

    def node(self, identity: bytes) -> IntermediateNode | None:
        """The node named ``identity`` (its IDRpsk), None if there is none (never was, or
        removed: refused at once)."""
        ...


class ReplayCacheFull(Exception):
    """The replay cache holds its capacity of live digests (still inside the window): a new
    message cannot be remembered, so it must be refused. A live digest is never dropped to
    make room, because that would let a replay of it through (RFC 3830 5.4)."""


class ReplayCache(Protocol):
    """Remembers authenticated initial messages inside the timestamp window."""

    def check_and_store(self, digest: bytes, expires_at: float, now: float) -> bool:
        """Store ``digest``; return False if it was already there (a replay). Raise
        :class:`ReplayCacheFull` when it cannot be stored without forgetting a live one."""
        ...


class ResolveLedger(Protocol):
    """Which responder resolved which non-reusable ticket (J = 0)."""

    def first_resolve(self, ticket_id: bytes, responder: bytes, expires_at: float) -> bool:
        """Record the resolve; return False if this responder already resolved it."""
        ...


class RateLimiter(Protocol):
    def allow(self, identity: bytes, now: float) -> bool: ...


class QuotaLimiter(Protocol):
    """Rate limits whose rate is given per call (per-peer quotas from the registry)."""

    def allow(self, key: bytes, rate: float, now: float) -> bool: ...


class Admission(Protocol):
    """The rate limit and the replay cache in one step (a shared store answers both in one
    round trip). Same meaning as ``RateLimiter.allow`` then, if allowed,
    ``ReplayCache.check_and_store``."""

    def admit(
        self, identity: bytes, digest: bytes, expires_at: float, now: float
    ) -> tuple[bool, bool]:
        """(within the rate limit, first copy of the message); the message is only recorded
        when within the rate limit."""
        ...


class AuditSink(Protocol):
    def emit(self, record: Mapping[str, object]) -> None:
        """Write one structured audit record (never key material)."""
        ...


@dataclass(frozen=True)
class PeerKms:
    """A peer KMS (RFC 6043 9) as the core sees it: how to authenticate it, what it may do."""

    kms_id: bytes
    psk: KeyRef | None  # key shared with the peer, in the token (None: certificate peer)
    resolve_for: tuple[str, ...] = ()  # identity patterns it may resolve for (issuing side)
    rate_per_s: float = 0.0  # resolves per second it may ask of us (0: unlimited)
    deadline_s: float = 2.0  # how long we wait for it
    kms_id_type: int = 1  # URI
    # The version of the shared key ``psk`` is: this KMS sends with it, IDRpsk naming it
    # (RFC 6043 4.2.3, kms.core.psk_versions); it accepts every live version from the peer.
    psk_version: int = 1
    # Certificate peers (psk None; RESOLVE_INIT_PK between KMSs), from `peer add --cert`:
    # the peer's envelope certificate (DER: we encrypt env_key to it, CHASH names it) and its
    # signing certificate(s) (DER, pinned: the CERT of its RESOLVE_INIT_PK must be one).
    envelope_cert_der: bytes | None = field(default=None, repr=False)
    signing_certs_der: tuple[bytes, ...] = field(default=(), repr=False)
    # What this KMS signs its own RESOLVE_INIT_PK to the peer with: its signing key in the
    # token and that key's certificate (sent as CERT). None: we cannot reach it by PK.
    local_signing_key: KeyRef | None = None
    local_signing_cert_der: bytes | None = field(default=None, repr=False)


class PeerFailure(StrEnum):
    """How a forwarded resolve failed."""

    UNAVAILABLE = "unavailable"  # the peer is down, slow or unreachable
    REFUSED = "refused"  # the peer answered with a refusal
    INVALID = "invalid"  # its answer did not verify


class PeerError(Exception):
    """A forwarded resolve failed. ``kind``: see :class:`PeerFailure`. ``status``: the
    transport's name for a refusal (one word, for the audit reason); ``outcome``: what the
    adapter maps that refusal to (None: the Responder is told the issuing KMS is
    unavailable); ``error_message``: the peer's MIKEY error message, if it sent one."""

    def __init__(
        self,
        kind: str,
        detail: str,
        status: str = "",
        error_message: bytes | None = None,
        outcome: Outcome | None = None,
    ) -> None:
        super().__init__(detail)
        self.kind = PeerFailure(kind)
        self.detail = detail
        self.status = status
        self.error_message = error_message
        self.outcome = outcome


class PeerResolver(Protocol):
    """Sends a RESOLVE_INIT to the KMS that issued a ticket and returns its RESOLVE_RESP.

    The core never calls it: it returns a :class:`kms.core.api.PeerCall` and the adapter
    (``kms.server``) makes the call and hands the answer back."""

    def forward_resolve(
        self,
        peer: PeerKms,
        wire: bytes,
        *,
        correlation_id: str,
        hops: int,
        rebuild: Callable[[], bytes] | None = None,
    ) -> bytes:
        """Raise PeerError on failure; never hang past ``peer.deadline_s`` (retries included).

        ``rebuild``: makes a fresh message for a retry (a peer that is a cluster may have
        accepted the first one on a replica that then failed; the same bytes would be
        refused as a replay, RFC 3830 5.4). The answer returned is always to the message
        built last."""
        ...


class Revocation(StrEnum):
    """What a revocation source says about a certificate."""

    GOOD = "good"  # not revoked, or no CRL is configured for its issuer
    REVOKED = "revoked"
    UNKNOWN = "unknown"  # a CRL for its issuer is configured but expired or unusable


class RevocationChecker(Protocol):
    """Is a certificate revoked (RFC 5280 6.3)? Implemented over CRL files by
    :class:`kms.server.crl.CrlStore`; the core refuses REVOKED and UNKNOWN (fail closed)."""

    def check(
        self, cert: x509.Certificate, issuers: Sequence[x509.Certificate], now: float
    ) -> tuple[Revocation, str]:
        """``issuers``: certificates that may have issued ``cert`` (their keys verify the
        CRL). Returns the status and a one-line reason for the audit log."""
        ...
