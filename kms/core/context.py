"""What every exchange handler needs: the ports, the policy, the call's context; and what
it returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from kms.core.policy import KmsPolicy
from kms.core.ports import (
    Admission,
    AuditSink,
    Directory,
    Nodes,
    QuotaLimiter,
    RateLimiter,
    ReplayCache,
    ResolveLedger,
)
from kms.core.psk_versions import PskVersions
from kms.core.revocation import Revocations
from kms.core.steps import CallCancelled, Steps
from kms.keystore import Key, KeyOps, KeyRef
from kms.mikey.derive import KeyDirection, MessageKeys
from kms.mikey.message import Message
from kms.mikey.protect import Suite, message_keys
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
    # The response's message keys (0x02, RFC 6043 5.1.2) when they were derived together
    # with the initial message's, in the same key-store operation (None: derive them from
    # ``response_key`` when needed).
    response_keys: MessageKeys | None = field(default=None, repr=False)
    # The initial message's encr/auth/salt keys (0x01) when derived in full (a desired
    # KEMAC with Initiator-supplied keys, RFC 6043 4.2.1.1); None otherwise.
    initial_keys: MessageKeys | None = field(default=None, repr=False)
    # An intermediate node's registered role (RFC 6043 11.1), for the audit of a refusal
    # after it authenticated; None for every other sender.
    node_role: str | None = None

    def keys_for_response(self, ks: KeyOps, msg: Message) -> MessageKeys:
        """The response's message keys: the ones derived at authentication, else derived
        now from ``response_key`` (RFC 6043 5.1.2, 0x02 label with the initial RANDs)."""
        if self.response_keys is not None:
            return self.response_keys
        return message_keys(
            ks, self.response_key, msg, KeyDirection.RESPONSE, self.rand_i, self.rand_r,
            self.suite,
        )


class PkAuthenticator(Protocol):
    """Authenticates REQUEST_INIT_PK / RESOLVE_INIT_PK (certificate, SIGN, PKE)."""

    def authenticate(
        self, v: RequestInitPk | ResolveInitPk, now: float, role: int
    ) -> Authenticated: ...

    def authenticate_steps(
        self, v: RequestInitPk | ResolveInitPk, now: float, role: int
    ) -> Steps[Authenticated]:
        """:meth:`authenticate` as steps: the blocking token operation (the PKE's RSA
        decryption) is yielded (kms.core.steps)."""
        ...


@dataclass
class Deps:
    keystore: KeyOps
    directory: Directory
    replay: ReplayCache
    ledger: ResolveLedger
    rate: RateLimiter
    audit: AuditSink
    policy: KmsPolicy
    pk: PkAuthenticator | None = None
    # Federation (RFC 6043 9): whether the adapter can reach the KMS that issued a ticket
    # (it makes the call the core returns as a PeerCall); False: such tickets are refused.
    federation: bool = False
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
    # Authorised intermediate nodes (RFC 6043 11.1; None: there are none).
    nodes: Nodes | None = None
    # The token secret RANDRkms is computed with (RFC 6043 5.1.1, kms.core.forking); None: a
    # fresh random modifier per resolve (then no node can obtain a forked leg's keys).
    fork_modifier: KeyRef | None = None


@dataclass(frozen=True)
class Call:
    """What the transport says about one call: the immutable context every step gets."""

    correlation_id: str = ""
    hops: int = 0  # how many KMSs this request has already crossed (RFC 6043 9)


@dataclass(frozen=True)
class Issued:
    """What a handler returns: the response and what the audit record says about it."""

    wire: bytes = field(repr=False)
    audit: Mapping[str, object]


# --- what a failing step knew ---------------------------------------------------------------
# A step of an exchange returns its result and its audit fields. When it raises instead (a
# refusal, the token gone, a bug), the fields it had gathered and the sender it had already
# authenticated travel on the exception: the error path writes them to the audit record and,
# once the sender is authenticated, protects the MIKEY error message with a V (RFC 6043 5.4).

_AUDIT = "kms_audit"
_AUTH = "kms_auth"


class noting:  # noqa: N801 - used as a function: ``with noting(audit, auth):``
    """Whatever is raised in the block (a cancellation thrown in at a step included) carries
    ``audit`` (fields noted deeper inside win) and, if given and none is noted yet, the
    authenticated sender ``auth``. (A class, not a generator context manager: several run
    on every exchange.)"""

    __slots__ = ("_audit", "_auth")

    def __init__(self, audit: Mapping[str, object], auth: Authenticated | None = None) -> None:
        self._audit, self._auth = audit, auth

    def __enter__(self) -> None:
        return None

    def __exit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        if isinstance(exc, Exception | CallCancelled):
            setattr(exc, _AUDIT, {**self._audit, **noted_audit(exc)})
            if self._auth is not None and noted_auth(exc) is None:
                setattr(exc, _AUTH, self._auth)


def noted_audit(exc: BaseException) -> dict[str, object]:
    found = getattr(exc, _AUDIT, None)
    return dict(found) if isinstance(found, dict) else {}


def noted_auth(exc: BaseException) -> Authenticated | None:
    return getattr(exc, _AUTH, None)
