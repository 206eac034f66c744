"""The handle catalogue: which labelled keys the token holds, found in one scan.

Key handles are found in one scan per connection (in each pooled session, because
python-pkcs11 binds an object to the session it was found in) and kept by label; requests
never search the token (PKCS#11 v2.40 section 5.7: C_FindObjects). Key administration updates
the catalogue (:func:`adopt`, and the delete in hsm.pkcs11.admin). Only public attributes are
read (CKA_CLASS, CKA_LABEL, CKA_KEY_TYPE, lengths and flags, public key material).

True secret length: SoftHSM refuses HMAC keys shorter than the digest (20 / 32 bytes), so
secrets are stored zero-padded to 32 bytes (HMAC zero-pads keys to the block size anyway,
RFC 2104 section 2, so HMAC(K || 0..0) == HMAC(K), and keys <= 32 bytes are a single PRF slice
of RFC 3830 4.1.2). The real length is recorded in CKA_ID as ``b"mikey-kms/len=<n>"``: CKA_ID
is a standard, searchable byte-string attribute that is free for secret keys and survives
backups; CKA_VALUE_LEN has to be the stored length. Objects without the marker count at their
CKA_VALUE_LEN.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pkcs11.exceptions as p11e
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, ObjectClass
from pkcs11 import KeyType as P11KeyType
from pkcs11.util.ec import encode_named_curve_parameters

from hsm._common import CURVE_BITS
from hsm.pkcs11.state import Connection, KeyMeta, PooledSession
from kms.keystore import KeyInfo, KeyNotFound, KeyStoreError, KeyType, UnsupportedOperation

log = logging.getLogger(__name__)

PADDED_SECRET_BYTES = 32
"""Stored length of secrets: SoftHSM's minimum for CKM_SHA256_HMAC (20 for SHA-1)."""

LEN_MARKER = b"mikey-kms/len="
"""CKA_ID prefix recording a secret's true length (see the module docstring)."""


def true_length(ident: Any, stored: int) -> int:
    # openCryptoki leaves CKA_VALUE_LEN at 0 for secrets made with C_CreateObject (measured):
    # then the marker is bounded by the padded length we always store.
    bound = stored or PADDED_SECRET_BYTES
    if isinstance(ident, bytes) and ident.startswith(LEN_MARKER):
        digits = ident[len(LEN_MARKER):]
        if digits.isdigit() and 0 < int(digits) <= bound:
            return int(digits)
    return stored


def rsa_der(n: bytes, e: bytes) -> bytes:
    pub = rsa.RSAPublicNumbers(int.from_bytes(e, "big"), int.from_bytes(n, "big")).public_key()
    return pub.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


CURVES: dict[str, Callable[[], ec.EllipticCurve]] = {
    "secp256r1": ec.SECP256R1,
    "secp384r1": ec.SECP384R1,
}


def curve_from_params(params: bytes) -> str | None:
    for name in CURVES:
        if params == encode_named_curve_parameters(name):
            return name
    return None


def der_octet_string(data: bytes) -> bytes:
    """Content of a DER OCTET STRING (CKA_EC_POINT is one in PKCS#11 v2.40)."""
    if len(data) < 2 or data[0] != 0x04:
        raise ValueError("not an OCTET STRING")
    n = data[1]
    off = 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(data[2 : 2 + k], "big")
        off = 2 + k
    if off + n != len(data):
        raise ValueError("bad OCTET STRING length")
    return data[off:]


def public_der(obj: Any) -> bytes | None:
    """SubjectPublicKeyInfo of a public key object (public attributes only)."""
    try:
        kt = obj[Attribute.KEY_TYPE]
        if kt == P11KeyType.RSA:
            return rsa_der(obj[Attribute.MODULUS], obj[Attribute.PUBLIC_EXPONENT])
        if kt == P11KeyType.EC:
            name = curve_from_params(obj[Attribute.EC_PARAMS])
            if name is None:
                return None
            point = der_octet_string(obj[Attribute.EC_POINT])
            pub = ec.EllipticCurvePublicKey.from_encoded_point(CURVES[name](), point)
            return pub.public_bytes(serialization.Encoding.DER,
                                    serialization.PublicFormat.SubjectPublicKeyInfo)
    except (p11e.PKCS11Error, ValueError):
        return None
    return None


SCAN_TRIES = 3
"""Scans of the token before giving up when objects keep changing under it."""


