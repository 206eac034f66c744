"""Which PSK an initial message uses, when its sender's PSK has been rotated (RFC 6043 4.2.1,
4.2.3: IDRpsk is "used to indicate the pre-shared key used").

Reading (docs/design.md): IDRpsk ID Data names a PSK version, ``<identity>#psk<N>``; version
1 is the PSK the endpoint was registered with and is named by the identity itself or by no
IDRpsk (what every endpoint sent before rotation existed). The response is protected with
the PSK the request used (the response keys derive from ``Authenticated.response_key``). A
retired version, or one whose overlap has ended, is refused exactly like a wrong MAC.
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
    from kms.core.ports import Directory


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
