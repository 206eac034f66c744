"""PSK rotation without downtime, for endpoints, intermediate nodes and peer KMSs: a new
version in the token next to the old one, the old one retired (its token object destroyed)
explicitly or once its overlap has ended. Registry row and token object change together, as
for endpoints (see kms.home). Every version gets a fresh token label (kms.home.layout), so a
running server never uses a handle cached for another key: it finds a new version's object
on first use (kms.server.key_rescan)."""

from __future__ import annotations

import contextlib
import time
from enum import StrEnum

from kms.home import (
    PSK_MAX_BYTES,
    PSK_MIN_BYTES,
    Home,
    HomeError,
    node_label,
    peer_label,
    psk_label,
)
from kms.keystore import KeyNotFound
from kms.store.nodes import NodeError
from kms.store.psk_versions import PskVersion
from kms.store.registry import show_identity


class Owner(StrEnum):
    """Whose PSK is rotated: an endpoint's, an intermediate node's (RFC 6043 11.1) or the
    key shared with a peer KMS (RFC 6043 9)."""

    ENDPOINT = "endpoint"
    NODE = "node"
    PEER = "peer"


def registered_label(home: Home, owner: Owner, identity: bytes) -> str:
    """The token label of the PSK ``identity`` was registered with (version 1); refused
    for an unknown identity and for a certificate node or peer (it has no PSK)."""
    if owner == Owner.ENDPOINT:
        return home.registry.get_endpoint(identity).key_label
    if owner == Owner.PEER:
        peer = home.registry.get_peer(identity)
        if peer.key_label is None:
            raise HomeError(
                f"peer KMS {show_identity(identity)} is a certificate peer, not a PSK peer: "
                "it has no shared key"
            )
        return str(peer.key_label)
    try:
        node = home.registry.get_node(identity)
    except NodeError as exc:
        raise HomeError(str(exc)) from None
    if node.key_label is None:
        raise HomeError("a certificate node has no PSK (it signs with its certificate)")
    return node.key_label


def owned_by(home: Home, owner: Owner, identity: bytes) -> bool:
    if owner == Owner.ENDPOINT:
        return home.registry.find_endpoint(identity) is not None
    if owner == Owner.PEER:
        return any(p.kms_id == identity for p in home.registry.list_peers())
    return home.registry.find_node(identity) is not None


def _label(owner: Owner, identity: bytes) -> str:
    if owner == Owner.PEER:
        return peer_label(identity)
    return psk_label(identity) if owner == Owner.ENDPOINT else node_label(identity)


def rotate_psk(
    home: Home, identity: bytes, psk: bytes, overlap_s: int | None,
    owner: Owner = Owner.ENDPOINT, number: int | None = None,
) -> PskVersion:  # fmt: skip
    """Import ``psk`` as the endpoint's (node's, peer's) next PSK version (all or nothing).
    ``overlap_s``: the older versions stop being accepted that many seconds from now
    (None: until retired with :func:`retire_psk`). ``number``: the version number (default
    the next one)."""
    if not PSK_MIN_BYTES <= len(psk) <= PSK_MAX_BYTES:
        raise HomeError(f"PSK must be {PSK_MIN_BYTES}..{PSK_MAX_BYTES} bytes, got {len(psk)}")
    if overlap_s is not None and overlap_s < 0:
        raise HomeError("the overlap must be >= 0 seconds")
    base = registered_label(home, owner, identity)  # before asking for the token PIN
    if owner == Owner.PEER and (
        home.registry.find_endpoint(identity) is not None
        or home.registry.find_node(identity) is not None
    ):
        # One psk_versions table for all (one row per identity and version).
        raise HomeError("an endpoint or node has the same identity as this peer KMS")
    ks = home.keystore()
    created: str | None = None
    try:
        with home.registry.transaction():
            label = _label(owner, identity)
            version = home.registry.add_psk_version(identity, base, label, overlap_s, number)
            home._create(label, lambda: ks.import_secret(label, psk))
            created = label
    except BaseException:
        home._undo_create(ks, created)
        raise
    return version


def retire_psk(
    home: Home, identity: bytes, version: int, owner: Owner | None = None
) -> PskVersion:
    """Retire one version: messages under it are refused and its token object destroyed.
    A peer's: not the version this KMS sends with (``kms peer use-psk`` first)."""
    ks = home.keystore()
    reg = home.registry
    with reg.transaction():
        if owner == Owner.PEER:
            retired = reg.retire_peer_psk_version(identity, version)
        else:
            retired = reg.retire_psk_version(identity, version)
        with contextlib.suppress(KeyNotFound):
            ks.delete(retired.key_label)
    return retired


def retire_due(
    home: Home, now: float | None = None, owner: Owner | None = None
) -> list[PskVersion]:
    """Retire every version whose overlap has ended (for a timer or cron job), of
    endpoints or nodes only when ``owner`` says so; the server already refuses them, this
    destroys their token objects."""
    due = home.registry.due_psk_versions(time.time() if now is None else now)
    if owner is not None:
        due = [v for v in due if owned_by(home, owner, v.identity)]
    return [retire_psk(home, v.identity, v.version) for v in due]