def scan(sessions: list[PooledSession]) -> dict[str, KeyMeta]:
    """The one scan of the token: metadata from session 0, bindings in every session.

    An object C_FindObjects returned can be gone (or be half-written by another process)
    when its class is read: SoftHSM then answers CKR_OBJECT_HANDLE_INVALID for that
    handle, and the whole scan is made again (the search is finalised first), at most
    SCAN_TRIES times: a second worker scanning while another process created or deleted
    keys made the start-up scan, or a rescan, fail."""
    for attempt in range(1, SCAN_TRIES + 1):
        try:
            return _scan_once(sessions)
        except p11e.ObjectHandleInvalid:
            for ps in sessions:
                ps.bound.clear()
            if attempt == SCAN_TRIES:
                raise
            log.info("a token object changed during the scan; scanning again")
    raise AssertionError("unreachable")


def _scan_once(sessions: list[PooledSession]) -> dict[str, KeyMeta]:
    keys: dict[str, KeyMeta] = {}
    first = sessions[0]
    for obj in first.session.get_objects():
        remember(keys, first, obj)
    wanted = {h for m in keys.values() for h in m.handles.values()}
    for ps in sessions[1:]:
        bind_all(ps, keys, wanted)
    return keys


def bind_all(ps: PooledSession, keys: dict[str, KeyMeta], wanted: set[int]) -> None:
    by_handle = {h: (label, cls) for label, m in keys.items() for cls, h in m.handles.items()}
    for obj in ps.session.get_objects():
        if obj.handle in wanted:
            label, cls = by_handle[obj.handle]
            ps.bound.setdefault(label, {})[cls] = obj


def remember(keys: dict[str, KeyMeta], ps: PooledSession, obj: Any) -> None:
    """Describe one object found on the token (no values read) and bind it in ``ps``."""
    try:
        cls = obj[Attribute.CLASS]
        label = obj[Attribute.LABEL]
    except p11e.PKCS11Error:
        return
    if not label or cls not in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY,
                                ObjectClass.PUBLIC_KEY):
        return  # certificates, data objects, unlabelled keys: not ours to serve
    meta = keys.get(label)
    if meta is not None and cls in meta.handles:
        log.warning("token holds several %s objects labelled %r; using the first",
                    cls.name, label)
        return
    try:
        _describe(keys, ps, obj, label, cls, meta)
    except p11e.ObjectHandleInvalid:
        # Gone or half-written meanwhile (another process): not usable, skipped this scan
        # (any other error, e.g. a lost token, still fails the scan and the connection).
        log.info("token object %r went away while it was read; skipped", label)


def _describe(
    keys: dict[str, KeyMeta], ps: PooledSession, obj: Any, label: str, cls: ObjectClass,
    meta: KeyMeta | None,
) -> None:  # fmt: skip
    if cls == ObjectClass.SECRET_KEY:
        if meta is not None:
            log.warning("label %r names a secret and a key pair; ignoring the secret", label)
            return
        meta = describe_secret(label, obj)
    elif cls == ObjectClass.PRIVATE_KEY:
        if meta is not None and meta.info.key_type == KeyType.SECRET:
            return
        described = describe_private(label, obj)
        if described is None:
            return
        if meta is not None:  # the public half came first
            described.handles.update(meta.handles)
            described.public_der = meta.public_der or described.public_der
        meta = described
    else:  # public key
        der = public_der(obj)
        if meta is None:
            # Placeholder until the private half shows up; dropped if it never does.
            meta = KeyMeta(KeyInfo(label, KeyType.RSA, 0, False, True), {}, public_der=der)
        elif meta.info.key_type == KeyType.SECRET:
            return
        else:
            meta.public_der = der or meta.public_der
    meta.handles[cls] = obj.handle
    keys[label] = meta
    ps.bound.setdefault(label, {})[cls] = obj


def describe_secret(label: str, obj: Any) -> KeyMeta:
    attrs = obj.get_attributes([
        Attribute.KEY_TYPE, Attribute.VALUE_LEN, Attribute.ID, Attribute.SENSITIVE,
        Attribute.EXTRACTABLE, Attribute.ALWAYS_SENSITIVE, Attribute.NEVER_EXTRACTABLE,
    ])
    stored = int(attrs.get(Attribute.VALUE_LEN, 0))
    true_len = true_length(attrs.get(Attribute.ID), stored)
    kt = KeyType.AES if attrs.get(Attribute.KEY_TYPE) == P11KeyType.AES else KeyType.SECRET
    info = KeyInfo(
        label, kt, true_len * 8,
        sensitive=bool(attrs.get(Attribute.SENSITIVE, False)),
        extractable=bool(attrs.get(Attribute.EXTRACTABLE, True)),
        always_sensitive=bool(attrs.get(Attribute.ALWAYS_SENSITIVE, False)),
        never_extractable=bool(attrs.get(Attribute.NEVER_EXTRACTABLE, False)),
    )
    return KeyMeta(info, {}, secret_len=true_len, stored_len=stored)


