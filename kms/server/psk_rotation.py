"""PSK rotation without downtime, for endpoints and intermediate nodes: a new version in the
token next to the old one, the old one retired (its token object destroyed) explicitly or
once its overlap has ended. Registry row and token object change together, as for
endpoints (see kms.home)."""

from __future__ import annotations

import contextlib
import time
from enum import StrEnum

from kms.home import PSK_MAX_BYTES, PSK_MIN_BYTES, Home, HomeError, node_label, psk_label
from kms.keystore import KeyNotFound
from kms.store.nodes import NodeError
from kms.store.psk_versions import PskVersion


class Owner(StrEnum):
    """Whose PSK is rotated: an endpoint's, or an intermediate node's (RFC 6043 11.1)."""

    ENDPOINT = "endpoint"
    NODE = "node"


def registered_label(home: Home, owner: Owner, identity: bytes) -> str:
    """The token label of the PSK ``identity`` was registered with (version 1); refused
    for an unknown identity and for a certificate node (it has no PSK)."""
    if owner == Owner.ENDPOINT:
        return home.registry.get_endpoint(identity).key_label
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
    return home.registry.find_node(identity) is not None


def rotate_psk(
    home: Home, identity: bytes, psk: bytes, overlap_s: int | None,
    owner: Owner = Owner.ENDPOINT,
) -> PskVersion:  # fmt: skip
    """Import ``psk`` as the endpoint's (or node's) next PSK version (all or nothing).
    ``overlap_s``: the older versions stop being accepted that many seconds from now
    (None: until retired with :func:`retire_psk`)."""
    if not PSK_MIN_BYTES <= len(psk) <= PSK_MAX_BYTES:
        raise HomeError(f"PSK must be {PSK_MIN_BYTES}..{PSK_MAX_BYTES} bytes, got {len(psk)}")
    if overlap_s is not None and overlap_s < 0:
        raise HomeError("the overlap must be >= 0 seconds")
    base = registered_label(home, owner, identity)  # before asking for the token PIN
    ks = home.keystore()
    created: str | None = None
    try:
        with home.registry.transaction():
            label = psk_label(identity) if owner == Owner.ENDPOINT else node_label(identity)
            version = home.registry.add_psk_version(identity, base, label, overlap_s)
            home._create(label, lambda: ks.import_secret(label, psk))
            created = label
    except BaseException:
        home._undo_create(ks, created)
        raise
    return version


def retire_psk(home: Home, identity: bytes, version: int) -> PskVersion:
    """Retire one version: messages under it are refused and its token object destroyed."""
    ks = home.keystore()
    with home.registry.transaction():
        retired = home.registry.retire_psk_version(identity, version)
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
