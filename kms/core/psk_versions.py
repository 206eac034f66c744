"""Which PSK an initial message uses, when its sender's PSK has been rotated (RFC 6043 4.2.1,
4.2.3: IDRpsk is "used to indicate the pre-shared key used").

Reading (docs/design.md): IDRpsk ID Data names a PSK version, ``<identity>#psk<N>``; version
1 is the PSK the endpoint was registered with and is named by the identity itself or by no
IDRpsk (what every endpoint sent before rotation existed). The response is protected with
the PSK the request used (the response keys derive from ``Authenticated.response_key``). A
retired version, or one whose overlap has ended, is refused exactly like a wrong MAC.

Peer KMSs (RFC 6043 9) rotate the key they share the same way: the forwarded
RESOLVE_INIT_PSK's IDRpsk names the sending KMS, ``<kms id>#psk<N>`` once both sides use
version N (:func:`peer_psk`); the RESOLVE_RESP is protected with the version the request used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from kms.keystore import KeyRef
from kms.mikey.compose import sender_of
from kms.mikey.constants import IdRole, IdType
from kms.mikey.ticket import Idr
from kms.mikey.views import RequestInitPsk, ResolveInitPsk

if TYPE_CHECKING:
    from kms.core.ports import Directory, PeerKms

NAME_SEPARATOR = b"#psk"
MAX_VERSION_DIGITS = 9


def version_name(identity: bytes, version: int) -> bytes:
    """What IDRpsk carries for ``version`` of ``identity``'s PSK: the identity itself for
    version 1 (as before any rotation), else ``<identity>#psk<N>``."""
    return identity if version == 1 else identity + NAME_SEPARATOR + str(version).encode()


def split_version_name(name: bytes) -> tuple[bytes, int] | None:
    """(owner, N) of a name ``<owner>#psk<N>`` (N >= 2 without leading zeros), else None."""
    owner, sep, number = name.rpartition(NAME_SEPARATOR)
    if not sep or not owner or not number.isdigit() or len(number) > MAX_VERSION_DIGITS:
        return None
    if number.startswith(b"0") or int(number) < 2:
        return None
    return owner, int(number)


@dataclass(frozen=True)
class PskVersionRef:
    owner: bytes
    version: int
    key: KeyRef = field(repr=False)
    retired: bool
    retire_at: int | None

    def live(self, now: float) -> bool:
        """Neither retired nor past the end of its overlap: messages under it are accepted."""
        return not self.retired and (self.retire_at is None or now < self.retire_at)


class PskVersions(Protocol):
    def psk_version(self, name: bytes) -> PskVersionRef | None:
        """The version IDRpsk ``name`` designates; None when ``name`` is no rotated
        endpoint's or node's (then the sender's registered PSK applies, as without
        rotation)."""
        ...


@dataclass(frozen=True)
class NamedPsk:
    identity: Idr
    key: KeyRef | None  # None: refuse (as an unknown identity, with ``reason`` in the audit)
    version: int
    reason: str = ""


def named_psk(
    v: RequestInitPsk | ResolveInitPsk,
    versions: PskVersions | None,
    directory: Directory,
    role: IdRole,
    now: float,
) -> NamedPsk | None:
    """The PSK version a REQUEST_INIT_PSK / RESOLVE_INIT_PSK uses, or None when its sender
    has never rotated (the caller then uses the registered PSK). Raises nothing: an IDRpsk
    naming another identity's version is returned with key None."""
    if versions is None:
        return None
    idr, _ = sender_of(v)
    psk = v.idr_psk
    name = psk.data if psk is not None else (idr.data if idr is not None else None)
    if not name:
        return None
    ref = versions.psk_version(name)
    if ref is None:
        return None
    identity = idr if idr is not None else Idr(role, IdType.URI, ref.owner)
    if identity.data != ref.owner:
        return NamedPsk(identity, None, ref.version, "IDRpsk names a PSK of another identity")
    if directory.psk_for(ref.owner) is None:
        return NamedPsk(identity, None, ref.version, "unknown identity")  # removed or disabled
    if not ref.live(now):
        return NamedPsk(identity, None, ref.version, f"PSK version {ref.version} retired")
    return NamedPsk(identity, ref.key, ref.version)


def ticket_psk(
    versions: PskVersions | None,
    directory: Directory,
    creator: bytes,
    name: bytes,
    now: float,
) -> tuple[KeyRef | None, str]:
    """The PSK protecting an Initiator-made ticket (RFC 6043 4.1.1 mode 3, D = 0), named
    by the IDRpsk of its Ticket Data (A.1), and why not when there is none.

    Accepted: exactly the live versions of the creator's (IDRi's) own PSK, named as the
    rotation names them (version 1 by the identity itself); an endpoint that has never
    rotated is named by its identity only. A retired version, one whose overlap has ended,
    or another identity's version is refused, as in :func:`named_psk`."""
    ref = versions.psk_version(name) if versions is not None else None
    if ref is None:
        if name != creator:
            return None, "IDRpsk does not name a PSK of the ticket's IDRi"
        key = directory.psk_for(creator)
        return key, "" if key is not None else "unknown identity"
    if ref.owner != creator:
        return None, "IDRpsk names a PSK of another identity"
    if directory.psk_for(ref.owner) is None:
        return None, "unknown identity"  # removed or disabled
    if not ref.live(now):
        return None, f"PSK version {ref.version} retired"
    return ref.key, ""


@dataclass(frozen=True)
class PeerPsk:
    """The peer KMS a forwarded RESOLVE_INIT_PSK comes from and the version of the key
    shared with it that its IDRpsk names."""

    peer: PeerKms
    key: KeyRef | None  # None: refuse like a wrong MAC (``reason`` goes to the audit log)
    version: int | None  # None: the peer's key was never rotated (its registered key)
    reason: str = ""


def peer_psk(
    name: bytes, versions: PskVersions | None, directory: Directory, now: float
) -> PeerPsk | None:
    """Which peer KMS, and which key shared with it, IDRpsk ``name`` designates; None when
    ``name`` is no peer's (an endpoint or a node then). ``name`` is the peer's KMS id
    (version 1, or a peer that never rotated) or ``<kms id>#psk<N>``. A retired version,
    and a version this KMS does not know, come back with key None: refused exactly like a
    wrong MAC, so that a prober learns nothing about which versions exist."""
    ref = versions.psk_version(name) if versions is not None else None
    peer = directory.peer(ref.owner if ref is not None else name)
    if peer is None:
        split = split_version_name(name) if ref is None else None
        owner = directory.peer(split[0]) if split is not None else None
        if split is None or owner is None or owner.psk is None:
            return None
        return PeerPsk(owner, None, split[1], f"unknown PSK version {split[1]}")
    if ref is None:
        return PeerPsk(peer, peer.psk, None)
    if not ref.live(now):
        return PeerPsk(peer, None, ref.version, f"PSK version {ref.version} retired")
    return PeerPsk(peer, ref.key, ref.version)