def describe_private(label: str, obj: Any) -> KeyMeta | None:
    attrs = obj.get_attributes([
        Attribute.KEY_TYPE, Attribute.SENSITIVE, Attribute.EXTRACTABLE,
        Attribute.ALWAYS_SENSITIVE, Attribute.NEVER_EXTRACTABLE,
    ])
    kt = attrs.get(Attribute.KEY_TYPE)
    der: bytes | None = None
    if kt == P11KeyType.RSA:
        n = obj[Attribute.MODULUS]
        e = obj[Attribute.PUBLIC_EXPONENT]
        bits = int.from_bytes(n, "big").bit_length()
        der = rsa_der(n, e)
        key_type = KeyType.RSA
    elif kt == P11KeyType.EC:
        curve = curve_from_params(obj[Attribute.EC_PARAMS])
        if curve is None:
            return None
        bits = CURVE_BITS[curve]
        key_type = KeyType.EC
    else:
        return None
    info = KeyInfo(
        label, key_type, bits,
        sensitive=bool(attrs.get(Attribute.SENSITIVE, False)),
        extractable=bool(attrs.get(Attribute.EXTRACTABLE, True)),
        always_sensitive=bool(attrs.get(Attribute.ALWAYS_SENSITIVE, False)),
        never_extractable=bool(attrs.get(Attribute.NEVER_EXTRACTABLE, False)),
    )
    return KeyMeta(info, {}, public_der=der)


def adopt(conn: Connection, label: str, objs: list[Any]) -> KeyInfo:
    """Put freshly created objects into the cache and bind them in every session.

    A new object that does not read back under ``label`` (SoftHSM 2.6.1's file store loses
    CKA_LABEL of an object being created while another process reads or writes the token,
    measured: docs/design.md, "Token objects created while other processes use the token")
    is labelled again once (CKA_LABEL is modifiable, PKCS#11 v2.40 4.4); if that fails too,
    a clear KeyStoreError says so instead of a KeyError."""
    first = conn.sessions[0]
    for obj in objs:
        remember(conn.keys, first, obj)
    if not _adopted(conn, label, objs):
        _label_again(conn, label, objs)
    meta = conn.keys[label]
    for ps in conn.sessions[1:]:
        for obj in ps.session.get_objects({Attribute.LABEL: label}):
            for cls, h in meta.handles.items():
                if obj.handle == h:
                    ps.bound.setdefault(label, {})[cls] = obj
    return meta.info


def _adopted(conn: Connection, label: str, objs: list[Any]) -> bool:
    meta = conn.keys.get(label)
    return meta is not None and all(o.handle in meta.handles.values() for o in objs)


def _label_again(conn: Connection, label: str, objs: list[Any]) -> None:
    """The new objects read back without ``label``: set it again and re-read, or fail."""
    what = f"token object {label!r} was created but does not read back under its label"
    try:
        for obj in objs:
            if obj[Attribute.LABEL] != label:
                log.warning("new token object %r read back with another label (another "
                            "process used the token at the same moment?); labelling it again",
                            label)  # fmt: skip
                obj[Attribute.LABEL] = label
    except p11e.PKCS11Error as exc:
        raise KeyStoreError(f"{what}, and setting it again failed ({type(exc).__name__}); "
                            "another process may have used the token at the same moment: "
                            "retry") from None  # fmt: skip
    conn.keys.pop(label, None)  # a half-remembered key pair is described again
    for ps in conn.sessions:
        ps.bound.pop(label, None)
    for obj in objs:
        remember(conn.keys, conn.sessions[0], obj)
    if not _adopted(conn, label, objs):
        raise KeyStoreError(f"{what} (another process may have used the token at the same "
                            "moment): retry")  # fmt: skip


def lookup(conn: Connection, ps: PooledSession, label: str, cls: ObjectClass,
           kinds: tuple[KeyType, ...]) -> tuple[KeyMeta, Any]:
    """The catalogue entry of ``label`` and its ``cls`` object bound in ``ps``; KeyNotFound,
    or UnsupportedOperation for a key of another kind."""
    meta = conn.keys.get(label)
    if meta is None:
        raise KeyNotFound(f"no key labelled {label!r}")
    if meta.info.key_type not in kinds or cls not in meta.handles:
        raise UnsupportedOperation(f"key {label!r} cannot be used for this operation")
    return meta, ps.bound[label][cls]


__all__ = [
    "CURVES",
    "LEN_MARKER",
    "PADDED_SECRET_BYTES",
    "adopt",
    "bind_all",
    "curve_from_params",
    "describe_private",
    "describe_secret",
    "lookup",
    "public_der",
    "remember",
    "rsa_der",
    "scan",
    "true_length",
]
