"""Key administration on the token: generate, import, delete, list (never on the request
path). Each runs in the token's exclusive section (hsm.pkcs11.connection.Token.manage): no
operation runs while the catalogue changes; creating a stored object costs ~8 ms on SoftHSM
(measured), and administration is rare.

Long-term keys are created with CKA_SENSITIVE true and CKA_EXTRACTABLE false (the token
never reveals their value, not even wrapped); secrets are stored zero-padded with their true
length in CKA_ID (hsm.pkcs11.catalogue).
"""

from __future__ import annotations

import os
from typing import Any

from pkcs11 import Attribute, ObjectClass
from pkcs11 import KeyType as P11KeyType
from pkcs11.util.ec import encode_named_curve_parameters

from hsm._common import canonical_curve, check_label, check_rsa_bits, check_secret_length
from hsm.pkcs11.catalogue import LEN_MARKER, PADDED_SECRET_BYTES, adopt
from hsm.pkcs11.connection import Token
from hsm.pkcs11.mechanisms import Operation
from hsm.pkcs11.state import Connection, PooledSession
from kms.keystore import KeyExists, KeyInfo, KeyNotFound


def check_new_label(conn: Connection, label: str) -> None:
    check_label(label)
    if label in conn.keys:
        raise KeyExists(f"a key labelled {label!r} already exists")


SECRET_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    # HMAC only: C_Sign / C_Verify (PKCS#11 "generic secret" with SIGN/VERIFY).
    Attribute.SIGN: True,
    Attribute.VERIFY: True,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}


def generate_secret(tok: Token, label: str, length: int) -> KeyInfo:
    check_secret_length(length)
    with tok.manage("generate_secret") as (conn, ps):
        check_new_label(conn, label)
        ident = LEN_MARKER + str(length).encode()
        if length == PADDED_SECRET_BYTES:
            # Generated inside the token: ALWAYS_SENSITIVE / NEVER_EXTRACTABLE stay true.
            obj = ps.session.generate_key(
                P11KeyType.GENERIC_SECRET, 8 * length, label=label, id=ident, store=True,
                template=dict(SECRET_TEMPLATE),
            )
        else:
            # A shorter key must be zero-padded, which C_GenerateKey cannot do: take the
            # token's RNG and import. The value passes host memory once, so the token
            # reports ALWAYS_SENSITIVE = NEVER_EXTRACTABLE = false.
            value = bytearray(ps.session.generate_random(8 * length))
            obj = create_secret(ps, label, ident, value)
        return adopt(conn, label, [obj])


def import_secret(tok: Token, label: str, value: bytes) -> KeyInfo:
    check_secret_length(len(value))
    with tok.manage("import_secret") as (conn, ps):
        check_new_label(conn, label)
        ident = LEN_MARKER + str(len(value)).encode()
        obj = create_secret(ps, label, ident, bytearray(value))
        return adopt(conn, label, [obj])


def create_secret(ps: PooledSession, label: str, ident: bytes, value: bytearray) -> Any:
    padded = bytes(value) + bytes(PADDED_SECRET_BYTES - len(value))
    try:
        attrs: dict[Attribute, Any] = dict(SECRET_TEMPLATE)
        attrs.update({
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: P11KeyType.GENERIC_SECRET,
            Attribute.LABEL: label,
            Attribute.ID: ident,
            Attribute.VALUE: padded,
        })
        return ps.session.create_object(attrs)
    finally:
        value[:] = bytes(len(value))  # best effort: bytes copies cannot be wiped


def generate_rsa(tok: Token, label: str, bits: int) -> KeyInfo:
    check_rsa_bits(bits)
    with tok.manage("generate_rsa") as (conn, ps):
        check_new_label(conn, label)
        ident = os.urandom(16)  # CKA_ID links the two halves (PKCS#11 convention)
        pub, priv = ps.session.generate_keypair(
            P11KeyType.RSA, bits, label=label, id=ident, store=True,
            public_template={
                Attribute.TOKEN: True, Attribute.VERIFY: True, Attribute.ENCRYPT: True,
                Attribute.WRAP: False, Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01",
            },
            private_template={
                Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False, Attribute.DECRYPT: True, Attribute.SIGN: True,
                Attribute.UNWRAP: False, Attribute.SIGN_RECOVER: False,
                Attribute.DERIVE: False,
            },
        )
        return adopt(conn, label, [priv, pub])


def generate_ec(tok: Token, label: str, curve: str) -> KeyInfo:
    name = canonical_curve(curve)
    with tok.manage("generate_ec") as (conn, ps):
        check_new_label(conn, label)
        conn.plan.method(Operation.GENERATE_EC)
        ident = os.urandom(16)
        params = ps.session.create_domain_parameters(
            P11KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(name)},
            local=True,
        )
        pub, priv = params.generate_keypair(
            label=label, id=ident, store=True,
            public_template={Attribute.TOKEN: True, Attribute.VERIFY: True,
                             Attribute.DERIVE: False},
            private_template={
                Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False, Attribute.SIGN: True, Attribute.DERIVE: False,
            },
        )
        return adopt(conn, label, [priv, pub])


def delete(tok: Token, label: str) -> None:
    with tok.manage("delete") as (conn, ps):
        # A search here is fine (management path): also catches objects with this label
        # that the cache ignores (certificates, data objects).
        found = list(ps.session.get_objects({Attribute.LABEL: label}))
        if not found and label not in conn.keys:
            raise KeyNotFound(f"no key labelled {label!r}")
        tok.objects.drop_working(conn, label)
        for obj in found:
            obj.destroy()
        conn.keys.pop(label, None)
        for s in conn.sessions:
            s.bound.pop(label, None)


def list_keys(tok: Token) -> list[KeyInfo]:
    with tok.session("list_keys") as (conn, _ps):
        return [conn.keys[k].info for k in sorted(conn.keys)
                if conn.keys[k].handles.keys() - {ObjectClass.PUBLIC_KEY}]


def key_info(tok: Token, label: str) -> KeyInfo:
    with tok.session("key_info") as (conn, _ps):
        meta = conn.keys.get(label)
        if meta is None or not meta.handles.keys() - {ObjectClass.PUBLIC_KEY}:
            raise KeyNotFound(f"no key labelled {label!r}")
        return meta.info


__all__ = [
    "SECRET_TEMPLATE",
    "check_new_label",
    "create_secret",
    "delete",
    "generate_ec",
    "generate_rsa",
    "generate_secret",
    "import_secret",
    "key_info",
    "list_keys",
]
