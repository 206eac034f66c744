"""Endpoint PSK rotation without downtime: a new version in the token next to the old one,
the old one retired (its token object destroyed) explicitly or once its overlap has ended.
Registry row and token object change together, as for endpoints (see kms.home)."""

from __future__ import annotations

import contextlib
import time

from kms.home import PSK_MAX_BYTES, PSK_MIN_BYTES, Home, HomeError, psk_label
from kms.keystore import KeyNotFound
from kms.store.psk_versions import PskVersion


def rotate_psk(home: Home, identity: bytes, psk: bytes, overlap_s: int | None) -> PskVersion:
    """Import ``psk`` as the endpoint's next PSK version (all or nothing). ``overlap_s``:
    the older versions stop being accepted that many seconds from now (None: until
    retired with :func:`retire_psk`)."""
    if not PSK_MIN_BYTES <= len(psk) <= PSK_MAX_BYTES:
        raise HomeError(f"PSK must be {PSK_MIN_BYTES}..{PSK_MAX_BYTES} bytes, got {len(psk)}")
    if overlap_s is not None and overlap_s < 0:
        raise HomeError("the overlap must be >= 0 seconds")
    endpoint = home.registry.get_endpoint(identity)  # before asking for the token PIN
    ks = home.keystore()
    created: str | None = None
    try:
        with home.registry.transaction():
            label = psk_label(identity)
            version = home.registry.add_psk_version(
                identity, endpoint.key_label, label, overlap_s
            )
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


def retire_due(home: Home, now: float | None = None) -> list[PskVersion]:
    """Retire every version whose overlap has ended (for a timer or cron job); the server
    already refuses them, this destroys their token objects."""
    due = home.registry.due_psk_versions(time.time() if now is None else now)
    return [retire_psk(home, v.identity, v.version) for v in due]
