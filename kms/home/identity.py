"""Identity rules: shape checks per IDR ID type (RFC 6043 6.6, RFC 3830 6.7) and the type a
bare identity is given; identities are stored and compared as exact bytes."""

from __future__ import annotations

from kms.home.errors import HomeError
from kms.mikey.constants import IdType
from kms.server.config import (
    URI_RE,
)
from kms.store.registry import (
    show_identity,
)


def validate_identity(identity: bytes, id_type: IdType) -> None:
    """Shape checks per ID type; identities are still stored and compared as exact bytes."""
    if not identity:
        raise HomeError("identity must not be empty")
    if len(identity) > 0xFFFF:
        raise HomeError("identity longer than 65535 bytes (IDR length field)")
    if id_type is IdType.BYTE_STRING:
        return
    try:
        text = identity.decode("utf-8")
    except UnicodeDecodeError:
        raise HomeError(
            f"identity {show_identity(identity)} is not UTF-8; use --id-type bytes"
        ) from None
    if id_type is IdType.URI and not URI_RE.match(text):
        raise HomeError(f"identity {show_identity(identity)} is not a URI (scheme:...)")
    if id_type is IdType.NAI and (not text.isprintable() or any(c.isspace() for c in text)):
        raise HomeError(f"identity {show_identity(identity)} is not a valid NAI")


def guess_id_type(identity: bytes) -> IdType:
    """URI if it starts with a scheme, else NAI if it is printable UTF-8, else byte string."""
    try:
        text = identity.decode("utf-8")
    except UnicodeDecodeError:
        return IdType.BYTE_STRING
    if URI_RE.match(text):
        return IdType.URI
    if text.isprintable() and not any(c.isspace() for c in text):
        return IdType.NAI
    return IdType.BYTE_STRING


